"""Landmark grouped softmax as Pallas Mosaic TPU kernels (verified in interpret mode on CPU).

Same contract as pallas_gpu.py (the group-tiled layout of api.py, lse in log2 units), so
api.py swaps the two modules freely; the tile math is common.py's.
The per-group lengths and first / last group indices are scalar-prefetched into SMEM and drive
the index maps, and the grid walks pairs of group tiles:

  forward, dQ  grid (B, H, G_q, G_k): key group gk is the last ("arbitrary") axis; its index map
               clamps gk into [first[gq], gq], so steps outside that range repeat a neighbour's
               block (no new DMA) and pl.when skips their compute. Steps gk < gq are the
               landmark path, gk == gq the causal own group; the running (acc, m, l) or dq live
               in VMEM scratch and are written at the last step;
  dK/dV        grid (B, H, G_k, G_q): the mirror image over query groups in [gk, last[gk]].

TPU tiles want the sequence on the second-minor axis, so the kernels work in [B, H, N, D]
(transposed at the boundary); per-slot vectors (lse, delta) are [B, H, G, 1, Lt], whose blocks
span their last two axes whole (any Lt). Each group's landmark key is the last slot of its k
tile (common.py), so its gradient is the last row of the tile's dK.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effattn.kernels.grouped_softmax import common as tiles
from effattn.kernels.block_sparse.common import LOG2E, dot

_F32 = jnp.float32
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _heads_first(x):
  """[B, N, H, D] -> [B, H, N, D]."""
  return jnp.swapaxes(x, 1, 2)


def _per_group(x, lt: int):
  """[B, H, N] -> [B, H, G, 1, Lt]."""
  b, h, n = x.shape
  return x.reshape(b, h, n // lt, 1, lt)


def _specs(lt: int, d: int, other):
  """BlockSpecs on grid (B, H, own group g, step s) with scalar prefetch (len, first | last):
  (tile, per-slot vector) of the own group and of the visited one, whose index is
  other(bi, g, s, bound_ref)."""

  def own(block_rank):
    return lambda bi, hi, g, s, *_: (bi, hi, g) + (0,) * block_rank

  def visited(block_rank):
    return lambda bi, hi, g, s, _, bound_ref: ((bi, hi, other(bi, g, s, bound_ref))
                                                + (0,) * block_rank)

  tile, row = (None, None, lt, d), lambda width: (None, None, None, 1, width)  # noqa: E731
  return (pl.BlockSpec(tile, own(1)), pl.BlockSpec(tile, visited(1)),
          pl.BlockSpec(row(lt), own(2)), pl.BlockSpec(row(lt), visited(2)))


def _call(kernel, args, grid, in_specs, out_specs, out_shape, scratch, name, interpret):
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid,
                                             in_specs=in_specs, out_specs=out_specs,
                                             scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
      interpret=interpret,
      name=name,
  )(*args)


def _key_group(bi, gq, gk, first_ref):
  """Forward / dQ: key group visited at step gk of query group gq, clamped into
  [first[gq], gq] (in range even on a layout whose `ok` is false)."""
  return jnp.minimum(jnp.maximum(gk, first_ref[bi, gq]), gq)


def _query_group(ng: int):
  """dK/dV: query group visited at step gq of key group gk, clamped into [gk, last[gk]]."""
  return lambda bi, gk, gq, last_ref: jnp.minimum(jnp.maximum(gq, gk),
                                                  jnp.minimum(last_ref[bi, gk], ng - 1))


def forward(q, k, v, glen, gfirst, *, lt: int, scale: float, interpret: bool = False,
            num_warps: int | None = None, num_stages: int | None = None, q_groups: int = 1,
            kv_splits: int = 1):
  """q, k, v [B, N = G * Lt, H, D] (group-tiled, k with each group's landmark key in its last
  slot), glen / gfirst [B, Gp] int32.

  Returns o [B, N, H, D] in q's dtype and lse [B, H, N] float32 in log2 units.
  num_warps / num_stages / q_groups / kv_splits: Triton settings, accepted for pallas_gpu.py's
  signature and unused here (the grid visits one group pair per step).
  """
  del num_warps, num_stages, q_groups, kv_splits
  b, n, h, d = q.shape
  ng = n // lt
  c2 = scale * LOG2E
  tile_own, tile_other, vec_own, _ = _specs(lt, d, _key_group)

  def kernel(len_ref, first_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, acc_sc, m_sc, l_sc):
    bi, gq, gk = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(gk == 0)
    def _init():
      acc, m, l = tiles.init_stats(lt, d)
      acc_sc[...], m_sc[...], l_sc[...] = acc, m[:, None], l[:, None]

    def update(step):
      stats = step(acc_sc[...], m_sc[...][:, 0], l_sc[...][:, 0])
      acc_sc[...], m_sc[...], l_sc[...] = stats[0], stats[1][:, None], stats[2][:, None]

    @pl.when((gk >= first_ref[bi, gq]) & (gk <= gq))
    def _visit():  # an earlier group of the segment (landmark path) or the own group
      update(lambda *st: tiles.fwd_step(q_ref[...], k_ref[...], v_ref[...], len_ref[bi, gk],
                                        gk < gq, gk == gq, c2, lt, *st))

    @pl.when(gk == ng - 1)
    def _finish():
      o, lse = tiles.fwd_finish(acc_sc[...], m_sc[...][:, 0], l_sc[...][:, 0])
      o_ref[...] = o.astype(o_ref.dtype)
      lse_ref[...] = lse[None]

  o, lse = _call(
      kernel, (glen, gfirst, _heads_first(q), _heads_first(k), _heads_first(v)),
      grid=(b, h, ng, ng),
      in_specs=[tile_own, tile_other, tile_other],
      out_specs=[tile_own, vec_own],
      out_shape=[jax.ShapeDtypeStruct((b, h, n, d), q.dtype),
                 jax.ShapeDtypeStruct((b, h, ng, 1, lt), _F32)],
      scratch=[pltpu.VMEM((lt, d), _F32), pltpu.VMEM((lt, 1), _F32), pltpu.VMEM((lt, 1), _F32)],
      name="landmark_grouped_tpu_fwd", interpret=interpret)
  return _heads_first(o), lse.reshape(b, h, n)


def _dq(args, *, b, h, ng, lt, d, c2, scale, dtype, interpret):
  tile_own, tile_other, vec_own, _ = _specs(lt, d, _key_group)

  def kernel(len_ref, first_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc):
    bi, gq, gk = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    rows = lambda: (do_ref[...], lse_ref[0], delta_ref[0])  # noqa: E731

    @pl.when(gk == 0)
    def _init():
      dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

    @pl.when((gk >= first_ref[bi, gq]) & (gk <= gq))
    def _visit():
      k = k_ref[...]
      _, ds = tiles.grads_step(q_ref[...], k, v_ref[...], len_ref[bi, gk], gk < gq, gk == gq,
                               *rows(), c2, lt)
      dq_sc[...] += dot(ds.astype(k.dtype), k)

    @pl.when(gk == ng - 1)
    def _finish():
      dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)

  return _call(
      kernel, args, grid=(b, h, ng, ng),
      in_specs=[tile_own, tile_other, tile_other, tile_own, vec_own, vec_own],
      out_specs=tile_own,
      out_shape=jax.ShapeDtypeStruct((b, h, ng * lt, d), dtype),
      scratch=[pltpu.VMEM((lt, d), _F32)],
      name="landmark_grouped_tpu_dq", interpret=interpret)


def _dkv(args, *, b, h, ng, lt, d, c2, scale, dtypes, interpret):
  tile_own, tile_other, _, vec_other = _specs(lt, d, _query_group(ng))

  def kernel(len_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
             dk_sc, dv_sc):
    bi, gk, gq = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    rows = lambda: (do_ref[...], lse_ref[0], delta_ref[0])  # noqa: E731
    n_k = len_ref[bi, gk]

    @pl.when(gq == 0)
    def _init():
      dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
      dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

    @pl.when((gq >= gk) & (gq <= last_ref[bi, gk]))
    def _visit():  # the own group's queries, or a later group's of the segment
      q, (do, lse, delta) = q_ref[...], rows()
      p, ds = tiles.grads_step(q, k_ref[...], v_ref[...], n_k, gq > gk, gq == gk, do, lse, delta,
                               c2, lt)
      dk_sc[...] += dot(ds.astype(q.dtype), q, trans_a=True)
      dv_sc[...] += dot(p.astype(do.dtype), do, trans_a=True)

    @pl.when(gq == ng - 1)
    def _finish():
      dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
      dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)

  n = ng * lt
  return _call(
      kernel, args, grid=(b, h, ng, ng),
      in_specs=[tile_other, tile_own, tile_own, tile_other, vec_other, vec_other],
      out_specs=[tile_own, tile_own],
      out_shape=[jax.ShapeDtypeStruct((b, h, n, d), dtypes[0]),
                 jax.ShapeDtypeStruct((b, h, n, d), dtypes[1])],
      scratch=[pltpu.VMEM((lt, d), _F32), pltpu.VMEM((lt, d), _F32)],
      name="landmark_grouped_tpu_dkv", interpret=interpret)


def backward(q, k, v, lse, do, delta, glen, gfirst, glast, *, lt: int, scale: float,
             interpret: bool = False, num_warps: int | None = None, num_stages: int | None = None,
             q_groups: int = 1, kv_splits: int = 1):
  """dq, dk, dv [B, N, H, D] (input dtypes; dk's last slot of each group: the landmark key's).

  lse [B, H, N] from forward (log2 units); delta [B, H, N] = rowsum(o * do) in float32; do is
  zero on invalid slots. num_warps / num_stages / q_groups / kv_splits: unused (see forward).
  """
  del num_warps, num_stages, q_groups, kv_splits
  b, n, h, d = q.shape
  ng = n // lt
  kw = dict(b=b, h=h, ng=ng, lt=lt, d=d, c2=scale * LOG2E, scale=scale, interpret=interpret)
  tensors = (*(_heads_first(x) for x in (q, k, v)), _heads_first(do), _per_group(lse, lt),
             _per_group(delta, lt))
  dq = _dq((glen, gfirst, *tensors), dtype=q.dtype, **kw)
  dk, dv = _dkv((glen, glast, *tensors), dtypes=(k.dtype, v.dtype), **kw)
  return _heads_first(dq), _heads_first(dk), _heads_first(dv)
