"""Landmark grouped softmax as flash-style Pallas kernels with the Triton lowering (GPU).

Inputs are in the group-tiled layout built by api.py: group g of a row occupies the slots
[g * Lt, g * Lt + len[g]) of an [B, N = G * Lt, H, D] array (slots past len[g] are zero), so a
key tile is exactly one group and everything about an earlier group (its within-group softmax,
its value summary o_bar, its landmark) is local to one tile. Per group: len [B, Gp] tokens,
first [B, Gp] the first group of its segment, last [B, Gp] the last group of its segment
(Gp >= G, padded to a power of two for Triton; absent groups have len 0 and first = last = g).

Three kernels:
  forward  grid (G, B, H): query group gq loops key groups gk in [first[gq], gq) on the landmark
           path (o_bar = softmax(s) @ v inside the tile, score q . kL[gk] enters the outer online
           softmax), then its own group with the causal mask; writes o and lse (log2 units);
  dQ       grid (G, B, H): the same loop, recomputing w and delta_c = do . o_bar as
           rowsum(w * (do v^T)) (no o_bar product);
  dK/dV/dkL grid (G, B, H): key group gk, its own group, then query groups gq in (gk, last[gk]].
Scores are kept in base 2 (exp2 is the native instruction), like pallas_gpu.py. The tile
math is common.py's, shared with the Mosaic kernels of pallas_tpu.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effattn.kernels.grouped_softmax import common as tiles
from effattn.kernels.block_sparse.common import LOG2E

_F32 = jnp.float32


def _params(num_warps: int | None, num_stages: int | None, lt: int, d: int, dtype):
  """Triton settings; defaults: 4 warps for 64-slot tiles, 2 pipeline stages (1 for float32,
  whose tiles are twice the shared memory)."""
  if num_warps is None:
    num_warps = 4 if lt <= 64 or d <= 64 else 8
  if num_stages is None:
    num_stages = 1 if jnp.dtype(dtype).itemsize > 2 else 2
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _tile(ref, g, lt: int):
  """Rows of group g from a ref spanning the whole sequence of one head."""
  return ref[pl.ds(pl.multiple_of(g * lt, lt), lt), :]


def _fwd_kernel(q_ref, k_ref, v_ref, kl_ref, len_ref, first_ref, o_ref, lse_ref, *, lt, scale):
  g = pl.program_id(0)
  c2 = scale * LOG2E
  q = q_ref[...]

  def body(gk, carry):
    return tiles.fwd_landmark(q, _tile(k_ref, gk, lt), _tile(v_ref, gk, lt),
                              kl_ref[pl.ds(gk, 1), :], len_ref[gk], c2, lt, *carry)

  stats = lax.fori_loop(first_ref[g], g, body, tiles.init_stats(lt, q.shape[1]))
  # Own group: causal within the tile.
  stats = tiles.fwd_own(q, _tile(k_ref, g, lt), _tile(v_ref, g, lt), len_ref[g], c2, lt, *stats)
  o, lse = tiles.fwd_finish(*stats)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse


def _dq_kernel(q_ref, k_ref, v_ref, kl_ref, do_ref, lse_ref, delta_ref, len_ref, first_ref,
               dq_ref, *, lt, scale):
  g = pl.program_id(0)
  c2 = scale * LOG2E
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(gk, dq):
    return dq + tiles.dq_landmark(q, _tile(k_ref, gk, lt), _tile(v_ref, gk, lt),
                                  kl_ref[pl.ds(gk, 1), :], len_ref[gk], do, lse, delta, c2, lt)

  dq = lax.fori_loop(first_ref[g], g, body, jnp.zeros(q.shape, _F32))
  dq = dq + tiles.dq_own(q, _tile(k_ref, g, lt), _tile(v_ref, g, lt), len_ref[g], do, lse, delta,
                         c2, lt)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, kl_ref, do_ref, lse_ref, delta_ref, len_ref, last_ref,
                dk_ref, dv_ref, dkl_ref, *, lt, scale):
  g = pl.program_id(0)
  c2 = scale * LOG2E
  k, v, kl = k_ref[...], v_ref[...], kl_ref[...]
  n_k = len_ref[g]

  def rows(gq):
    sl = pl.ds(pl.multiple_of(gq * lt, lt), lt)
    return q_ref[sl, :], do_ref[sl, :], lse_ref[sl], delta_ref[sl]

  q, do, lse, delta = rows(g)
  dk, dv = tiles.dkv_own(q, k, v, n_k, do, lse, delta, c2, lt)

  def body(gq, carry):
    q, do, lse, delta = rows(gq)
    step = tiles.dkv_landmark(q, k, v, kl, n_k, do, lse, delta, c2, lt)
    return tuple(a + b for a, b in zip(carry, step))

  dk, dv, dkl = lax.fori_loop(g + 1, last_ref[g] + 1, body,
                              (dk, dv, jnp.zeros(kl.shape, _F32)))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dkl_ref[...] = dkl * scale


def _specs(n, d, lt, gp, g_rows):
  """BlockSpecs shared by the three kernels (grid (G, B, H))."""
  full = pl.BlockSpec((None, n, None, d), lambda g, bi, hi: (bi, 0, hi, 0))
  tile = pl.BlockSpec((None, lt, None, d), lambda g, bi, hi: (bi, g, hi, 0))
  kl_all = pl.BlockSpec((None, g_rows, None, d), lambda g, bi, hi: (bi, 0, hi, 0))
  kl_one = pl.BlockSpec((None, 1, None, d), lambda g, bi, hi: (bi, g, hi, 0))
  meta = pl.BlockSpec((None, gp), lambda g, bi, hi: (bi, 0))
  vec_tile = pl.BlockSpec((None, None, lt), lambda g, bi, hi: (bi, hi, g))
  vec_full = pl.BlockSpec((None, None, n), lambda g, bi, hi: (bi, hi, 0))
  return full, tile, kl_all, kl_one, meta, vec_tile, vec_full


def forward(q, k, v, kl, glen, gfirst, *, lt: int, scale: float, interpret: bool = False,
            num_warps: int | None = None, num_stages: int | None = None):
  """q, k, v [B, N = G * Lt, H, D] (group-tiled), kl [B, G, H, D], glen / gfirst [B, Gp] int32.

  Returns o [B, N, H, D] in q's dtype and lse [B, H, N] float32 in log2 units.
  """
  b, n, h, d = q.shape
  g_rows, gp = kl.shape[1], glen.shape[1]
  full, tile, kl_all, _, meta, vec_tile, _ = _specs(n, d, lt, gp, g_rows)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, lt=lt, scale=scale),
      grid=(n // lt, b, h),
      in_specs=[tile, full, full, kl_all, meta, meta],
      out_specs=[tile, vec_tile],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, n), _F32)],
      compiler_params=_params(num_warps, num_stages, lt, d, q.dtype),
      interpret=interpret,
      name="landmark_grouped_fwd",
  )(q, k, v, kl, glen, gfirst)


def backward(q, k, v, kl, lse, do, delta, glen, gfirst, glast, *, lt: int, scale: float,
             interpret: bool = False, num_warps: int | None = None, num_stages: int | None = None):
  """dq, dk, dv [B, N, H, D] (input dtypes) and dkl [B, G, H, D] float32.

  lse [B, H, N] from forward (log2 units); delta [B, H, N] = rowsum(o * do) in float32; do is
  zero on invalid slots.
  """
  b, n, h, d = q.shape
  g_rows, gp = kl.shape[1], glen.shape[1]
  full, tile, kl_all, kl_one, meta, vec_tile, vec_full = _specs(n, d, lt, gp, g_rows)
  params = _params(num_warps, num_stages, lt, d, q.dtype)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, lt=lt, scale=scale),
      grid=(n // lt, b, h),
      in_specs=[tile, full, full, kl_all, tile, vec_tile, vec_tile, meta, meta],
      out_specs=tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="landmark_grouped_dq",
  )(q, k, v, kl, do, lse, delta, glen, gfirst)
  dk, dv, dkl = pl.pallas_call(
      functools.partial(_dkv_kernel, lt=lt, scale=scale),
      grid=(n // lt, b, h),
      in_specs=[full, tile, tile, kl_one, full, vec_full, vec_full, meta, meta],
      out_specs=[tile, tile, kl_one],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(kl.shape, _F32)],
      compiler_params=params,
      interpret=interpret,
      name="landmark_grouped_dkv",
  )(q, k, v, kl, do, lse, delta, glen, glast)
  return dq, dk, dv, dkl
