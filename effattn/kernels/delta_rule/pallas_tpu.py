"""Pallas (Mosaic TPU) kernels of the chunked gated delta rule, forward and backward.

The same six kernels as pallas_gpu.py (xla.py's three passes, forward and backward), on grid
(B, H, N): the four per-chunk kernels with every axis parallel, the two walks with the chunk
axis sequential ("arbitrary"), carrying the [Dk, Dv] state in a VMEM scratch buffer. Every grid
step receives its chunk through BlockSpecs (Pallas double-buffers the copies). The per-chunk
math is xla.py's; the inverse is xla.chunk_inverse on the whole C x C tile (VMEM holds it; no
16-row blocking as on the GPU). Full Dv per program.

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


def _masks(refs, count, has_runs):
  """(the first `count` refs as [C] mask values, or Nones; the remaining refs)."""
  return (_rows(refs[:count]), refs[count:]) if has_runs else ([None] * count, refs)


def _wy_kernel(k_ref, v_ref, beta_ref, g_ref, *refs, dtype, has_runs):
  (runs, carry), (tinv_ref, w_ref, u_ref) = _masks(refs, 2, has_runs)
  beta, g = _rows([beta_ref, g_ref])
  k = k_ref[...]
  tinv = xla.chunk_inverse(k, beta, g, runs, dtype=dtype)
  gq = jnp.exp(g) if carry is None else jnp.exp(g) * carry
  w, u = xla.chunk_wy(tinv, k, v_ref[...], beta, gq, dtype=dtype)
  tinv_ref[...] = tinv.astype(tinv_ref.dtype)
  w_ref[...], u_ref[...] = w.astype(w_ref.dtype), u.astype(u_ref.dtype)


def _fwd_kernel(k_ref, w_ref, u_ref, g_ref, s0_ref, *refs, dtype, has_runs):
  (carry, tail), (delta_ref, sT_ref, saved_ref, state_ref) = _masks(refs, 2, has_runs)
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    state_ref[...] = s0_ref[...]

  state = state_ref[...]
  saved_ref[...] = state.astype(saved_ref.dtype)
  _, omega, keep = xla.state_gates(_rows([g_ref])[0], carry, tail)
  delta, state = xla.walk_forward(k_ref[...], omega, keep, w_ref[...], u_ref[...], state,
                                  dtype=dtype)
  delta_ref[...] = delta.astype(delta_ref.dtype)
  state_ref[...] = state

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    sT_ref[...] = state


def _scores(q_ref, k_ref, g_ref, masks, dtype):
  runs, carry, tail = masks
  g = _rows([g_ref])[0]
  gq, _, _ = xla.state_gates(g, carry, tail)
  decay = xla.block_decay(g, g, runs, runs, diagonal=True)
  return xla.scores(q_ref[...], k_ref[...], decay, dtype=dtype), gq


def _out_kernel(q_ref, k_ref, g_ref, delta_ref, s_ref, *refs, scale, dtype, has_runs):
  masks, (o_ref,) = _masks(refs, 3, has_runs)
  p, gq = _scores(q_ref, k_ref, g_ref, masks, dtype)
  o = xla.chunk_output(q_ref[...], p, gq, delta_ref[...], s_ref[...].astype(jnp.float32),
                       dtype=dtype)
  o_ref[...] = (scale * o).astype(o_ref.dtype)


def _prep_kernel(q_ref, k_ref, beta_ref, g_ref, tinv_ref, do_ref, *refs, scale, dtype,
                 has_runs):
  masks, (w_ref, dlocal_ref) = _masks(refs, 3, has_runs)
  p, gq = _scores(q_ref, k_ref, g_ref, masks, dtype)
  beta = _rows([beta_ref])[0]
  w_ref[...] = xla.chunk_w(tinv_ref[...], k_ref[...], beta, gq, dtype=dtype).astype(w_ref.dtype)
  dlocal = xla.chunk_dlocal(p, scale * do_ref[...].astype(jnp.float32), dtype=dtype)
  dlocal_ref[...] = dlocal.astype(dlocal_ref.dtype)


def _dstate_kernel(q_ref, k_ref, w_ref, g_ref, dlocal_ref, do_ref, dsT_ref, *refs, scale, dtype,
                   has_runs):
  (carry, tail), (ddelta_ref, ds0_ref, saved_ref, ds_ref) = _masks(refs, 2, has_runs)
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    ds_ref[...] = dsT_ref[...]

  ds = ds_ref[...]
  saved_ref[...] = ds.astype(saved_ref.dtype)
  gq, omega, keep = xla.state_gates(_rows([g_ref])[0], carry, tail)
  ddelta, ds = xla.walk_backward(q_ref[...], k_ref[...], gq, omega, keep, w_ref[...],
                                 dlocal_ref[...].astype(jnp.float32),
                                 scale * do_ref[...].astype(jnp.float32), ds, dtype=dtype)
  ddelta_ref[...] = ddelta.astype(ddelta_ref.dtype)
  ds_ref[...] = ds

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    ds0_ref[...] = ds


def _bwd_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, tinv_ref, w_ref, do_ref, s_ref, ds_ref,
                ddelta_ref, *refs, scale, dtype, has_runs):
  (runs, carry, tail), (dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref) = _masks(refs, 3, has_runs)
  beta, g = _rows([beta_ref, g_ref])
  ctx = xla.backward_setup(q_ref[...], k_ref[...], beta, g, tinv_ref[...], w_ref[...], runs,
                           carry, tail)
  dv, partial = xla.chunk_backward_block(
      ctx, v_ref[...], scale * do_ref[...].astype(jnp.float32), s_ref[...].astype(jnp.float32),
      ds_ref[...].astype(jnp.float32), ddelta_ref[...].astype(jnp.float32), dtype=dtype)
  dq, dk, dbeta, dg = xla.chunk_backward_finish(ctx, partial, dtype=dtype)
  dq_ref[...], dk_ref[...] = dq.astype(dq_ref.dtype), dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dbeta_ref[...], dg_ref[...] = dbeta[None], dg[None]


# -- wrappers -------------------------------------------------------------------------------------


def _layout(x: Chunked, chunk: int):
  """Tokens [B, H, Tp, D]; beta, gcum [B, H, N, 1, C]; masks [B, N, 1, C] (runs, carry, tail)."""
  b, padded, h, _ = x.q.shape
  n = padded // chunk
  heads = [jnp.swapaxes(a, 1, 2) for a in (x.q, x.k, x.v)]
  gates = [jnp.swapaxes(a, 1, 2).reshape(b, h, n, 1, chunk) for a in (x.beta, x.gcum)]
  masks = [] if x.runs is None else [a.reshape(b, n, 1, chunk)
                                     for a in (x.runs.astype(jnp.int32), x.carry, x.tail)]
  return heads, gates, masks


class _Specs:
  """BlockSpecs over grid (B, H, N), the chunk axis optionally walked in reverse."""

  def __init__(self, chunk, has_runs, reverse=False):
    sq = pl.squeezed
    at = (lambda s: pl.num_programs(2) - 1 - s) if reverse else (lambda s: s)
    self.tok = lambda d: pl.BlockSpec((sq, sq, chunk, d), lambda b, h, s: (b, h, at(s), 0))
    self.gate = pl.BlockSpec((sq, sq, sq, 1, chunk), lambda b, h, s: (b, h, at(s), 0, 0))
    self.masks = [pl.BlockSpec((sq, sq, 1, chunk), lambda b, h, s: (b, at(s), 0, 0))] * (
        3 if has_runs else 0)
    self.chunk = lambda r, c: pl.BlockSpec((sq, sq, sq, r, c),
                                           lambda b, h, s: (b, h, at(s), 0, 0))
    self.state = lambda dk, dv: pl.BlockSpec((sq, sq, dk, dv), lambda b, h, s: (b, h, 0, 0))


def _call(kernel, name, grid, *, walk, interpret, in_specs, out_specs, out_shape, scratch=(),
          **static):
  semantics = ("parallel", "parallel", "arbitrary" if walk else "parallel")
  return pl.pallas_call(
      functools.partial(kernel, **static), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, scratch_shapes=list(scratch),
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics), interpret=interpret,
      name=name)


def _shape(shape, dtype):
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def forward(x: Chunked, s0, *, chunk: int, scale: float, dtype, out_dtype,
            block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """Same contract as xla.forward, with o in out_dtype and residuals (T [B, H, N, C, C],
  states [B, H, N, Dk, Dv]) in `dtype`."""
  del block_sizes
  b, padded, h, dk = x.q.shape
  dv = x.v.shape[-1]
  n = padded // chunk
  has_runs = x.runs is not None
  (q, k, v), (beta, g), masks = _layout(x, chunk)
  sp = _Specs(chunk, has_runs)
  grid = (b, h, n)
  common = dict(interpret=interpret, dtype=dtype, has_runs=has_runs)
  tinv, w, u = _call(
      _wy_kernel, "delta_rule_tpu_wy", grid, walk=False,
      in_specs=[sp.tok(dk), sp.tok(dv), sp.gate, sp.gate] + sp.masks[:2],
      out_specs=[sp.chunk(chunk, chunk), sp.tok(dk), sp.tok(dv)],
      out_shape=[_shape((b, h, n, chunk, chunk), dtype), _shape(k.shape, dtype),
                 _shape(v.shape, dtype)], **common)(k, v, beta, g, *masks[:2])
  delta, final, states = _call(
      _fwd_kernel, "delta_rule_tpu_fwd", grid, walk=True,
      in_specs=[sp.tok(dk), sp.tok(dk), sp.tok(dv), sp.gate, sp.state(dk, dv)] + sp.masks[1:],
      out_specs=[sp.tok(dv), sp.state(dk, dv), sp.chunk(dk, dv)],
      out_shape=[_shape(v.shape, dtype), _shape((b, h, dk, dv), jnp.float32),
                 _shape((b, h, n, dk, dv), dtype)],
      scratch=[pltpu.VMEM((dk, dv), jnp.float32)], **common)(
          k, w, u, g, s0.astype(jnp.float32), *masks[1:])
  o = _call(
      _out_kernel, "delta_rule_tpu_out", grid, walk=False, scale=float(scale),
      in_specs=[sp.tok(dk), sp.tok(dk), sp.gate, sp.tok(dv), sp.chunk(dk, dv)] + sp.masks,
      out_specs=sp.tok(dv), out_shape=_shape(v.shape, out_dtype), **common)(
          q, k, g, delta, states, *masks)
  return jnp.swapaxes(o, 1, 2), final, (tinv, states)


def backward(x: Chunked, residuals, do, dfinal, *, chunk: int, scale: float, dtype,
             block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """Same contract as xla.backward, except dq, dk, dv in the dtype of q, k, v."""
  del block_sizes
  tinv, states = residuals
  b, padded, h, dk = x.q.shape
  dv = x.v.shape[-1]
  n = padded // chunk
  has_runs = x.runs is not None
  (q, k, v), (beta, g), masks = _layout(x, chunk)
  do = jnp.swapaxes(do, 1, 2)
  sp, rev = _Specs(chunk, has_runs), _Specs(chunk, has_runs, reverse=True)
  grid = (b, h, n)
  common = dict(interpret=interpret, dtype=dtype, has_runs=has_runs, scale=float(scale))
  w, dlocal = _call(
      _prep_kernel, "delta_rule_tpu_bwd_prep", grid, walk=False,
      in_specs=[sp.tok(dk), sp.tok(dk), sp.gate, sp.gate, sp.chunk(chunk, chunk),
                sp.tok(dv)] + sp.masks,
      out_specs=[sp.tok(dk), sp.tok(dv)],
      out_shape=[_shape(k.shape, dtype), _shape(v.shape, dtype)], **common)(
          q, k, beta, g, tinv, do, *masks)
  ddelta, ds0, dstates = _call(
      _dstate_kernel, "delta_rule_tpu_dstate", grid, walk=True,
      in_specs=[rev.tok(dk), rev.tok(dk), rev.tok(dk), rev.gate, rev.tok(dv), rev.tok(dv),
                rev.state(dk, dv)] + rev.masks[1:],
      out_specs=[rev.tok(dv), rev.state(dk, dv), rev.chunk(dk, dv)],
      out_shape=[_shape(v.shape, dtype), _shape((b, h, dk, dv), jnp.float32),
                 _shape((b, h, n, dk, dv), dtype)],
      scratch=[pltpu.VMEM((dk, dv), jnp.float32)], **common)(
          q, k, w, g, dlocal, do, dfinal.astype(jnp.float32), *masks[1:])
  f32 = lambda a: _shape(a.shape, jnp.float32)
  dq, dk_, dv_, dbeta, dg = _call(
      _bwd_kernel, "delta_rule_tpu_bwd", grid, walk=False,
      in_specs=[sp.tok(dk), sp.tok(dk), sp.tok(dv), sp.gate, sp.gate, sp.chunk(chunk, chunk),
                sp.tok(dk), sp.tok(dv), sp.chunk(dk, dv), sp.chunk(dk, dv),
                sp.tok(dv)] + sp.masks,
      out_specs=[sp.tok(dk), sp.tok(dk), sp.tok(dv), sp.gate, sp.gate],
      out_shape=[_shape(q.shape, q.dtype), _shape(k.shape, k.dtype), _shape(v.shape, v.dtype),
                 f32(beta), f32(g)], **common)(
          q, k, v, beta, g, tinv, w, do, states, dstates, ddelta, *masks)
  heads = [jnp.swapaxes(a, 1, 2) for a in (dq, dk_, dv_)]
  scalars = [jnp.swapaxes(a.reshape(b, h, padded), 1, 2) for a in (dbeta, dg)]
  return (*heads, *scalars, ds0)
