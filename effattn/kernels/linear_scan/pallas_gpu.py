"""Pallas (Triton lowering) kernel of the chunked linear scan, one direction per call.

One program per (batch row, head, block of Dv columns) walks the chunks in order (reversed for
the anti-causal direction) and keeps its [Dk, block_v] slice of the state in registers, so no
per-chunk states ever reach HBM: each chunk reads q, k, v once and writes o once. Per chunk:

  P = (q k^T) * decay            [C, C]   intra-chunk attention with the decay matrix
  o = P v + (w_q * q) S          [C, bv]  plus what the carried state holds
  S = keep * S + (w_k * k)^T v   [Dk, bv]

(the coefficients are xla.chunk_coefficients). The backward pass is three calls of this same
kernel on transposed problems (api.py), so forward and backward share one tuned kernel.

Layout [B, T, H, D] as given (no transposes). T is padded up to a multiple of the chunk by the
caller of `scan`; padded tokens are zero, and exponents are clamped so they never overflow.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effattn.kernels.linear_scan import xla


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the GPU kernel.

  chunk: tokens per chunk C (the intra-chunk attention is C x C).
  block_v: Dv columns per program (Dv / block_v programs per head share the q k^T work).
  num_warps, num_stages: Triton launch parameters (stages pipeline the chunk loads).
  """

  chunk: int = 64
  block_v: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for field in ("chunk", "block_v"):
      value = getattr(self, field)
      if value < 16 or value & (value - 1):
        raise ValueError(f"BlockSizes.{field}={value} must be a power of two >= 16 (Triton tiles)")


def _dot(a, b, *, trans_a=False, trans_b=False):
  """f32-accumulated matmul; IEEE precision for f32 operands (no silent TF32)."""
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _scan_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, *refs, length: int, chunk: int,
                 reverse: bool, scale: float, has_runs: bool):
  """q_ref, k_ref [Tp, Dk]; v_ref [Tp, bv]; g_ref []; s0_ref [Dk, bv]; runs_ref [Tp];
  o_ref [Tp, bv]; sT_ref [Dk, bv]."""
  if has_runs:
    runs_ref, o_ref, sT_ref = refs
  else:
    (o_ref, sT_ref), runs_ref = refs, None
  padded = q_ref.shape[0]
  num_chunks = padded // chunk
  dt = q_ref.dtype
  g = g_ref[...].astype(jnp.float32)
  i = jnp.arange(chunk)
  dist = i[None, :] - i[:, None] if reverse else i[:, None] - i[None, :]
  # Full-chunk coefficients, hoisted out of the loop; padded keys are zero so the intra decay
  # needs no validity mask (xla.chunk_coefficients masks explicitly; the products agree).
  decay = jnp.where(dist >= 0, jnp.exp(g * jnp.maximum(dist, 0).astype(jnp.float32)), 0.)
  w_in = jnp.exp(g * (i + 1).astype(jnp.float32))

  def body(step, state):
    c = num_chunks - 1 - step if reverse else step
    start = pl.multiple_of(c * chunk, chunk)
    real = jnp.minimum(chunk, length - start)
    w_out = jnp.exp(g * jnp.maximum(real - 1 - i, 0).astype(jnp.float32))
    w_q, w_k = (w_out, w_in) if reverse else (w_in, w_out)
    keep = jnp.exp(g * real.astype(jnp.float32))
    q = q_ref[pl.ds(start, chunk), :]
    k = k_ref[pl.ds(start, chunk), :]
    v = v_ref[pl.ds(start, chunk), :]
    p = _dot(q, k, trans_b=True) * decay
    if has_runs:
      r = runs_ref[pl.ds(start, chunk)]
      if reverse:
        after = runs_ref[pl.ds(jnp.minimum(start + chunk, padded - chunk), chunk)]
        edge = jnp.where(c == num_chunks - 1, jnp.max(r), jnp.min(after))
        far = jnp.min(r)
      else:
        before = runs_ref[pl.ds(jnp.maximum(start - chunk, 0), chunk)]
        edge = jnp.where(c == 0, jnp.min(r), jnp.max(before))
        far = jnp.max(r)
      p = jnp.where(r[:, None] == r[None, :], p, 0.)
      w_q = jnp.where(r == edge, w_q, 0.)
      w_k = jnp.where(r == far, w_k, 0.)
      keep = jnp.where(far == edge, keep, 0.)
    o = _dot(p.astype(dt), v) + _dot((q * w_q[:, None]).astype(dt), state.astype(dt))
    o_ref[pl.ds(start, chunk), :] = (o * scale).astype(o_ref.dtype)
    return keep * state + _dot((k * w_k[:, None]).astype(dt), v, trans_a=True)

  state = jax.lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))
  sT_ref[...] = state


