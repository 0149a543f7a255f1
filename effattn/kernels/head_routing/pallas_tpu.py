"""Head-routed flash attention in Pallas Mosaic TPU (verified in interpret mode on CPU).

Same compacted inputs and contract as pallas_gpu.py. The key range of every compacted query
tile ([lo, hi) key blocks, masked from lo on) and the slot ranges of every key tile are
scalar-prefetched into SMEM and drive the index maps: the pipeline DMAs only tiles inside the
range (steps past it repeat the last block index, so no new DMA, and skip compute). Running
statistics live in VMEM scratch across the innermost grid axis. TPU tiles want the sequence on
the second-minor axis, so this path works in [B, H, T, D] (transposed at the boundary) and keeps
per-slot vectors as [B, H, 1, T].

Backward: dQ on the forward grid; dK/dV per query head on grid (B, H, nK, nQ), summed over each
GQA group outside the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effattn.kernels.head_routing.common import EMPTY_LSE, LOG2E, MASK_VALUE, dot, tile_mask

_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def query_tile_key_ranges(pos, *, causal: bool, has_seg: bool, block_q: int, block_k: int,
                          kv_len: int):
  """pos [B, H, T] -> (lo, hi) [B, H, nQ] int32: key blocks [0, hi), unmasked below lo."""
  b, h, t = pos.shape
  tiles = pos.reshape(b, h, t // block_q, block_q)
  first, last = tiles[..., 0], jnp.max(tiles, axis=-1)
  empty = first < 0
  if causal:
    hi = jnp.where(empty, 0, jnp.maximum(last, 0) // block_k + 1)
    lo = jnp.where(empty, 0, jnp.maximum(first, 0) // block_k)
  else:
    hi = jnp.where(empty, 0, t // block_k)
    lo = jnp.where(empty, 0, kv_len // block_k)
  if has_seg:
    lo = jnp.zeros_like(lo)
  return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _clamp(j, hi):
  """Block index to fetch at step j: past the range, repeat the last block (no new DMA)."""
  return jnp.minimum(j, jnp.maximum(hi - 1, 0))


def _vec(x):
  """[B, H?, T] -> [B, H?, 1, T] (rows of one-slot vectors)."""
  return None if x is None else x[..., None, :]


def _q_specs(d, block_q, block_k, group, has_seg, with_grad: bool):
  """Index maps of the (B, H, nQ, nK) grid with prefetched (lo, hi) [B, H, nQ]."""
  q_tile = pl.BlockSpec((None, None, block_q, d), lambda b, h, i, j, lo, hi: (b, h, i, 0))
  q_vec = pl.BlockSpec((None, None, 1, block_q), lambda b, h, i, j, lo, hi: (b, h, 0, i))
  kv_tile = pl.BlockSpec((None, None, block_k, d), lambda b, h, i, j, lo, hi: (
      b, h // group, _clamp(j, hi[b, h, i]), 0))
  specs = {"q": q_tile, "k": kv_tile, "v": kv_tile, "pos": q_vec}
  if with_grad:
    specs.update(do=q_tile, lse=q_vec, delta=q_vec)
  if has_seg:
    specs["q_seg"] = q_vec
    specs["kv_seg"] = pl.BlockSpec((None, 1, block_k), lambda b, h, i, j, lo, hi: (
        b, 0, _clamp(j, hi[b, h, i])))
  return specs, q_tile, q_vec


def forward(q, k, v, pos, q_seg, kv_seg, *, causal: bool, scale: float, block_q: int,
            block_k: int, kv_len: int, interpret: bool = False):
  """Same contract as pallas_gpu.forward."""
  b, t, h, d = q.shape
  group = h // k.shape[2]
  has_seg = q_seg is not None
  lo, hi = query_tile_key_ranges(pos, causal=causal, has_seg=has_seg, block_q=block_q,
                                 block_k=block_k, kv_len=kv_len)
  specs, q_tile, q_vec = _q_specs(d, block_q, block_k, group, has_seg, with_grad=False)
  args = {"q": jnp.swapaxes(q, 1, 2), "k": jnp.swapaxes(k, 1, 2), "v": jnp.swapaxes(v, 1, 2),
          "pos": _vec(pos)}
  if has_seg:
    args.update(q_seg=_vec(q_seg), kv_seg=_vec(kv_seg))
  names = tuple(args)
  n_kb = t // block_k

  def kernel(lo_ref, hi_ref, *refs):
    r = dict(zip(names, refs))
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[len(names):]
    bi, hi_, i, j = (pl.program_id(a) for a in range(4))
    lo_j, hi_j = lo_ref[bi, hi_, i], hi_ref[bi, hi_, i]

    @pl.when(j == 0)
    def _init():
      m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
      l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
      acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked: bool):
      s = dot(r["q"][...], r["k"][...], trans_b=True) * (scale * LOG2E)
      if masked:
        mask = tile_mask(j * block_k + jnp.arange(block_k, dtype=jnp.int32), r["pos"][0],
                         r["q_seg"][0] if has_seg else None, r["kv_seg"][0] if has_seg else None,
                         causal=causal, kv_len=kv_len, block_q=block_q)
        s = jnp.where(mask, s, MASK_VALUE)
      m_prev = m_sc[...][:, 0]
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
      alpha = jnp.exp2(m_prev - m_new)
      p = jnp.exp2(s - m_new[:, None])
      if masked:
        p = jnp.where(mask, p, 0.0)
      l_sc[...] = (alpha * l_sc[...][:, 0] + jnp.sum(p, axis=1))[:, None]
      m_sc[...] = m_new[:, None]
      v = r["v"][...]
      acc_sc[...] = alpha[:, None] * acc_sc[...] + dot(p.astype(v.dtype), v)

    pl.when(j < jnp.minimum(lo_j, hi_j))(functools.partial(step, False))
    pl.when((j >= lo_j) & (j < hi_j))(functools.partial(step, True))

    @pl.when(j == n_kb - 1)
    def _finish():
      l = l_sc[...][:, 0]
      seen = (l > 0.0) & (r["pos"][0] >= 0)
      l_safe = jnp.where(seen, l, 1.0)
      o_ref[...] = jnp.where(seen[:, None], acc_sc[...] / l_safe[:, None],
                             0.0).astype(o_ref.dtype)
      lse_ref[...] = jnp.where(seen, m_sc[...][:, 0] + jnp.log2(l_safe), EMPTY_LSE)[None]

  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, t // block_q, n_kb),
          in_specs=[specs[n] for n in names], out_specs=[q_tile, q_vec],
          scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32),
                          pltpu.VMEM((block_q, 1), jnp.float32),
                          pltpu.VMEM((block_q, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, h, t, d), q.dtype),
                 jax.ShapeDtypeStruct((b, h, 1, t), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
      interpret=interpret,
      name="head_routing_tpu_fwd",
  )(lo, hi, *(args[n] for n in names))
  return jnp.swapaxes(o, 1, 2), lse[:, :, 0]


def _dq(args, lo, hi, *, causal, scale, block_q, block_k, kv_len, has_seg, group, interpret):
  b, h, t, d = args["q"].shape
  specs, q_tile, _ = _q_specs(d, block_q, block_k, group, has_seg, with_grad=True)
  names = tuple(n for n in specs if n in args)

  def kernel(lo_ref, hi_ref, *refs):
    r = dict(zip(names, refs))
    dq_ref, dq_sc = refs[len(names):]
    bi, hi_, i, j = (pl.program_id(a) for a in range(4))
    lo_j, hi_j = lo_ref[bi, hi_, i], hi_ref[bi, hi_, i]

    @pl.when(j == 0)
    def _init():
      dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked: bool):
      k = r["k"][...]
      p = jnp.exp2(dot(r["q"][...], k, trans_b=True) * (scale * LOG2E) - r["lse"][0][:, None])
      if masked:
        mask = tile_mask(j * block_k + jnp.arange(block_k, dtype=jnp.int32), r["pos"][0],
                         r["q_seg"][0] if has_seg else None, r["kv_seg"][0] if has_seg else None,
                         causal=causal, kv_len=kv_len, block_q=block_q)
        p = jnp.where(mask, p, 0.0)
      ds = p * (dot(r["do"][...], r["v"][...], trans_b=True) - r["delta"][0][:, None])
      dq_sc[...] += dot(ds.astype(k.dtype), k)

    pl.when(j < jnp.minimum(lo_j, hi_j))(functools.partial(step, False))
    pl.when((j >= lo_j) & (j < hi_j))(functools.partial(step, True))

    @pl.when(j == t // block_k - 1)
    def _finish():
      dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)

  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, t // block_q, t // block_k),
          in_specs=[specs[n] for n in names], out_specs=q_tile,
          scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((b, h, t, d), args["q"].dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
      interpret=interpret,
      name="head_routing_tpu_dq",
  )(lo, hi, *(args[n] for n in names))


def _dkv(args, bounds, *, causal, scale, block_q, block_k, has_seg, group, interpret):
  """Per query head dk, dv [B, H, T, D] float32 over the compacted slot ranges of each key tile."""
  b, h, t, d = args["q"].shape
  lo_s, mid_s, hi_s = bounds  # slots [B, H, nK]
  # In query-tile units: masked tiles [m_lo, m_hi), unmasked [m_hi, u_hi).
  m_lo = lo_s // block_q
  m_hi = (mid_s + block_q - 1) // block_q
  u_hi = (hi_s + block_q - 1) // block_q

  def q_index(b_, h_, j, i, m_lo, m_hi, u_hi):
    return jnp.clip(i, m_lo[b_, h_, j], jnp.maximum(u_hi[b_, h_, j] - 1, 0))

  q_tile = pl.BlockSpec((None, None, block_q, d), lambda b_, h_, j, i, *s: (
      b_, h_, q_index(b_, h_, j, i, *s), 0))
  q_vec = pl.BlockSpec((None, None, 1, block_q), lambda b_, h_, j, i, *s: (
      b_, h_, 0, q_index(b_, h_, j, i, *s)))
  kv_tile = pl.BlockSpec((None, None, block_k, d), lambda b_, h_, j, i, *s: (b_, h_ // group, j, 0))
  specs = {"q": q_tile, "do": q_tile, "lse": q_vec, "delta": q_vec, "pos": q_vec,
           "k": kv_tile, "v": kv_tile}
  if has_seg:
    specs["q_seg"] = q_vec
    specs["kv_seg"] = pl.BlockSpec((None, 1, block_k), lambda b_, h_, j, i, *s: (b_, 0, j))
  names = tuple(n for n in specs if n in args)

  def kernel(m_lo_ref, m_hi_ref, u_hi_ref, *refs):
    r = dict(zip(names, refs))
    dk_ref, dv_ref, dk_sc, dv_sc = refs[len(names):]
    bi, hi_, j, i = (pl.program_id(a) for a in range(4))
    lo_i, mid_i, hi_i = m_lo_ref[bi, hi_, j], m_hi_ref[bi, hi_, j], u_hi_ref[bi, hi_, j]

    @pl.when(i == 0)
    def _init():
      dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
      dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked: bool):
      q, do, k = r["q"][...], r["do"][...], r["k"][...]
      p = jnp.exp2(dot(q, k, trans_b=True) * (scale * LOG2E) - r["lse"][0][:, None])
      if masked:
        kv_idx = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        if causal:
          mask = kv_idx[None, :] <= r["pos"][0][:, None]
        else:  # keys past kv_len only feed their own (discarded) dk / dv rows
          mask = jnp.ones((block_q, block_k), jnp.bool_)
        if has_seg:
          mask = mask & (r["q_seg"][0][:, None] == r["kv_seg"][0][None, :])
        p = jnp.where(mask, p, 0.0)
      dv_sc[...] += dot(p.astype(do.dtype), do, trans_a=True)
      ds = p * (dot(do, r["v"][...], trans_b=True) - r["delta"][0][:, None])
      dk_sc[...] += dot(ds.astype(q.dtype), q, trans_a=True)

    pl.when((i >= lo_i) & (i < mid_i))(functools.partial(step, True))
    pl.when((i >= mid_i) & (i < hi_i))(functools.partial(step, False))

    @pl.when(i == t // block_q - 1)
    def _finish():
      dk_ref[...] = dk_sc[...] * scale
      dv_ref[...] = dv_sc[...]

  out = pl.BlockSpec((None, None, block_k, d), lambda b_, h_, j, i, *s: (b_, h_, j, 0))
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, h, t // block_k, t // block_q),
          in_specs=[specs[n] for n in names], out_specs=[out, out],
          scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32),
                          pltpu.VMEM((block_k, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, h, t, d), jnp.float32)] * 2,
      compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
      interpret=interpret,
      name="head_routing_tpu_dkv",
  )(m_lo.astype(jnp.int32), m_hi.astype(jnp.int32), u_hi.astype(jnp.int32),
    *(args[n] for n in names))


def backward(q, k, v, pos, q_seg, kv_seg, lse, do, delta, bounds, *, causal: bool, scale: float,
             block_q: int, block_k: int, kv_len: int, interpret: bool = False):
  """Same contract as pallas_gpu.backward."""
  b, t, h, d = q.shape
  h_kv = k.shape[2]
  group = h // h_kv
  has_seg = q_seg is not None
  args = {"q": jnp.swapaxes(q, 1, 2), "k": jnp.swapaxes(k, 1, 2), "v": jnp.swapaxes(v, 1, 2),
          "do": jnp.swapaxes(do, 1, 2), "lse": _vec(lse), "delta": _vec(delta), "pos": _vec(pos)}
  if has_seg:
    args.update(q_seg=_vec(q_seg), kv_seg=_vec(kv_seg))
  lo, hi = query_tile_key_ranges(pos, causal=causal, has_seg=has_seg, block_q=block_q,
                                 block_k=block_k, kv_len=kv_len)
  kw = dict(causal=causal, scale=scale, block_q=block_q, block_k=block_k, has_seg=has_seg,
            group=group, interpret=interpret)
  dq = _dq(args, lo, hi, kv_len=kv_len, **kw)
  dk, dv = _dkv(args, bounds, **kw)
  # Sum the per-query-head key gradients over each GQA group.
  dk = dk.reshape(b, h_kv, group, t, d).sum(2)
  dv = dv.reshape(b, h_kv, group, t, d).sum(2)
  return (jnp.swapaxes(dq, 1, 2), jnp.swapaxes(dk, 1, 2).astype(k.dtype),
          jnp.swapaxes(dv, 1, 2).astype(v.dtype))
