"""The one 2-D matmul helper of every kernel and XLA path: float32 accumulation, optional
transposes, and the precision of float32 operands.

Triton, Mosaic (TPU and GPU) and XLA lower `lax.dot_general` the same way, so kernels and their
jnp forms share it.

Float32 operands follow jax's own setting, `jax_default_matmul_precision` (the
JAX_DEFAULT_MATMUL_PRECISION variable, or the `jax.default_matmul_precision(...)` context; part
of jit's cache key, so a change re-traces):
- unset (jax's default): lax.Precision.HIGHEST, IEEE float32 products. Triton lowers these to
  FMA loops off the tensor cores: on an H200, float32 train steps ran 1.1-7x slower on the
  Pallas paths than on the XLA ones, whose unset precision is TF32 (docs/benchmarks.md,
  "Float32 compute on the GPU").
- set: that precision, as every other matmul of the model: "tensorfloat32" (or "bfloat16",
  "default") puts the kernels' float32 dots on TF32 tensor cores, "float32" / "highest" keeps
  them exact. Unset will mean the backend's default too once the kernels pass their GPU check
  at TF32 tolerances.
The references (reference.py of each family) keep HIGHEST: they are the oracles.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

# model.matmul_precision's values: "" (jax's own setting) and the names
# jax.default_matmul_precision takes for float32 operands.
PRECISIONS = ("", "default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def f32_precision():
  """The `precision` of a float32 matmul here: HIGHEST while jax_default_matmul_precision is
  unset, else None (jax then applies its setting)."""
  return jax.lax.Precision.HIGHEST if jax.config.jax_default_matmul_precision is None else None


def precision_scope(name: str):
  """The context of model.matmul_precision `name` ("": jax's own setting, no change)."""
  if name not in PRECISIONS:
    raise ValueError(f"model.matmul_precision={name!r} must be one of {PRECISIONS}")
  return jax.default_matmul_precision(name) if name else contextlib.nullcontext()


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False, exact_f32: bool = True):
  """a [M, K] (or [K, M] with trans_a) @ b [K, N] (or [N, K] with trans_b) -> [M, N] float32.

  exact_f32: float32 operands take f32_precision() (off: always the backend's default, which a
  kernel may need where its compiler takes no precision).
  """
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  precision = f32_precision() if exact_f32 and a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)
