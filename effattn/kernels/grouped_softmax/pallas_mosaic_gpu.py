"""Landmark grouped softmax in Pallas Mosaic GPU (Hopper: warpgroups, wgmma, TMA): a forward
kernel and (backward(bwd="mosaic")) dQ and dK/dV kernels.

Same contract as pallas_gpu.py's `forward`: q, k, v [B, N = G * Lt, H, D] in the group-tiled
layout of api.py (group g in slots [g * Lt, g * Lt + len[g]), k's last slot of each tile the
group's landmark key, v's zero), glen / gfirst [B, Gp] int32 (tokens and first group of the
segment per group; absent groups len 0, first = own index); returns o [B, N, H, D] in q's dtype
and lse [B, H, N] float32 in log2 units (0 on slots of absent groups), the residuals
pallas_gpu.backward takes. api.py's impl="pallas_mosaic_gpu" runs this forward and
differentiates it with `backward`: by default (bwd="mosaic") the two Mosaic kernels at the end
of this file (see "The backward" below), checked on an H200 by scripts/bench_landmark.py and
run on CPU in jax's Mosaic GPU interpreter (scripts/interpret_grouped_softmax_mosaic.py); with
bwd="triton" the Triton kernels of pallas_gpu.py on its o and lse.

The forward is one kernel, grid (H, G2 / 2, B) with G2 = G rounded up to even; a CTA is three
warpgroups, the block-sparse Mosaic forward's (block_sparse/pallas_mosaic_gpu.py `_fwd_kernel`)
with the grouped epilogue:

  consumers 0, 1  query group gc = 2 * ci + wg (Lt = 64 rows: one group per warpgroup, so a
                  row's role on a key tile is the warpgroup's, a scalar); S = Q K^T on wgmma
                  (Q from shared memory), the tile update below in registers, O += P V on wgmma
                  (P from registers); they take turns on the tensor core (a schedule barrier,
                  FlashAttention-3's ping-pong), one's softmax beside the other's QK^T;
  producer        streams whole key groups (a K and a V tile of Lt rows each) by TMA into a ring
                  of `num_stages` shared-memory stages (block_sparse's `_stream_kv`).

What is streamed: consumer c needs key groups [first[gc], gc] (its segment's earlier groups on
the landmark path, then its own group, causal); the CTA streams their union
[min(first[g0], first[g0 + 1]), g0 + 1] (contiguous, since first[g] <= g), and each consumer
walks every streamed tile (the barriers count both) with its own roles: landmark path for
first[gc] <= gk < gc, own for gk == gc, neither otherwise (the tile adds nothing). Within one
segment the union is one tile more than consumer 0's range (its neighbour's own group); a CTA
whose second group starts a segment streams the first one's whole range for both.

The tile update is common.py's fwd_step in register layouts (roles are warpgroup scalars, so
the masks are iota compares against scalar bounds): per row the landmark score s_l (the tile's
last column, taken by a masked row sum), the max m_t of the visible scores; on the landmark
path the within-group softmax e = exp2(s - m_t), z = rowsum(e) and the weight exp2(s_l - m) / z
of the whole group; on the own group e = exp2(s - m); P = e times that row weight, so the
accumulator update is flash's acc = alpha acc + P V. Scores are base 2 (exp2 is the native
instruction); the running max starts at MASK_VALUE (finite), so rows that see nothing stay
NaN-free and finish with o = 0, lse = 0 (fwd_finish's convention).

The backward (bwd="mosaic"), block_sparse/pallas_mosaic_gpu.py's "split" pair with the
grouped epilogue (tile_grads: common.grads_step in register layouts, roles warpgroup scalars):

  dQ     grid (H, G2 / 2, B)  the forward's CTA: consumer wg holds query group gc (Q, dO in
                              shared memory, lse and delta in registers) and walks the
                              streamed key groups cta_range gives with roles(); per tile
                              S = Q K^T and dP = dO V^T on wgmma, tile_grads, dQ += dS K
                              (dS from registers) into a wgmma accumulator;
  dK/dV  grid (H, G2 / 2, B)  consumer wg holds key group gk = 2 ci + wg (K, V in shared
                              memory); the producer streams the Q / dO tiles of the query
                              groups [g0, max(last[g0], last[g0 + 1])] (dkv_range: each key
                              group's own group, then the later groups of its segment), each
                              consumer with its dkv_roles(); per tile the same S, dP and
                              tile_grads (query-major, so every reduction is along a row),
                              then P and dS (16-bit) go through shared memory for wgmma's
                              transposed A operand: dV += P^T dO, dK += dS^T Q. The landmark
                              key's gradient is dK's last row of its tile.
No kv_splits: a key group early in a long segment is one CTA walking the whole segment.

Inputs bfloat16 or float16 (wgmma), head dim 64 or 128, Lt = 64; anything else raises a
one-line ValueError naming the fix (api.py's dispatcher checks the same limits first).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from effattn.kernels.block_sparse.common import LOG2E, MASK_VALUE
from effattn.kernels.block_sparse.pallas_mosaic_gpu import (REGISTERS, SMEM_BYTES, WG_ROWS,
                                                            _WGMMA, _ROW, _accumulate_pv, _bcast,
                                                            _launch, _load, _own_keys, _pad_to,
                                                            _products_t, _scores, _sched_sync,
                                                            _smem, _store_dkv, _stream_kv,
                                                            check_operands, fwd_scratch)
from effattn.kernels.grouped_softmax import pallas_gpu

TILE = WG_ROWS  # Lt: a group tile is one consumer's 64 query rows and one 64-key K/V tile
NUM_STAGES = 4  # K/V stages: a 64-key stage is 16 KB (d 64) or 32 KB (d 128) of K and V


def _check(q, k, v, lt: int, interpret: bool):
  """ValueError, one line naming the argument and the fix, for what this kernel cannot run."""
  check_operands(q, k, v, interpret, op="grouped_softmax pallas_mosaic_gpu",
                 head_dim_fix="use impl='pallas_gpu'")
  if lt != TILE:
    raise ValueError(f"grouped_softmax pallas_mosaic_gpu: tile={lt} is not {TILE} (one group "
                     "per consumer warpgroup); use tile=64 or impl='pallas_gpu'")
  if q.shape[1] % lt:
    raise ValueError(f"grouped_softmax pallas_mosaic_gpu: {q.shape[1]} slots are not whole "
                     f"tiles of {lt}")


# --------------------------------------------------------------------------------------------
# The per-consumer arithmetic, jnp on scalars and register tiles: the kernel runs it in the
# wgmma layouts, tests/kernels/test_grouped_softmax_pallas_mosaic_gpu.py with plain arrays.


def cta_range(first0, first1, g0, n_groups: int):
  """(lo, count) of the key groups a CTA of query groups g0, g0 + 1 streams: the union of both
  groups' [first, g], cut at the layout's last group (g0 + 1 = G is padding when G is odd)."""
  lo = jnp.minimum(first0, first1)
  return lo, jnp.minimum(g0 + 1, n_groups - 1) - lo + 1


def roles(gk, gc, first_c):
  """(landmark path, own group) of key group gk for query group gc: scalar bools."""
  return (gk >= first_c) & (gk < gc), gk == gc


def _pick(flag, a, b):
  """jnp.where(flag, a, b) for a scalar flag and [64] rows (Mosaic GPU's warpgroup lowering
  takes no implicit broadcast of a select's predicate)."""
  return jnp.where(jnp.broadcast_to(flag, a.shape), a, b)


def tile_update(s, n_k, land, own, m, l, *, iota, bcast):
  """common.fwd_step's epilogue for one consumer's tile of scores s [64, Lt] (base 2) against
  key group gk of n_k tokens with scalar roles (land, own): (p [64, Lt] float32, alpha, m_new,
  l_new [64]); the caller does acc = alpha acc + p V. iota(dim) / bcast(x [64]): the layout's
  broadcasted iota of s's shape and row-vector broadcast to it."""
  lt = s.shape[1]
  rows, cols = iota(0), iota(1)
  # Visible scores: tokens cols < n_k, causal (cols <= row) on the own group; none otherwise.
  # (The landmark column lt - 1 is never a token: n_k <= lt - 1.)
  limit = jnp.where(land | own, n_k, 0)
  diag = jnp.where(land, lt, 0)
  vis = (cols < limit) & (cols <= rows + diag)
  s_l = jnp.sum(jnp.where(cols == lt - 1, s, 0.0), axis=1)  # the landmark score
  m_t = jnp.max(jnp.where(vis, s, MASK_VALUE), axis=1)
  m_new = jnp.maximum(m, _pick(land, s_l, m_t))
  # One exponent per score: against the within-group max on the landmark path, the outer max
  # on the own group.
  e = jnp.where(vis, jnp.exp2(s - bcast(_pick(land, m_t, m_new))), 0.0)
  e_sum = jnp.sum(e, axis=1)
  z = jnp.where(land & (e_sum > 0.0), e_sum, 1.0)  # an array predicate: no _pick
  w = _pick(land, jnp.exp2(s_l - m_new) / z, jnp.ones_like(z))  # landmark path: p_l / z
  alpha = jnp.exp2(m - m_new)
  return e * bcast(w), alpha, m_new, alpha * l + e_sum * w


def finish(acc, m, l, *, bcast):
  """common.fwd_finish: o [64, D] float32 and lse [64] in log2 units (0 where nothing is seen)."""
  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  return acc * bcast(1.0 / l_safe), jnp.where(seen, m + jnp.log2(l_safe), 0.0)


def dkv_range(last0, last1, g0, n_groups: int):
  """Query groups a dK/dV CTA of key groups g0, g0 + 1 streams: count n of [g0, g0 + n), the
  union of both groups' [g, last[g]] (their own group, then the later groups of the segment),
  cut at the layout's last group."""
  return jnp.minimum(jnp.maximum(last0, last1), n_groups - 1) - g0 + 1


def dkv_roles(gq, gk, last_k):
  """(landmark path, own group) of query group gq for key group gk: scalar bools."""
  return (gq > gk) & (gq <= last_k), gq == gk


def tile_grads(s, dp, n_k, land, own, lse, delta, *, iota, bcast):
  """common.grads_step's epilogue for one tile of scores s [64 queries, Lt] (base 2) and
  dP = dO V^T [64, Lt] against key group gk of n_k tokens, roles (land, own) scalars:
  (p, ds) [64, Lt] float32, p the weight of key j in query i's output (0 in the landmark
  column), ds the score gradient (unscaled; the landmark score's in the last column). dQ += ds K,
  dK += ds^T Q (the landmark key's in row Lt - 1), dV += p^T dO. lse, delta [64] (log2 units;
  rowsum(o * dO)); iota / bcast as tile_update's."""
  lt = s.shape[1]
  rows, cols = iota(0), iota(1)
  limit = jnp.where(land | own, n_k, 0)
  diag = jnp.where(land, lt, 0)
  vis = (cols < limit) & (cols <= rows + diag)
  at_land = cols == lt - 1
  s_l = jnp.sum(jnp.where(at_land, s, 0.0), axis=1)
  m_w = jnp.max(jnp.where(vis, s, MASK_VALUE), axis=1)  # the within-group max
  e = jnp.where(vis, jnp.exp2(s - bcast(_pick(land, m_w, lse))), 0.0)
  e_sum = jnp.sum(e, axis=1)
  z = jnp.where(land & (e_sum > 0.0), e_sum, 1.0)
  p_c = jnp.exp2(s_l - lse)  # landmark path: the outer weight of the group's landmark
  p = e * bcast(_pick(land, p_c / z, jnp.ones_like(z)))
  # Landmark path: delta_c = dO . o_bar = sum_j (e_j / z) (dO . v_j).
  delta_c = jnp.sum(e * dp, axis=1) / z
  ds = p * (dp - bcast(_pick(land, delta_c, delta)))
  ds_l = p_c * (delta_c - delta)
  return p, jnp.where(land & at_land, bcast(ds_l), ds)


# --------------------------------------------------------------------------------------------
# The kernel


class _Consecutive:
  """Stands in for a block list row: slot j holds tile lo + j (what `_stream_kv` reads as
  r["idx"][(*row, j)])."""

  def __init__(self, lo):
    self.lo = lo

  def __getitem__(self, index):
    (j,) = index
    return self.lo + j


def _query_cta(gfirst_ref, n_groups: int):
  """(hi, bi, wg, g0, lo, n) of a CTA over query groups g0 = 2 * ci and g0 + 1: its head, row,
  warpgroup, first query group and the streamed key groups [lo, lo + n) (cta_range)."""
  hi, ci, bi = lax.axis_index("h"), lax.axis_index("q"), lax.axis_index("b")
  g0 = ci * 2
  lo, n = cta_range(gfirst_ref[bi, g0], gfirst_ref[bi, g0 + 1], g0, n_groups)
  return hi, bi, lax.axis_index("wg"), g0, lo, n


def _tile_iota(dim: int):
  """Row (0) or column (1) indices of a [64, Lt] score tile in the wgmma register layout."""
  return plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, TILE), dim, layout=_WGMMA)


