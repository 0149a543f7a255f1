"""Pallas (Mosaic TPU) kernel of the chunked linear scan, one direction per call.

Grid (B, H, chunks) with the chunk axis sequential ("arbitrary"): each step gets one chunk of q,
k, v through BlockSpecs (Pallas double-buffers the HBM->VMEM copies) and carries the [Dk, Dv]
state in a VMEM scratch buffer; the final state is written at the last step. The per-chunk math
is xla.chunk_coefficients, the same as the GPU kernel.

TPU tiling wants the last two block dims to be (multiple of 8, multiple of 128) or full, so the
kernel works on [B, H, T, D] (the wrapper transposes from [B, T, H, D]) and the default chunk
is 128 (one MXU tile). Verified against reference.py in interpret mode on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effattn.kernels.linear_scan import xla
from effattn.kernels.matmul import dot


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """chunk: tokens per grid step C (multiple of 8; 128 fills the MXU)."""

  chunk: int = 128

  def __post_init__(self):
    if self.chunk < 8 or self.chunk % 8:
      raise ValueError(f"BlockSizes.chunk={self.chunk} must be a multiple of 8 (TPU sublanes)")


# Mosaic TPU kernels keep the backend's default precision for float32 operands.
_dot = functools.partial(dot, exact_f32=False)


def _scan_kernel(g_ref, q_ref, k_ref, v_ref, s0_ref, *refs, length: int, chunk: int,
                 num_chunks: int, reverse: bool, scale: float, has_runs: bool):
  """g_ref [H] (SMEM); q_ref, k_ref [C, Dk]; v_ref [C, Dv]; s0_ref [Dk, Dv]; runs as a row
  [1, C], a column [C, 1] and the neighbouring chunk's row [1, C]; o_ref [C, Dv];
  sT_ref [Dk, Dv]; state_ref [Dk, Dv] f32 scratch."""
  if has_runs:
    row_ref, col_ref, next_ref, o_ref, sT_ref, state_ref = refs
  else:
    o_ref, sT_ref, state_ref = refs
  step = pl.program_id(2)
  c = num_chunks - 1 - step if reverse else step

  @pl.when(step == 0)
  def _():
    state_ref[...] = s0_ref[...].astype(jnp.float32)

  dt = q_ref.dtype
  g = g_ref[pl.program_id(1)]
  rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  dist = cols - rows if reverse else rows - cols
  decay = jnp.where(dist >= 0, jnp.exp(g * jnp.maximum(dist, 0).astype(jnp.float32)), 0.)
  i = jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
  real = jnp.minimum(chunk, length - c * chunk)
  w_in = jnp.exp(g * (i + 1).astype(jnp.float32))
  w_out = jnp.exp(g * jnp.maximum(real - 1 - i, 0).astype(jnp.float32))
  w_q, w_k = (w_out, w_in) if reverse else (w_in, w_out)
  keep = jnp.exp(g * real.astype(jnp.float32))
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  p = _dot(q, k, trans_b=True) * decay
  if has_runs:
    r_row, r_col, nbr = row_ref[...], col_ref[...], next_ref[...]
    if reverse:
      edge = jnp.where(c == num_chunks - 1, jnp.max(r_row), jnp.min(nbr))
      far = jnp.min(r_row)
    else:
      edge = jnp.where(c == 0, jnp.min(r_row), jnp.max(nbr))
      far = jnp.max(r_row)
    p = jnp.where(r_col == r_row, p, 0.)
    w_q = jnp.where(r_col == edge, w_q, 0.)
    w_k = jnp.where(r_col == far, w_k, 0.)
    keep = jnp.where(far == edge, keep, 0.)
  state = state_ref[...]
  o = _dot(p.astype(dt), v) + _dot((q * w_q).astype(dt), state.astype(dt))
  o_ref[...] = (o * scale).astype(o_ref.dtype)
  state = keep * state + _dot((k * w_k).astype(dt), v, trans_a=True)
  state_ref[...] = state

  @pl.when(step == num_chunks - 1)
  def _():
    sT_ref[...] = state


def scan(q, k, v, log_decay, initial_state, runs=None, *, reverse: bool = False,
         scale: float = 1.0, block_sizes: BlockSizes = BlockSizes(), out_dtype=None,
         interpret: bool = False):
  """One direction of the linear scan on TPU (same contract as pallas_gpu.scan).

  Args:
    q, k: [B, T, H, Dk]; v: [B, T, H, Dv], one dtype. log_decay: [H] float32 <= 0.
    initial_state: [B, H, Dk, Dv] float32. runs: [B, T] int32 non-decreasing run ids or None.
    reverse: anti-causal direction. scale: multiplies o. out_dtype: dtype of o (default q's).
    interpret: run in the Pallas interpreter (how CPU tests verify this kernel).

  Returns:
    (o [B, T, H, Dv], final_state [B, H, Dk, Dv] float32).
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  chunk = block_sizes.chunk
  out_dtype = out_dtype or q.dtype
  q, k, v = (jnp.swapaxes(xla.pad_to_chunks(x, chunk), 1, 2) for x in (q, k, v))  # [B, H, Tp, D]
  padded = q.shape[2]
  n = padded // chunk
  has_runs = runs is not None

  def chunk_of(s):
    return n - 1 - s if reverse else s

  sq = pl.squeezed
  qk_spec = pl.BlockSpec((sq, sq, chunk, dk), lambda bi, hi, s: (bi, hi, chunk_of(s), 0))
  v_spec = pl.BlockSpec((sq, sq, chunk, dv), lambda bi, hi, s: (bi, hi, chunk_of(s), 0))
  state_spec = pl.BlockSpec((sq, sq, dk, dv), lambda bi, hi, s: (bi, hi, 0, 0))
  in_specs = [pl.BlockSpec(memory_space=pltpu.SMEM), qk_spec, qk_spec, v_spec, state_spec]
  args = [log_decay.astype(jnp.float32), q, k, v, initial_state.astype(jnp.float32)]
  if has_runs:
    padded_runs = xla.pad_runs(runs.astype(jnp.int32), chunk)
    step = 1 if reverse else -1  # the neighbour the carried state comes from

    def neighbour(bi, hi, s):
      return (bi, 0, jnp.clip(chunk_of(s) + step, 0, n - 1))

    in_specs += [pl.BlockSpec((sq, 1, chunk), lambda bi, hi, s: (bi, 0, chunk_of(s))),
                 pl.BlockSpec((sq, chunk, 1), lambda bi, hi, s: (bi, chunk_of(s), 0)),
                 pl.BlockSpec((sq, 1, chunk), neighbour)]
    args += [padded_runs[:, None, :], padded_runs[:, :, None], padded_runs[:, None, :]]
  kernel = functools.partial(_scan_kernel, length=t, chunk=chunk, num_chunks=n, reverse=reverse,
                             scale=float(scale), has_runs=has_runs)
  o, final = pl.pallas_call(
      kernel,
      grid=(b, h, n),
      in_specs=in_specs,
      out_specs=[v_spec, state_spec],
      out_shape=[jax.ShapeDtypeStruct((b, h, padded, dv), out_dtype),
                 jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="linear_scan_tpu_reverse" if reverse else "linear_scan_tpu",
  )(*args)
  return jnp.swapaxes(o, 1, 2)[:, :t], final
