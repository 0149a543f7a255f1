"""Pallas (Mosaic TPU) kernels of the chunked gated delta rule, forward and backward.

The same four kernels as pallas_gpu.py, on grid (B, H, N): the inverse T = (I + A)^{-1} and the
backward's per-chunk gradients with every axis parallel; the forward and the state-cotangent
walk with the chunk axis sequential ("arbitrary"), carrying the [Dk, Dv] state in a VMEM scratch
buffer and receiving one chunk per grid step through BlockSpecs (Pallas double-buffers the
copies). The per-chunk math is xla.py's; the inverse is xla.forward_substitution on the whole
C x C tile (VMEM holds it; no 16-row blocking as on the GPU). Full Dv per program.

TPU tiles want the last two block dims to be (8k, 128k) or full, so the wrapper works on
[B, H, Tp, D] and passes per-token scalars as [B, H, N, 1, C] rows and masks as [B, N, 1, C].
Verified against reference.py in interpret mode on CPU and by lowering for TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effattn.kernels.delta_rule import xla
from effattn.kernels.delta_rule.common import Chunked


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """No tunables beyond the chunk (api's chunk_size, a multiple of 8 on TPU)."""


def _rows(refs):
  """[1, C] refs -> [C] values; None stays None."""
  return [None if r is None else r[...][0] for r in refs]


def _split_masks(refs, has_runs):
  if has_runs:
    return list(refs[:3]), refs[3:]
  return [None] * 3, refs


def _setup(q_ref, k_ref, beta_ref, g_ref, tinv_ref, masks, dtype):
  beta, g, runs, carry, tail = _rows([beta_ref, g_ref, *masks])
  return xla.chunk_setup(q_ref[...], k_ref[...], beta, g, tinv_ref[...], runs, carry, tail,
                         dtype=dtype)


def _wy_kernel(k_ref, beta_ref, g_ref, *refs, dtype, has_runs):
  runs_ref, tinv_ref = refs if has_runs else (None, refs[0])
  beta, g, runs = _rows([beta_ref, g_ref, runs_ref])
  a = xla.wy_block(k_ref[...], k_ref[...], beta, g, g, runs, runs, diagonal=True, dtype=dtype)
  tinv_ref[...] = xla.forward_substitution(a).astype(tinv_ref.dtype)


def _fwd_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, tinv_ref, s0_ref, *refs, scale, dtype,
                has_runs):
  masks, (o_ref, sT_ref, saved_ref, state_ref) = _split_masks(refs, has_runs)
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    state_ref[...] = s0_ref[...]

  state = state_ref[...]
  saved_ref[...] = state.astype(saved_ref.dtype)
  ctx = _setup(q_ref, k_ref, beta_ref, g_ref, tinv_ref, masks, dtype)
  o, state = xla.chunk_forward(ctx, v_ref[...], state, dtype=dtype)
  o_ref[...] = (scale * o).astype(o_ref.dtype)
  state_ref[...] = state

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    sT_ref[...] = state


def _dstate_kernel(q_ref, k_ref, beta_ref, g_ref, tinv_ref, do_ref, dsT_ref, *refs, scale, dtype,
                   has_runs):
  masks, (ds0_ref, saved_ref, ds_ref) = _split_masks(refs, has_runs)
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    ds_ref[...] = dsT_ref[...]

  ds = ds_ref[...]
  saved_ref[...] = ds.astype(saved_ref.dtype)
  ctx = _setup(q_ref, k_ref, beta_ref, g_ref, tinv_ref, masks, dtype)
  ds = xla.chunk_dstate(ctx, scale * do_ref[...].astype(jnp.float32), ds, dtype=dtype)
  ds_ref[...] = ds

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    ds0_ref[...] = ds


def _bwd_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, tinv_ref, do_ref, s_ref, ds_ref, *refs,
                scale, dtype, has_runs):
  masks, (dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref) = _split_masks(refs, has_runs)
  ctx = _setup(q_ref, k_ref, beta_ref, g_ref, tinv_ref, masks, dtype)
  dv, partial = xla.chunk_backward_block(
      ctx, v_ref[...], scale * do_ref[...].astype(jnp.float32),
      s_ref[...].astype(jnp.float32), ds_ref[...].astype(jnp.float32), dtype=dtype)
  dq, dk, dbeta, dg = xla.chunk_backward_finish(ctx, partial, dtype=dtype)
  dq_ref[...], dk_ref[...], dv_ref[...] = dq, dk, dv
  dbeta_ref[...], dg_ref[...] = dbeta[None], dg[None]


# -- wrappers -------------------------------------------------------------------------------------


def _layout(x: Chunked, chunk: int):
  """Tokens [B, H, Tp, D]; beta, gcum [B, H, N, 1, C]; masks [B, N, 1, C]."""
  b, padded, h, _ = x.q.shape
  n = padded // chunk
  heads = [jnp.swapaxes(a, 1, 2) for a in (x.q, x.k, x.v)]
  gates = [jnp.swapaxes(a, 1, 2).reshape(b, h, n, 1, chunk) for a in (x.beta, x.gcum)]
  masks = [] if x.runs is None else [a.reshape(b, n, 1, chunk)
                                     for a in (x.runs.astype(jnp.int32), x.carry, x.tail)]
  return heads, gates, masks


