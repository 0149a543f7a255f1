"""The one 2-D matmul helper of every kernel and XLA path: float32 accumulation, optional
transposes, and full precision for float32 operands (the GPU default may be TF32).

Triton, Mosaic (TPU and GPU) and XLA lower `lax.dot_general` the same way, so kernels and their
jnp forms share it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False, exact_f32: bool = True):
  """a [M, K] (or [K, M] with trans_a) @ b [K, N] (or [N, K] with trans_b) -> [M, N] float32.

  exact_f32: Precision.HIGHEST when the operands are float32 (off: the backend's default, which
  a kernel may need where its compiler takes no precision).
  """
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  precision = jax.lax.Precision.HIGHEST if exact_f32 and a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)
