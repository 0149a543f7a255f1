"""Landmark grouped softmax, forward, in Pallas Mosaic GPU (Hopper: warpgroups, wgmma, TMA).

Same contract as pallas_gpu.py's `forward`: q, k, v [B, N = G * Lt, H, D] in the group-tiled
layout of api.py (group g in slots [g * Lt, g * Lt + len[g]), k's last slot of each tile the
group's landmark key, v's zero), glen / gfirst [B, Gp] int32 (tokens and first group of the
segment per group; absent groups len 0, first = own index); returns o [B, N, H, D] in q's dtype
and lse [B, H, N] float32 in log2 units (0 on slots of absent groups), the residuals
pallas_gpu.backward takes. Only the forward is here: api.py's impl="pallas_mosaic_gpu" runs this
kernel and differentiates with the Triton backward kernels of pallas_gpu.py on its o and lse.

One kernel, grid (H, G2 / 2, B) with G2 = G rounded up to even; a CTA is three warpgroups, the
block-sparse Mosaic forward's (block_sparse/pallas_mosaic_gpu.py `_fwd_kernel`) with the
grouped epilogue:

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
from effattn.kernels.block_sparse.pallas_mosaic_gpu import (DTYPES, HEAD_DIMS, REGISTERS,
                                                            WG_ROWS, _WGMMA, _ROW, _bcast,
                                                            _launch, _pad_to, _sched_sync, _smem,
                                                            _stream_kv)
# No Mosaic backward yet: api.py differentiates this forward with the Triton kernels, whose
# residuals (o, lse in log2 units) it returns as they are.
from effattn.kernels.grouped_softmax.pallas_gpu import backward  # noqa: F401  (re-exported)

TILE = WG_ROWS  # Lt: a group tile is one consumer's 64 query rows and one 64-key K/V tile
NUM_STAGES = 4  # K/V stages: a 64-key stage is 16 KB (d 64) or 32 KB (d 128) of K and V


def _check(q, k, v, lt: int, interpret: bool):
  """ValueError, one line naming the argument and the fix, for what this kernel cannot run."""
  if interpret:
    raise ValueError("grouped_softmax pallas_mosaic_gpu: interpret=True cannot run (Mosaic GPU "
                     "has no CPU interpreter for wgmma); use impl='pallas_gpu' with "
                     "interpret=True")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in DTYPES:
      raise ValueError(f"grouped_softmax pallas_mosaic_gpu: {name}.dtype={x.dtype} is not "
                       "bfloat16 or float16 (wgmma); cast to bfloat16 or use impl='pallas_gpu'")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"grouped_softmax pallas_mosaic_gpu: q, k, v dtypes differ ({q.dtype}, "
                     f"{k.dtype}, {v.dtype}); cast them to one of bfloat16, float16")
  if q.shape[-1] not in HEAD_DIMS:
    raise ValueError(f"grouped_softmax pallas_mosaic_gpu: head_dim={q.shape[-1]} is not one of "
                     f"{HEAD_DIMS}; use impl='pallas_gpu'")
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


def _fwd_kernel(q_ref, k_ref, v_ref, glen_ref, gfirst_ref, o_ref, lse_ref, q_smem, k_smem,
                v_smem, lse_smem, q_bar, k_bar, v_bar, k_free, v_free, sched, *, scale,
                n_groups, num_stages):
  hi, ci, bi = lax.axis_index("h"), lax.axis_index("q"), lax.axis_index("b")
  wg = lax.axis_index("wg")
  g0 = ci * 2
  lo, n = cta_range(gfirst_ref[bi, g0], gfirst_ref[bi, g0 + 1], g0, n_groups)
  dtype = q_smem.dtype
  tile = (WG_ROWS, TILE)
  c2 = scale * LOG2E

  def iota(dim):
    return plgpu.broadcasted_iota(jnp.int32, tile, dim, layout=_WGMMA)

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
      plgpu.barrier_wait(k_bar.at[slot])

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, qs, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        _sched_sync(sched)
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC(tile, jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      p, alpha, m_new, l = tile_update(s * c2, n_k, land, own, m, l, iota=iota,
                                       bcast=lambda x: _bcast(x, tile, 0))
      acc = acc * _bcast(alpha, acc.shape, 0)
      p16 = p.astype(dtype)
      acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
      plgpu.barrier_arrive(sched)  # softmax done: let the other warpgroup's QK^T in
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_wait(sched)

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

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
            kv_splits: int = 1):
  """q, k, v [B, N = G * Lt, H, D] (group-tiled, k with each group's landmark key in its last
  slot), glen / gfirst [B, Gp] int32. Returns o [B, N, H, D] in q's dtype and lse [B, H, N]
  float32 in log2 units, as pallas_gpu.forward.

  num_stages: the K/V pipeline depth (default NUM_STAGES). num_warps, q_groups and kv_splits
  are the Triton kernels' settings, accepted so both take the same ones and ignored (a CTA is
  always three warpgroups over two groups)."""
  del num_warps, q_groups, kv_splits
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
      scratch=[
          _smem((2, WG_ROWS, d), q.dtype),
          _smem((num_stages, TILE, d), k.dtype),
          _smem((num_stages, TILE, d), v.dtype),
          plgpu.SMEM((2, WG_ROWS), jnp.float32),
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_barriers=num_stages),
          plgpu.Barrier(num_barriers=num_stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),
          plgpu.Barrier(num_arrivals=2),
      ],
      grid=(h, g2 // 2, b),
      grid_names=("h", "q", "b"),
  )
  if g2 != n_groups:
    o, lse = o[:, :n], lse[:, :, :n]
  return o, lse
