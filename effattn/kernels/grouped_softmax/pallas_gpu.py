"""Landmark grouped softmax as flash-style Pallas kernels with the Triton lowering (GPU).

Inputs are in the group-tiled layout built by api.py: group g of a row occupies the slots
[g * Lt, g * Lt + len[g]) of an [B, N = G * Lt, H, D] array (len[g] <= Lt - 1; other slots are
zero) and k holds the group's landmark key in its last slot, so a key tile is exactly one group
and everything about an earlier group (its within-group softmax, its value summary o_bar, its
landmark score) is local to one tile and one score matrix (common.py). Per group: len [B, Gp]
tokens, first [B, Gp] the first group of its segment, last [B, Gp] the last group of its
segment (Gp >= G, padded to a power of two for Triton; absent groups have len 0 and
first = last = g).

Three kernels; a query tile is `q_groups` = R consecutive groups (R * Lt rows, each row
meeting a key group as an earlier group of its segment, its own group, or neither: common.py):
  forward  grid (G / R, B, H): query groups [g0, g0 + R) loop key groups gk in
           [first[g0], g0 + R): on the landmark path o_bar = softmax(s) @ v inside the tile and
           the landmark score q . kL[gk] enters the outer online softmax, on the own group the
           causal tokens; writes o and lse (log2 units). R = 1 runs the landmark loop, then the
           own group;
  dQ       grid (G / R, B, H): the same loop, recomputing the weights and delta_c = do . o_bar
           as rowsum(w * (do v^T)) (no o_bar product);
  dK/dV    grid (G, B, H): key group gk loops the query tiles of R groups that hold its own
           group and the later groups of its segment, (gk, last[gk]]; the landmark key's
           gradient is dK's last row of the tile. kv_splits = S > 1: grid (G * S, B, H), S
           programs per key group, each an equal share (to one tile) of those query tiles,
           writing float32 partials that an XLA sum adds (the same sums regrouped: a key group
           early in a long segment is otherwise one program T / block_len tiles long).
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
from effattn.kernels.block_sparse.common import LOG2E, dot

_F32 = jnp.float32


def _params(num_warps: int | None, num_stages: int | None, rows: int, d: int, dtype):
  """Triton settings; defaults: 4 warps for 64-row query tiles, 8 above; 2 pipeline stages (1
  for float32, whose tiles are twice the shared memory)."""
  if num_warps is None:
    num_warps = 4 if rows <= 64 or d <= 64 else 8
  if num_stages is None:
    num_stages = 1 if jnp.dtype(dtype).itemsize > 2 else 2
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _tile(ref, g, rows: int):
  """Rows [g * rows, (g + 1) * rows) of a ref spanning the whole sequence of one head."""
  return ref[pl.ds(pl.multiple_of(g * rows, rows), rows), ...]


def _per_row(ref, g0, r: int, lt: int):
  """ref[g0 + j] on the rows of group j of an R-group query tile: [R * Lt] int32."""
  which = jnp.arange(r * lt, dtype=jnp.int32) // lt
  out = jnp.full((r * lt,), ref[g0], jnp.int32)
  for j in range(1, r):
    out = jnp.where(which == j, ref[g0 + j], out)
  return out


def _query_loop(step, carry, len_ref, first_ref, *, lt: int, r: int):
  """Runs step(gk, n_k, land, own, carry) over the key groups of query tile program_id(0)."""
  g0 = pl.program_id(0) * r
  if r == 1:  # static roles: the landmark loop, then the own group
    carry = lax.fori_loop(first_ref[g0], g0,
                          lambda gk, c: step(gk, len_ref[gk], True, False, c), carry)
    return step(g0, len_ref[g0], False, True, carry)
  row_g = g0 + jnp.arange(r * lt, dtype=jnp.int32) // lt
  row_first = _per_row(first_ref, g0, r, lt)
  return lax.fori_loop(
      first_ref[g0], g0 + r,
      lambda gk, c: step(gk, len_ref[gk], (gk < row_g) & (gk >= row_first), gk == row_g, c),
      carry)


def _fwd_kernel(q_ref, k_ref, v_ref, len_ref, first_ref, o_ref, lse_ref, *, lt, r, scale):
  c2 = scale * LOG2E
  q = q_ref[...]

  def step(gk, n_k, land, own, carry):
    return tiles.fwd_step(q, _tile(k_ref, gk, lt), _tile(v_ref, gk, lt), n_k, land, own, c2, lt,
                          *carry)

  stats = _query_loop(step, tiles.init_stats(r * lt, q.shape[1]), len_ref, first_ref, lt=lt,
                      r=r)
  o, lse = tiles.fwd_finish(*stats)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, len_ref, first_ref, dq_ref, *,
               lt, r, scale):
  c2 = scale * LOG2E
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def step(gk, n_k, land, own, dq):
    k = _tile(k_ref, gk, lt)
    _, ds = tiles.grads_step(q, k, _tile(v_ref, gk, lt), n_k, land, own, do, lse, delta, c2, lt)
    return dq + dot(ds.astype(k.dtype), k)

  dq = _query_loop(step, jnp.zeros(q.shape, _F32), len_ref, first_ref, lt=lt, r=r)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _split_range(lo, hi, s, splits: int):
  """Share s of `splits` of the tiles [lo, hi): [lo + s n // S, lo + (s + 1) n // S), n = hi - lo
  (shares differ by at most one tile; a share is empty when n < S)."""
  n = hi - lo
  return lo + (s * n) // splits, lo + ((s + 1) * n) // splits


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, len_ref, last_ref, dk_ref,
                dv_ref, *, lt, r, scale, splits):
  i = pl.program_id(0)
  # kv_splits > 1: program i = g * S + s takes share s of key group g's query tiles and writes
  # a float32 partial dK / dV (backward sums the S partials).
  g, s = (i, 0) if splits == 1 else (i // splits, i % splits)
  c2 = scale * LOG2E
  k, v = k_ref[...], v_ref[...]
  n_k, last = len_ref[g], last_ref[g]

  def step(qb, land, own, carry):
    q, do = _tile(q_ref, qb, r * lt), _tile(do_ref, qb, r * lt)
    lse, delta = _tile(lse_ref, qb, r * lt), _tile(delta_ref, qb, r * lt)
    p, ds = tiles.grads_step(q, k, v, n_k, land, own, do, lse, delta, c2, lt)
    dk, dv = carry
    return (dk + dot(ds.astype(q.dtype), q, trans_a=True),
            dv + dot(p.astype(do.dtype), do, trans_a=True))

  def land_step(gq, c):
    return step(gq, True, False, c)

  carry = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32))
  if r == 1 and splits == 1:  # static roles: the own group, then the later groups of the segment
    carry = step(g, False, True, carry)
    dk, dv = lax.fori_loop(g + 1, last + 1, land_step, carry)
  elif r == 1:  # the share [lo, hi) of [g, last + 1); the own group g is in exactly one share
    lo, hi = _split_range(g, last + 1, s, splits)
    has_own = ((lo == g) & (hi > g)).astype(jnp.int32)
    carry = lax.fori_loop(0, has_own, lambda _, c: step(g, False, True, c), carry)
    dk, dv = lax.fori_loop(jnp.maximum(lo, g + 1), hi, land_step, carry)
  else:
    def block(qb, c):
      row_g = qb * r + jnp.arange(r * lt, dtype=jnp.int32) // lt
      return step(qb, (row_g > g) & (row_g <= last), row_g == g, c)

    lo, hi = _split_range(g // r, last // r + 1, s, splits)
    dk, dv = lax.fori_loop(lo, hi, block, carry)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(n, d, rows, gp):
  """BlockSpecs of the kernels (grid (N / rows, B, H)): a whole head, one tile of `rows`,
  the group metadata, a per-slot vector's tile and whole head."""
  full = pl.BlockSpec((None, n, None, d), lambda g, bi, hi: (bi, 0, hi, 0))
  tile = pl.BlockSpec((None, rows, None, d), lambda g, bi, hi: (bi, g, hi, 0))
  meta = pl.BlockSpec((None, gp), lambda g, bi, hi: (bi, 0))
  vec_tile = pl.BlockSpec((None, None, rows), lambda g, bi, hi: (bi, hi, g))
  vec_full = pl.BlockSpec((None, None, n), lambda g, bi, hi: (bi, hi, 0))
  return full, tile, meta, vec_tile, vec_full


def _check_groups(n: int, lt: int, q_groups: int):
  if q_groups < 1 or (n // lt) % q_groups:
    raise ValueError(f"q_groups={q_groups} must be >= 1 and divide the layout's {n // lt} "
                     "group tiles (api.py rounds max_groups up to a multiple of it)")


# kv_splits=0 aims at this many resident dK/dV programs: an H200's 132 SMs, two of these
# programs each (their float32 dK and dV accumulators take about half the registers).
_SM_SLOTS = 2 * 132


def auto_kv_splits(n_groups: int, b: int, h: int) -> int:
  """kv_splits for kv_splits=0: the fewest of 1, 2, 4, 8 that keep the longest dK/dV program
  (key group 0 of a one-segment row: n_groups query tiles, / S) within a quarter of the work each
  of the _SM_SLOTS program slots gets (b * h * n_groups^2 / 2 visits in all). A model, not yet
  timed: large B x H x G gives 1 (today's kernel), a few heads of a short row more.
  (The longest program <= work / slots / 4  <=>  S >= 8 * slots / (b * h * n_groups).)"""
  need = 8 * _SM_SLOTS / max(1, b * h * n_groups)
  return next((c for c in (1, 2, 4) if c >= need), 8)


def check_kv_splits(kv_splits: int):
  if not isinstance(kv_splits, int) or kv_splits < 0:
    raise ValueError(f"kv_splits={kv_splits!r} must be a whole number >= 0 (programs per key "
                     "tile in the dK/dV kernel; 1: one program, 0: chosen from the grid)")


def forward(q, k, v, glen, gfirst, *, lt: int, scale: float, interpret: bool = False,
            num_warps: int | None = None, num_stages: int | None = None, q_groups: int = 1,
            kv_splits: int = 1):
  """q, k, v [B, N = G * Lt, H, D] (group-tiled, k with each group's landmark key in its last
  slot), glen / gfirst [B, Gp] int32; q_groups: groups per query tile (divides G); kv_splits:
  the backward's (accepted here so both take the same settings).

  Returns o [B, N, H, D] in q's dtype and lse [B, H, N] float32 in log2 units.
  """
  del kv_splits
  b, n, h, d = q.shape
  _check_groups(n, lt, q_groups)
  rows = q_groups * lt
  full, tile, meta, vec_tile, _ = _specs(n, d, rows, glen.shape[1])
  return pl.pallas_call(
      functools.partial(_fwd_kernel, lt=lt, r=q_groups, scale=scale),
      grid=(n // rows, b, h),
      in_specs=[tile, full, full, meta, meta],
      out_specs=[tile, vec_tile],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, n), _F32)],
      compiler_params=_params(num_warps, num_stages, rows, d, q.dtype),
      interpret=interpret,
      name="landmark_grouped_fwd",
  )(q, k, v, glen, gfirst)


