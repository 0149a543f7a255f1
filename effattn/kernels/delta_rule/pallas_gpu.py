"""Pallas (Triton lowering) kernels of the chunked gated delta rule, forward and backward.

Four kernels, two parallel over every chunk and two that walk the chunks of one (row, head):

  delta_rule_wy      grid (N, B, H)       T = (I + A)^{-1} of each chunk, from k, b and the gates
  delta_rule_fwd     grid (Dv/bv, B, H)   chunks in order, the [Dk, bv] state in registers: o,
                                          the final state and (for the backward) each chunk's
                                          starting state
  delta_rule_dstate  grid (Dv/bv, B, H)   chunks in reverse: the cotangent of each chunk's
                                          final state
  delta_rule_bwd     grid (N, B, H)       every chunk's input gradients at once, walking Dv in
                                          blocks of bv columns

The per-chunk math is xla.py's, called verbatim. The triangular inverse is blocked (fla's
solve_tril layout): A's 16 x 16 diagonal blocks are inverted by forward substitution, the
off-diagonal blocks of the inverse follow from T_ij = -T_ii sum_{j<=m<i} A_im T_mj, all on
16-row tiles loaded from refs (Triton has no slicing of register values).

Layout [B, T, H, D] as given; gates [B, T, H] and masks [B, T] are read with strides; T is stored
as [B, Tp, H, C] (row t holds its chunk's row of T) and the per-chunk states as [B, H, N*Dk, Dv],
both in the compute dtype. The caller pads T to a multiple of the chunk (common.prepare).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effattn.kernels.delta_rule import xla
from effattn.kernels.delta_rule.common import Chunked
from effattn.kernels.memory_chunk.xla import dot

SUB = 16  # rows of the inverse's diagonal blocks (Triton's smallest dot)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and launch parameters (the chunk itself is api's chunk_size, a multiple of 16).

  block_v: Dv columns per program of the two chunk-walking kernels, and per step of the
    backward kernel's walk over Dv (clipped to Dv).
  num_warps / num_warps_wy / num_warps_bwd: Triton warps of the chunk-walking kernels, of the
    inverse and of the backward. num_stages: pipelining of the chunk loads.
  """

  block_v: int = 64
  num_warps: int = 4
  num_warps_wy: int = 2
  num_warps_bwd: int = 8
  num_stages: int = 2

  def __post_init__(self):
    if self.block_v < 16 or self.block_v & (self.block_v - 1):
      raise ValueError(f"BlockSizes.block_v={self.block_v} must be a power of two >= 16")
    for field in ("num_warps", "num_warps_wy", "num_warps_bwd"):
      if getattr(self, field) not in (1, 2, 4, 8, 16):
        raise ValueError(f"BlockSizes.{field}={getattr(self, field)} must be a power of two "
                         "<= 16")

  def value_block(self, dv: int) -> int:
    return self.block_v if dv % self.block_v == 0 else dv


def block_inverse(a: dict, nb: int) -> dict:
  """(I + A)^{-1} from the blocks a[(i, j)], i >= j, of a strictly lower-triangular A (nb x nb
  blocks): the inverse's blocks for i >= j (the rest are zero)."""
  inv = {(i, i): xla.forward_substitution(a[(i, i)]) for i in range(nb)}
  for d in range(1, nb):  # by distance from the diagonal: each needs only nearer blocks
    for i in range(d, nb):
      j = i - d
      acc = functools.reduce(jnp.add, [dot(a[(i, m)], inv[(m, j)]) for m in range(j, i)])
      inv[(i, j)] = -dot(inv[(i, i)], acc)
  return inv