def _fwd_kernel(q_ref, k_ref, v_ref, glen_ref, gfirst_ref, o_ref, lse_ref, q_smem, k_smem,
                v_smem, lse_smem, q_bar, k_bar, v_bar, k_free, v_free, sched, *, scale,
                n_groups, num_stages):
  hi, bi, wg, g0, lo, n = _query_cta(gfirst_ref, n_groups)
  dtype = q_smem.dtype
  tile = (WG_ROWS, TILE)
  c2 = scale * LOG2E

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(REGISTERS[0], action="increase")
    gc = g0 + wg
    first_c = gfirst_ref[bi, gc]
    rows = pl.ds(gc * TILE, WG_ROWS)
    qs = q_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], qs, q_bar.at[wg])
    plgpu.barrier_wait(q_bar.at[wg])
    acc = plgpu.layout_cast(jnp.zeros((WG_ROWS, q_smem.shape[-1]), jnp.float32), _WGMMA)
    m = plgpu.layout_cast(jnp.full((WG_ROWS,), MASK_VALUE, jnp.float32), _ROW)
    l = plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), _ROW)
    pl.when(wg == 1)(lambda: _sched_sync(sched))

    def step(j, carry):
      acc, m, l = carry
      slot = lax.rem(j, num_stages)
      gk = lo + j
      n_k = glen_ref[bi, gk]
      land, own = roles(gk, gc, first_c)
      s = _scores(qs, k_smem, slot, tile, k_bar, k_free, sched)
      p, alpha, m_new, l = tile_update(s * c2, n_k, land, own, m, l, iota=_tile_iota,
                                       bcast=lambda x: _bcast(x, tile, 0))
      return _accumulate_pv(acc, alpha, p, l, m_new, v_smem, slot, v_bar, v_free, sched)

    acc, m, l = lax.fori_loop(0, n, step, (acc, m, l))
    pl.when(wg == 0)(lambda: _sched_sync(sched))
    o, lse = finish(acc, m, l, bcast=lambda x: _bcast(x, acc.shape, 0))
    qs[...] = o.astype(dtype)
    lse_smem.at[wg][...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qs, o_ref.at[bi, rows, hi])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, hi, rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _producer():
    _stream_kv({"idx": _Consecutive(lo), "k": k_ref, "v": v_ref}, n, (), bi, hi,
               (k_smem, v_smem), (k_bar, v_bar), (k_free, v_free), block_k=TILE,
               num_stages=num_stages)