def scan(q, k, v, log_decay, initial_state, runs=None, *, reverse: bool = False,
         scale: float = 1.0, block_sizes: BlockSizes = BlockSizes(), out_dtype=None,
         interpret: bool = False):
  """One direction of the linear scan (math: reference.py; chunk formulas: xla.py).

  Args:
    q, k: [B, T, H, Dk]; v: [B, T, H, Dv], one dtype (bf16 or f32); Dk, Dv powers of two >= 16.
    log_decay: [H] float32 <= 0. initial_state: [B, H, Dk, Dv] float32.
    runs: [B, T] int32 non-decreasing run ids (packed sequences) or None.
    reverse: anti-causal direction. scale: multiplies o.
    block_sizes: tiles; block_v is clipped to Dv.
    out_dtype: dtype of o (default q.dtype). interpret: run the kernel in the Pallas interpreter.

  Returns:
    (o [B, T, H, Dv], final_state [B, H, Dk, Dv] float32).
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  chunk = block_sizes.chunk
  block_v = min(block_sizes.block_v, dv)
  for name, dim in (("Dk", dk), ("Dv", dv)):
    if dim < 16 or dim & (dim - 1):
      raise ValueError(f"{name}={dim} must be a power of two >= 16 for the Pallas GPU kernel; "
                       "use impl='xla'")
  out_dtype = out_dtype or q.dtype
  q, k, v = (xla.pad_to_chunks(x, chunk) for x in (q, k, v))
  padded = q.shape[1]
  has_runs = runs is not None
  kernel = functools.partial(_scan_kernel, length=t, chunk=chunk, reverse=reverse,
                             scale=float(scale), has_runs=has_runs)
  sq = pl.squeezed
  # The Dv-block axis comes first (fastest-launched) so programs sharing q and k run together.
  qk_spec = pl.BlockSpec((sq, padded, sq, dk), lambda vi, bi, hi: (bi, 0, hi, 0))
  v_spec = pl.BlockSpec((sq, padded, sq, block_v), lambda vi, bi, hi: (bi, 0, hi, vi))
  state_spec = pl.BlockSpec((sq, sq, dk, block_v), lambda vi, bi, hi: (bi, hi, 0, vi))
  in_specs = [qk_spec, qk_spec, v_spec, pl.BlockSpec((sq,), lambda vi, bi, hi: (hi,)), state_spec]
  args = [q, k, v, log_decay.astype(jnp.float32), initial_state.astype(jnp.float32)]
  if has_runs:
    in_specs.append(pl.BlockSpec((sq, padded), lambda vi, bi, hi: (bi, 0)))
    args.append(xla.pad_runs(runs.astype(jnp.int32), chunk))
  o, final = pl.pallas_call(
      kernel,
      grid=(dv // block_v, b, h),
      in_specs=in_specs,
      out_specs=[v_spec, state_spec],
      out_shape=[jax.ShapeDtypeStruct((b, padded, h, dv), out_dtype),
                 jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                           num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="linear_scan_reverse" if reverse else "linear_scan",
  )(*args)
  return o[:, :t], final