def _wy_kernel(k_ref, beta_ref, g_ref, *refs, chunk: int, dtype, has_runs: bool):
  """k_ref [C, Dk]; beta_ref, g_ref [C]; runs_ref [C]; tinv_ref [C, C]."""
  runs_ref, tinv_ref = refs if has_runs else (None, refs[0])
  nb = chunk // SUB
  rows = [pl.ds(i * SUB, SUB) for i in range(nb)]
  ks = [k_ref[r, :] for r in rows]
  betas = [beta_ref[r] for r in rows]
  gs = [g_ref[r] for r in rows]
  runs = [runs_ref[r] if has_runs else None for r in rows]
  a = {(i, j): xla.wy_block(ks[i], ks[j], betas[i], gs[i], gs[j], runs[i], runs[j],
                            diagonal=i == j, dtype=dtype)
       for i in range(nb) for j in range(i + 1)}
  inv = block_inverse(a, nb)
  zeros = jnp.zeros((SUB, SUB), jnp.float32)
  for i in range(nb):
    for j in range(nb):
      tinv_ref[rows[i], rows[j]] = inv.get((i, j), zeros).astype(tinv_ref.dtype)


def _chunk_refs(refs, start, chunk):
  """The chunk [start, start + C) of token refs (2-d: rows; 1-d: entries; None stays None)."""
  out = []
  for r in refs:
    if r is None:
      out.append(None)
    else:
      out.append(r[pl.ds(start, chunk), :] if len(r.shape) == 2 else r[pl.ds(start, chunk)])
  return out


def _split_masks(refs, has_runs):
  """(runs, carry, tail refs or Nones, the remaining refs)."""
  if has_runs:
    return list(refs[:3]), refs[3:]
  return [None] * 3, refs


def _fwd_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, tinv_ref, s0_ref, *refs, chunk: int,
                scale: float, dtype, has_runs: bool, save_states: bool):
  """q_ref, k_ref [Tp, Dk]; v_ref [Tp, bv]; beta_ref, g_ref [Tp]; tinv_ref [Tp, C]; s0_ref
  [Dk, bv]; masks [Tp]; outputs o_ref [Tp, bv], sT_ref [Dk, bv], states_ref [N*Dk, bv]."""
  masks, outs = _split_masks(refs, has_runs)
  o_ref, sT_ref = outs[:2]
  dk = q_ref.shape[1]

  def body(c, state):
    start = pl.multiple_of(c * chunk, chunk)
    q, k, v, beta, g, tinv, runs, carry, tail = _chunk_refs(
        (q_ref, k_ref, v_ref, beta_ref, g_ref, tinv_ref, *masks), start, chunk)
    if save_states:
      outs[2][pl.ds(c * dk, dk), :] = state.astype(outs[2].dtype)
    ctx = xla.chunk_setup(q, k, beta, g, tinv, runs, carry, tail, dtype=dtype)
    o, state = xla.chunk_forward(ctx, v, state, dtype=dtype)
    o_ref[pl.ds(start, chunk), :] = (scale * o).astype(o_ref.dtype)
    return state

  num_chunks = q_ref.shape[0] // chunk
  sT_ref[...] = jax.lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def _dstate_kernel(q_ref, k_ref, beta_ref, g_ref, tinv_ref, do_ref, dsT_ref, *refs, chunk: int,
                   scale: float, dtype, has_runs: bool):
  """Inputs as _fwd_kernel's plus do_ref [Tp, bv], dsT_ref [Dk, bv]; outputs ds0_ref [Dk, bv]
  and dstates_ref [N*Dk, bv] (cotangent of the state leaving each chunk)."""
  masks, (ds0_ref, dstates_ref) = _split_masks(refs, has_runs)
  dk = q_ref.shape[1]
  num_chunks = q_ref.shape[0] // chunk

  def body(step, ds):
    c = num_chunks - 1 - step
    start = pl.multiple_of(c * chunk, chunk)
    q, k, beta, g, tinv, do, runs, carry, tail = _chunk_refs(
        (q_ref, k_ref, beta_ref, g_ref, tinv_ref, do_ref, *masks), start, chunk)
    dstates_ref[pl.ds(c * dk, dk), :] = ds.astype(dstates_ref.dtype)
    ctx = xla.chunk_setup(q, k, beta, g, tinv, runs, carry, tail, dtype=dtype)
    return xla.chunk_dstate(ctx, scale * do.astype(jnp.float32), ds, dtype=dtype)

  ds0_ref[...] = jax.lax.fori_loop(0, num_chunks, body, dsT_ref[...].astype(jnp.float32))