def forward(q, k, v, glen, gfirst, *, lt: int, scale: float, interpret: bool = False,
            num_warps: int | None = None, num_stages: int | None = None, q_groups: int = 1,
            kv_splits: int = 1, bwd: str = "mosaic"):
  """q, k, v [B, N = G * Lt, H, D] (group-tiled, k with each group's landmark key in its last
  slot), glen / gfirst [B, Gp] int32. Returns o [B, N, H, D] in q's dtype and lse [B, H, N]
  float32 in log2 units, as pallas_gpu.forward.

  num_stages: the K/V pipeline depth (default NUM_STAGES). num_warps, q_groups and kv_splits
  are the Triton kernels' settings and bwd the backward's, accepted so both take the same ones
  and ignored (a CTA is always three warpgroups over two groups)."""
  del num_warps, q_groups, kv_splits, bwd
  _check(q, k, v, lt, interpret)
  b, n, h, d = q.shape
  n_groups = n // lt
  g2 = 2 * -(-n_groups // 2)
  num_stages = NUM_STAGES if num_stages is None else num_stages
  if num_stages < 1:
    raise ValueError(f"grouped_softmax pallas_mosaic_gpu: num_stages={num_stages} must be >= 1")
  # Group metadata for the G2 query groups (a padded group: no tokens, its own segment).
  gp = glen.shape[1]
  if gp < g2:
    glen = _pad_to(glen, 1, g2)
    gfirst = jnp.concatenate(
        [gfirst, jnp.broadcast_to(jnp.arange(gp, g2, dtype=gfirst.dtype), (b, g2 - gp))], 1)
  kernel = functools.partial(_fwd_kernel, scale=scale, n_groups=n_groups,
                             num_stages=num_stages)
  o, lse = _launch(
      kernel, "landmark_grouped_mgpu_fwd",
      {"q": _pad_to(q, 1, g2 * lt), "k": k, "v": v, "glen": glen.astype(jnp.int32),
       "gfirst": gfirst.astype(jnp.int32)},
      out_type=[jax.ShapeDtypeStruct((b, g2 * lt, h, d), q.dtype),
                jax.ShapeDtypeStruct((b, h, g2 * lt), jnp.float32)],
      scratch=fwd_scratch(q, k, v, TILE, num_stages),
      grid=(h, g2 // 2, b),
      grid_names=("h", "q", "b"),
  )
  if g2 != n_groups:
    o, lse = o[:, :n], lse[:, :, :n]
  return o, lse


# --------------------------------------------------------------------------------------------
# The backward kernels


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, glen_ref, gfirst_ref, dq_ref,
               q_smem, do_smem, k_smem, v_smem, q_bar, kv_bar, kv_free, *, scale, n_groups,
               num_stages):
  """The forward's CTA walk (cta_range's key groups, roles()) with tile_grads per tile:
  S = Q K^T and dP = dO V^T on wgmma, dq += dS K into a wgmma accumulator (dS from
  registers)."""
  hi, bi, wg, g0, lo, n = _query_cta(gfirst_ref, n_groups)
  dtype = q_smem.dtype
  tile = (WG_ROWS, TILE)
  c2 = scale * LOG2E

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(REGISTERS[0], action="increase")
    gc = g0 + wg
    first_c = gfirst_ref[bi, gc]
    rows = pl.ds(gc * TILE, WG_ROWS)
    qs, dos = q_smem.at[wg], do_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], qs, q_bar.at[wg])
    plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi], dos, q_bar.at[wg])
    lse = _load(lse_ref.at[bi, hi, rows], _ROW)
    delta = _load(delta_ref.at[bi, hi, rows], _ROW)
    plgpu.barrier_wait(q_bar.at[wg])

    def accumulate(dq_acc):
      def step(j, carry):
        slot = lax.rem(j, num_stages)
        gk = lo + j
        land, own = roles(gk, gc, first_c)
        plgpu.barrier_wait(kv_bar.at[slot])
        ks = k_smem.at[slot]
        s, dp = _products_t(tile, (qs, ks), (dos, v_smem.at[slot]))
        _, ds = tile_grads(s * c2, dp, glen_ref[bi, gk], land, own, lse, delta, iota=_tile_iota,
                           bcast=lambda x: _bcast(x, tile, 0))
        plgpu.wgmma(dq_acc, ds.astype(dtype), ks)
        plgpu.wgmma_wait(0)  # K read: the stage may be refilled
        plgpu.barrier_arrive(kv_free.at[slot])
        return carry

      lax.fori_loop(0, n, step, 0)
      return dq_acc[...]

    dq = pl.run_scoped(accumulate, plgpu.ACC((WG_ROWS, q_smem.shape[-1]), jnp.float32))
    qs[...] = (dq * scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qs, dq_ref.at[bi, rows, hi])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _producer():
    _stream_kv({"idx": _Consecutive(lo), "k": k_ref, "v": v_ref}, n, (), bi, hi,
               (k_smem, v_smem), (kv_bar, kv_bar), (kv_free, None), block_k=TILE,
               num_stages=num_stages)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, glen_ref, glast_ref, dk_ref,
                dv_ref, k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, k_bar, qdo_bar,
                qdo_free, *, scale, n_groups, num_stages):
  """Consumer wg holds key group gk = 2 ci + wg (K, V in shared memory); the producer streams
  the Q / dO tiles of dkv_range's query groups. Per tile: S = Q K^T, dP = dO V^T on wgmma,
  tile_grads with dkv_roles, then P and dS (16-bit) through shared memory so wgmma takes them
  transposed: dV += P^T dO, dK += dS^T Q (the same row-wise epilogue as the dQ kernel; no
  reductions across the warpgroup's rows)."""
  hi, ci, bi = lax.axis_index("h"), lax.axis_index("k"), lax.axis_index("b")
  wg = lax.axis_index("wg")
  g0 = ci * 2
  n = dkv_range(glast_ref[bi, g0], glast_ref[bi, g0 + 1], g0, n_groups)
  dtype = k_smem.dtype
  tile = (WG_ROWS, TILE)  # [queries, keys]
  c2 = scale * LOG2E

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(REGISTERS[0], action="increase")
    gk = g0 + wg
    _, keys, ks, vs, _ = _own_keys({"k": k_ref, "v": v_ref}, (), k_smem, v_smem, k_bar, bi=bi,
                                   hk=hi, ci=ci, wg=wg)
    n_k, last_k = glen_ref[bi, gk], glast_ref[bi, gk]
    ps, dss = p_smem.at[wg], ds_smem.at[wg]

    def accumulate(dk_acc, dv_acc):
      def step(j, carry):
        slot = lax.rem(j, num_stages)
        gq = g0 + j
        land, own = dkv_roles(gq, gk, last_k)
        rows = pl.ds(gq * TILE, WG_ROWS)
        lse = _load(lse_ref.at[bi, hi, rows], _ROW)
        delta = _load(delta_ref.at[bi, hi, rows], _ROW)
        plgpu.barrier_wait(qdo_bar.at[slot])
        qs, dos = q_smem.at[slot], do_smem.at[slot]
        s, dp = _products_t(tile, (qs, ks), (dos, vs))
        p, ds = tile_grads(s * c2, dp, n_k, land, own, lse, delta, iota=_tile_iota,
                           bcast=lambda x: _bcast(x, tile, 0))
        ps[...] = p.astype(dtype)
        dss[...] = ds.astype(dtype)
        plgpu.commit_smem()
        plgpu.wgmma(dv_acc, plgpu.transpose_ref(ps, (1, 0)), dos)
        plgpu.wgmma(dk_acc, plgpu.transpose_ref(dss, (1, 0)), qs)
        plgpu.wgmma_wait(0)  # Q, dO, P, dS read: the stage may be refilled, P / dS rewritten
        plgpu.barrier_arrive(qdo_free.at[slot])
        return carry

      lax.fori_loop(0, n, step, 0)
      return dk_acc[...], dv_acc[...]

    acc = plgpu.ACC((WG_ROWS, k_smem.shape[-1]), jnp.float32)
    dk, dv = pl.run_scoped(accumulate, acc, acc)
    _store_dkv(dk * scale, dv, None, ks, vs, None, (dk_ref, dv_ref, None), bi=bi, hk=hi,
               keys=keys)

  @pl.when(wg == 2)
  def _producer():
    _stream_kv({"idx": _Consecutive(g0), "k": q_ref, "v": do_ref}, n, (), bi, hi,
               (q_smem, do_smem), (qdo_bar, qdo_bar), (qdo_free, None), block_k=TILE,
               num_stages=num_stages)