def backward(q, k, v, lse, do, delta, glen, gfirst, glast, *, lt: int, scale: float,
             interpret: bool = False, num_warps: int | None = None, num_stages: int | None = None,
             q_groups: int = 1, kv_splits: int = 1):
  """dq, dk, dv [B, N, H, D] (input dtypes; dk's last slot of each group: the landmark key's).

  lse [B, H, N] from forward (log2 units); delta [B, H, N] = rowsum(o * do) in float32; do is
  zero on invalid slots. kv_splits = S: programs per key group in the dK/dV kernel, each taking
  an equal share (to one tile) of the group's query tiles (its own and the later groups of its
  segment) and writing a float32 partial dK / dV, which one XLA sum adds (S copies of dK and dV
  in float32); 1: one program per key group writing dK / dV directly; 0: auto_kv_splits.
  """
  b, n, h, d = q.shape
  _check_groups(n, lt, q_groups)
  check_kv_splits(kv_splits)
  splits = kv_splits or auto_kv_splits(n // lt, b, h)
  rows = q_groups * lt
  full, tile, meta, vec_tile, vec_full = _specs(n, d, rows, glen.shape[1])
  params = _params(num_warps, num_stages, rows, d, q.dtype)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, lt=lt, r=q_groups, scale=scale),
      grid=(n // rows, b, h),
      in_specs=[tile, full, full, tile, vec_tile, vec_tile, meta, meta],
      out_specs=tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="landmark_grouped_dq",
  )(q, k, v, do, lse, delta, glen, gfirst)
  if splits == 1:
    _, key_tile, _, _, _ = _specs(n, d, lt, glen.shape[1])
    out_specs = [key_tile, key_tile]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  else:  # grid axis 0 is g * S + s; partials [S, B, N, H, D] float32
    key_tile = pl.BlockSpec((None, lt, None, d), lambda i, bi, hi: (bi, i // splits, hi, 0))
    out_specs = [pl.BlockSpec((None, None, lt, None, d),
                              lambda i, bi, hi: (i % splits, bi, i // splits, hi, 0))] * 2
    out_shape = [jax.ShapeDtypeStruct((splits,) + k.shape, _F32)] * 2
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, lt=lt, r=q_groups, scale=scale, splits=splits),
      grid=(n // lt * splits, b, h),
      in_specs=[full, key_tile, key_tile, full, vec_full, vec_full, meta, meta],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=params,
      interpret=interpret,
      name="landmark_grouped_dkv" if splits == 1 else "landmark_grouped_dkv_split",
  )(q, k, v, do, lse, delta, glen, glast)
  if splits > 1:
    dk, dv = jnp.sum(dk, axis=0).astype(k.dtype), jnp.sum(dv, axis=0).astype(v.dtype)
  return dq, dk, dv