def _bwd_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, tinv_ref, do_ref, s_ref, ds_ref, *refs,
                scale: float, block_v: int, dtype, has_runs: bool):
  """One chunk: q_ref, k_ref [C, Dk]; v_ref, do_ref [C, Dv]; beta_ref, g_ref [C]; tinv_ref
  [C, C]; s_ref, ds_ref [Dk, Dv]; masks [C]; outputs dq, dk [C, Dk], dv [C, Dv], dbeta, dg [C]."""
  masks, (dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref) = _split_masks(refs, has_runs)
  runs, carry, tail = (None if m is None else m[...] for m in masks)
  ctx = xla.chunk_setup(q_ref[...], k_ref[...], beta_ref[...], g_ref[...], tinv_ref[...], runs,
                        carry, tail, dtype=dtype)
  acc = None
  for j in range(v_ref.shape[1] // block_v):  # Dv in blocks: the partial sums add up
    cols = pl.ds(j * block_v, block_v)
    dv, partial = xla.chunk_backward_block(
        ctx, v_ref[:, cols], scale * do_ref[:, cols].astype(jnp.float32),
        s_ref[:, cols].astype(jnp.float32), ds_ref[:, cols].astype(jnp.float32), dtype=dtype)
    dv_ref[:, cols] = dv
    acc = xla.accumulate(acc, partial)
  dq, dk, dbeta, dg = xla.chunk_backward_finish(ctx, acc, dtype=dtype)
  dq_ref[...], dk_ref[...], dbeta_ref[...], dg_ref[...] = dq, dk, dbeta, dg


# -- wrappers -------------------------------------------------------------------------------------


def _mask_args(x: Chunked):
  return [] if x.runs is None else [x.runs.astype(jnp.int32), x.carry, x.tail]


def _params(num_warps, num_stages=1):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _per_chunk_specs(chunk, has_runs):
  """BlockSpecs over grid (N, B, H) for one chunk of [B, Tp, H, D], [B, Tp, H] and [B, Tp]."""
  sq = pl.squeezed
  tok = lambda d: pl.BlockSpec((sq, chunk, sq, d), lambda n, b, h: (b, n, h, 0))
  gate = pl.BlockSpec((sq, chunk, sq), lambda n, b, h: (b, n, h))
  masks = [pl.BlockSpec((sq, chunk), lambda n, b, h: (b, n))] * (3 if has_runs else 0)
  return tok, gate, masks


def _walk_specs(padded, dk, has_runs, block_v):
  """BlockSpecs over grid (Dv/bv, B, H): whole-sequence token refs of one (row, head)."""
  sq = pl.squeezed
  tok = lambda d: pl.BlockSpec((sq, padded, sq, d), lambda vi, b, h: (b, 0, h, 0))
  cols = pl.BlockSpec((sq, padded, sq, block_v), lambda vi, b, h: (b, 0, h, vi))
  gate = pl.BlockSpec((sq, padded, sq), lambda vi, b, h: (b, 0, h))
  state = lambda rows: pl.BlockSpec((sq, sq, rows, block_v), lambda vi, b, h: (b, h, 0, vi))
  masks = [pl.BlockSpec((sq, padded), lambda vi, b, h: (b, 0))] * (3 if has_runs else 0)
  return tok, cols, gate, state, masks


def inverses(x: Chunked, *, chunk: int, dtype, block_sizes: BlockSizes, interpret: bool):
  """T = (I + A)^{-1} of every chunk as [B, Tp, H, C] in `dtype`."""
  b, padded, h, dk = x.k.shape
  has_runs = x.runs is not None
  tok, gate, masks = _per_chunk_specs(chunk, has_runs)
  return pl.pallas_call(
      functools.partial(_wy_kernel, chunk=chunk, dtype=dtype, has_runs=has_runs),
      grid=(padded // chunk, b, h),
      in_specs=[tok(dk), gate, gate] + masks[:1],
      out_specs=tok(chunk),
      out_shape=jax.ShapeDtypeStruct((b, padded, h, chunk), dtype),
      compiler_params=_params(block_sizes.num_warps_wy),
      interpret=interpret,
      name="delta_rule_wy",
  )(x.k, x.beta, x.gcum, *_mask_args(x)[:1])


def forward(x: Chunked, s0, *, chunk: int, scale: float, dtype, out_dtype,
            block_sizes: BlockSizes = BlockSizes(), interpret: bool = False,
            save_states: bool = True):
  """Same contract as xla.forward, with o in out_dtype and residuals (T [B, Tp, H, C], states
  [B, H, N*Dk, Dv]) in `dtype`."""
  b, padded, h, dk = x.q.shape
  dv = x.v.shape[-1]
  n = padded // chunk
  bv = block_sizes.value_block(dv)
  has_runs = x.runs is not None
  tinv = inverses(x, chunk=chunk, dtype=dtype, block_sizes=block_sizes, interpret=interpret)
  tok, cols, gate, state, masks = _walk_specs(padded, dk, has_runs, bv)
  out_specs = [cols, state(dk)]
  out_shape = [jax.ShapeDtypeStruct((b, padded, h, dv), out_dtype),
               jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)]
  if save_states:
    out_specs.append(state(n * dk))
    out_shape.append(jax.ShapeDtypeStruct((b, h, n * dk, dv), dtype))
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, chunk=chunk, scale=float(scale), dtype=dtype,
                        has_runs=has_runs, save_states=save_states),
      grid=(dv // bv, b, h),
      in_specs=[tok(dk), tok(dk), cols, gate, gate, tok(chunk), state(dk)] + masks,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(block_sizes.num_warps, block_sizes.num_stages),
      interpret=interpret,
      name="delta_rule_fwd",
  )(x.q, x.k, x.v, x.beta, x.gcum, tinv, s0.astype(jnp.float32), *_mask_args(x))
  return outs[0], outs[1], ((tinv, outs[2]) if save_states else None)