BACKWARDS = ("mosaic", "triton")


def _pad_meta(glen, gother, g2: int):
  """Group metadata for G2 groups: a padded group has no tokens and is its own segment."""
  b, gp = glen.shape
  if gp >= g2:
    return glen.astype(jnp.int32), gother.astype(jnp.int32)
  own = jnp.broadcast_to(jnp.arange(gp, g2, dtype=jnp.int32), (b, g2 - gp))
  return (_pad_to(glen, 1, g2).astype(jnp.int32),
          jnp.concatenate([gother.astype(jnp.int32), own], 1))


def bwd_stages(d: int, itemsize: int, most: int | None = None) -> tuple[int, int]:
  """(dQ kernel's K/V stages, dK/dV kernel's Q/dO stages): `most` (default NUM_STAGES) where it
  fits in shared memory, else as many as fit (at least 1)."""
  most = NUM_STAGES if most is None else most
  stage = 2 * TILE * d * itemsize  # one tile of K and V (or Q and dO)
  budget = SMEM_BYTES - 4096  # barriers, alignment
  held_dq = 2 * 2 * WG_ROWS * d * itemsize  # Q, dO of both consumers
  held_dkv = held_dq + 2 * 2 * WG_ROWS * TILE * itemsize  # K, V; P, dS
  return tuple(max(1, min(most, (budget - held) // stage)) for held in (held_dq, held_dkv))


def backward(q, k, v, lse, do, delta, glen, gfirst, glast, *, lt: int, scale: float,
             interpret: bool = False, num_warps: int | None = None, num_stages: int | None = None,
             q_groups: int = 1, kv_splits: int = 1, bwd: str = "mosaic"):
  """dq, dk, dv [B, N, H, D], pallas_gpu.backward's contract (lse [B, H, N] log2 units, delta
  [B, H, N] = rowsum(o * do) float32, do zero on invalid slots; dk's last slot of each group
  the landmark key's gradient).

  bwd="triton": pallas_gpu.backward (all settings go to it). bwd="mosaic": two Mosaic GPU
  kernels, grid (H, G2 / 2, B) each, a CTA of two consumer warpgroups (one group each) and a
  TMA producer:
    landmark_grouped_mgpu_dq   query groups 2 ci, 2 ci + 1 stream the forward's key groups
                               (cta_range), dQ += dS K;
    landmark_grouped_mgpu_dkv  key groups 2 ci, 2 ci + 1 stream their query groups (dkv_range:
                               own group, then the later groups of the segment), dK += dS^T Q,
                               dV += P^T dO.
  num_stages: the most pipeline stages of each (bwd_stages fits them in shared memory);
  num_warps, q_groups, kv_splits are the Triton kernels' settings, ignored here."""
  if bwd not in BACKWARDS:
    raise ValueError(f"grouped_softmax pallas_mosaic_gpu: bwd={bwd!r} is not one of {BACKWARDS}")
  if bwd == "triton":
    return pallas_gpu.backward(q, k, v, lse, do, delta, glen, gfirst, glast, lt=lt, scale=scale,
                               interpret=interpret, num_warps=num_warps, num_stages=num_stages,
                               q_groups=q_groups, kv_splits=kv_splits)
  del num_warps, q_groups, kv_splits
  _check(q, k, v, lt, interpret)
  if num_stages is not None and num_stages < 1:
    raise ValueError(f"grouped_softmax pallas_mosaic_gpu: num_stages={num_stages} must be >= 1")
  b, n, h, d = q.shape
  n_groups = n // lt
  g2 = 2 * -(-n_groups // 2)
  n2 = g2 * lt
  dq_stages, dkv_stages = bwd_stages(d, q.dtype.itemsize, num_stages)
  glen2, gfirst2 = _pad_meta(glen, gfirst, g2)
  _, glast2 = _pad_meta(glen, glast, g2)
  # Padded slots (an odd G's last CTA): q = do = 0, lse = delta = 0, so they add nothing.
  qp, dop = _pad_to(q, 1, n2), _pad_to(do.astype(q.dtype), 1, n2)
  lsep, deltap = _pad_to(lse, 2, n2), _pad_to(delta.astype(jnp.float32), 2, n2)
  kp, vp = _pad_to(k, 1, n2), _pad_to(v, 1, n2)
  vecs = {"lse": lsep, "delta": deltap}
  grid = dict(grid=(h, g2 // 2, b))
  dq = _launch(
      functools.partial(_dq_kernel, scale=scale, n_groups=n_groups, num_stages=dq_stages),
      "landmark_grouped_mgpu_dq",
      {"q": qp, "k": k, "v": v, "do": dop, **vecs, "glen": glen2, "gfirst": gfirst2},
      out_type=jax.ShapeDtypeStruct((b, n2, h, d), q.dtype),
      scratch=[
          _smem((2, WG_ROWS, d), q.dtype),
          _smem((2, WG_ROWS, d), q.dtype),
          _smem((dq_stages, TILE, d), k.dtype),
          _smem((dq_stages, TILE, d), v.dtype),
          plgpu.Barrier(num_arrivals=2, num_barriers=2),
          plgpu.Barrier(num_arrivals=2, num_barriers=dq_stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=dq_stages),
      ],
      **grid, grid_names=("h", "q", "b"))
  dk, dv = _launch(
      functools.partial(_dkv_kernel, scale=scale, n_groups=n_groups, num_stages=dkv_stages),
      "landmark_grouped_mgpu_dkv",
      {"q": q, "k": kp, "v": vp, "do": do.astype(q.dtype), **vecs, "glen": glen2,
       "glast": glast2},
      out_type=[jax.ShapeDtypeStruct((b, n2, h, d), k.dtype),
                jax.ShapeDtypeStruct((b, n2, h, d), v.dtype)],
      scratch=[
          _smem((2, WG_ROWS, d), k.dtype),
          _smem((2, WG_ROWS, d), v.dtype),
          _smem((dkv_stages, TILE, d), q.dtype),
          _smem((dkv_stages, TILE, d), q.dtype),
          _smem((2, WG_ROWS, TILE), q.dtype),
          _smem((2, WG_ROWS, TILE), q.dtype),
          plgpu.Barrier(num_arrivals=2, num_barriers=2),
          plgpu.Barrier(num_arrivals=2, num_barriers=dkv_stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=dkv_stages),
      ],
      **grid, grid_names=("h", "k", "b"))
  if g2 != n_groups:
    dq, dk, dv = dq[:, :n], dk[:, :n], dv[:, :n]
  return dq, dk, dv