def _specs(chunk, has_runs, reverse=False):
  sq = pl.squeezed
  at = (lambda s: pl.num_programs(2) - 1 - s) if reverse else (lambda s: s)
  tok = lambda d: pl.BlockSpec((sq, sq, chunk, d), lambda b, h, s: (b, h, at(s), 0))
  gate = pl.BlockSpec((sq, sq, sq, 1, chunk), lambda b, h, s: (b, h, at(s), 0, 0))
  masks = [pl.BlockSpec((sq, sq, 1, chunk), lambda b, h, s: (b, at(s), 0, 0))] * (
      3 if has_runs else 0)
  per_chunk = lambda r, c: pl.BlockSpec((sq, sq, sq, r, c), lambda b, h, s: (b, h, at(s), 0, 0))
  state = lambda dk, dv: pl.BlockSpec((sq, sq, dk, dv), lambda b, h, s: (b, h, 0, 0))
  return tok, gate, masks, per_chunk, state


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def forward(x: Chunked, s0, *, chunk: int, scale: float, dtype, out_dtype,
            block_sizes: BlockSizes = BlockSizes(), interpret: bool = False,
            save_states: bool = True):
  """Same contract as xla.forward, with o in out_dtype and residuals (T [B, H, N, C, C],
  states [B, H, N, Dk, Dv]) in `dtype` (always saved: every grid step writes its block)."""
  del block_sizes, save_states
  b, padded, h, dk = x.q.shape
  dv = x.v.shape[-1]
  n = padded // chunk
  has_runs = x.runs is not None
  (q, k, v), gates, masks = _layout(x, chunk)
  tok, gate, mask_specs, per_chunk, state = _specs(chunk, has_runs)
  tinv = pl.pallas_call(
      functools.partial(_wy_kernel, dtype=dtype, has_runs=has_runs),
      grid=(b, h, n),
      in_specs=[tok(dk), gate, gate] + mask_specs[:1],
      out_specs=per_chunk(chunk, chunk),
      out_shape=jax.ShapeDtypeStruct((b, h, n, chunk, chunk), dtype),
      compiler_params=_params("parallel", "parallel", "parallel"),
      interpret=interpret,
      name="delta_rule_tpu_wy",
  )(k, *gates, *masks[:1])
  f32 = jnp.float32
  o, final, states = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=float(scale), dtype=dtype, has_runs=has_runs),
      grid=(b, h, n),
      in_specs=[tok(dk), tok(dk), tok(dv), gate, gate, per_chunk(chunk, chunk),
                state(dk, dv)] + mask_specs,
      out_specs=[tok(dv), state(dk, dv), per_chunk(dk, dv)],
      out_shape=[jax.ShapeDtypeStruct((b, h, padded, dv), out_dtype),
                 jax.ShapeDtypeStruct((b, h, dk, dv), f32),
                 jax.ShapeDtypeStruct((b, h, n, dk, dv), dtype)],
      scratch_shapes=[pltpu.VMEM((dk, dv), f32)],
      compiler_params=_params("parallel", "parallel", "arbitrary"),
      interpret=interpret,
      name="delta_rule_tpu_fwd",
  )(q, k, v, *gates, tinv, s0.astype(f32), *masks)
  return jnp.swapaxes(o, 1, 2), final, (tinv, states)


def backward(x: Chunked, residuals, do, dfinal, *, chunk: int, scale: float, dtype,
             block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """Same contract as xla.backward."""
  del block_sizes
  tinv, states = residuals
  b, padded, h, dk = x.q.shape
  dv = x.v.shape[-1]
  n = padded // chunk
  has_runs = x.runs is not None
  (q, k, v), gates, masks = _layout(x, chunk)
  do = jnp.swapaxes(do, 1, 2)
  f32 = jnp.float32
  tok, gate, mask_specs, per_chunk, state = _specs(chunk, has_runs, reverse=True)
  ds0, dstates = pl.pallas_call(
      functools.partial(_dstate_kernel, scale=float(scale), dtype=dtype, has_runs=has_runs),
      grid=(b, h, n),
      in_specs=[tok(dk), tok(dk), gate, gate, per_chunk(chunk, chunk), tok(dv),
                state(dk, dv)] + mask_specs,
      out_specs=[state(dk, dv), per_chunk(dk, dv)],
      out_shape=[jax.ShapeDtypeStruct((b, h, dk, dv), f32),
                 jax.ShapeDtypeStruct((b, h, n, dk, dv), dtype)],
      scratch_shapes=[pltpu.VMEM((dk, dv), f32)],
      compiler_params=_params("parallel", "parallel", "arbitrary"),
      interpret=interpret,
      name="delta_rule_tpu_dstate",
  )(q, k, *gates, tinv, do, dfinal.astype(f32), *masks)
  tok, gate, mask_specs, per_chunk, _ = _specs(chunk, has_runs)
  shape = lambda *s: jax.ShapeDtypeStruct(s, f32)
  dq, dk_, dv_, dbeta, dg = pl.pallas_call(
      functools.partial(_bwd_kernel, scale=float(scale), dtype=dtype, has_runs=has_runs),
      grid=(b, h, n),
      in_specs=[tok(dk), tok(dk), tok(dv), gate, gate, per_chunk(chunk, chunk), tok(dv),
                per_chunk(dk, dv), per_chunk(dk, dv)] + mask_specs,
      out_specs=[tok(dk), tok(dk), tok(dv), gate, gate],
      out_shape=[shape(b, h, padded, dk), shape(b, h, padded, dk), shape(b, h, padded, dv),
                 shape(b, h, n, 1, chunk), shape(b, h, n, 1, chunk)],
      compiler_params=_params("parallel", "parallel", "parallel"),
      interpret=interpret,
      name="delta_rule_tpu_bwd",
  )(q, k, v, *gates, tinv, do, states, dstates, *masks)
  heads = [jnp.swapaxes(a, 1, 2) for a in (dq, dk_, dv_)]
  scalars = [jnp.swapaxes(a.reshape(b, h, padded), 1, 2) for a in (dbeta, dg)]
  return (*heads, *scalars, ds0)