def backward(x: Chunked, residuals, do, dfinal, *, chunk: int, scale: float, dtype,
             block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """Same contract as xla.backward."""
  tinv, states = residuals
  b, padded, h, dk = x.q.shape
  dv = x.v.shape[-1]
  n = padded // chunk
  bv = block_sizes.value_block(dv)
  has_runs = x.runs is not None
  tok, cols, gate, state, masks = _walk_specs(padded, dk, has_runs, bv)
  ds0, dstates = pl.pallas_call(
      functools.partial(_dstate_kernel, chunk=chunk, scale=float(scale), dtype=dtype,
                        has_runs=has_runs),
      grid=(dv // bv, b, h),
      in_specs=[tok(dk), tok(dk), gate, gate, tok(chunk), cols, state(dk)] + masks,
      out_specs=[state(dk), state(n * dk)],
      out_shape=[jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, n * dk, dv), dtype)],
      compiler_params=_params(block_sizes.num_warps, block_sizes.num_stages),
      interpret=interpret,
      name="delta_rule_dstate",
  )(x.q, x.k, x.beta, x.gcum, tinv, do, dfinal.astype(jnp.float32), *_mask_args(x))

  tok, gate, masks = _per_chunk_specs(chunk, has_runs)
  sq = pl.squeezed
  state = pl.BlockSpec((sq, sq, dk, dv), lambda n_, b_, h_: (b_, h_, n_, 0))
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  dq, dk_, dv_, dbeta, dg = pl.pallas_call(
      functools.partial(_bwd_kernel, scale=float(scale), block_v=bv, dtype=dtype,
                        has_runs=has_runs),
      grid=(n, b, h),
      in_specs=[tok(dk), tok(dk), tok(dv), gate, gate, tok(chunk), tok(dv), state, state] + masks,
      out_specs=[tok(dk), tok(dk), tok(dv), gate, gate],
      out_shape=[f32(b, padded, h, dk), f32(b, padded, h, dk), f32(b, padded, h, dv),
                 f32(b, padded, h), f32(b, padded, h)],
      compiler_params=_params(block_sizes.num_warps_bwd),
      interpret=interpret,
      name="delta_rule_bwd",
  )(x.q, x.k, x.v, x.beta, x.gcum, tinv, do, states, dstates, *_mask_args(x))
  return dq, dk_, dv_, dbeta, dg, ds0
