"""Head-routed flash attention in Pallas with the Triton lowering (GPU).

Inputs are compacted per head by api.py (common.py explains the layout): query tile i of head h
holds routed tokens pos[b, h, i*bq : (i+1)*bq] in increasing order (-1 past the head's count).
Three kernels:
  forward  grid (nQ, B, H):     o and lse of one compacted query tile. A tile past the count
                                does no work; a causal tile visits key blocks 0..max(pos) // bk,
                                unmasked below its first position and masked from there on.
  dQ       grid (nQ, B, H):     dq of one tile over the same key range.
  dK/dV    grid (nK, B, H_kv):  dk, dv of one key tile over the compacted query tiles that can
                                see it, for every query head sharing the key head (GQA without
                                repeated K/V); the slot ranges come from common.key_block_bounds.
Layout [B, T, H, D]; lse is kept in base 2 (exp2 is the native instruction). Output tiles are
*unweighted*: api.py applies the gates while scattering back (it needs o for d gates anyway).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effattn.kernels.head_routing.common import EMPTY_LSE, LOG2E, MASK_VALUE, dot, tile_mask


def _params(num_warps: int, num_stages: int):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _warps(block_q: int, block_k: int) -> int:
  return 4 if block_q * block_k <= 64 * 64 else 8


def _cdiv(a, b: int):
  return lax.div(a + (b - 1), b)  # a >= 0


def _key_range(pos, *, causal: bool, has_seg: bool, block_k: int, kv_len: int, num_kb: int):
  """Key blocks [0, hi) a compacted query tile visits; blocks below lo need no element mask.

  Reductions rather than pos[0]: Triton cannot extract one element of a loaded vector.
  """
  last = jnp.max(pos)
  empty = last < 0  # every slot unused
  if causal:
    first = jnp.min(jnp.where(pos >= 0, pos, jnp.iinfo(jnp.int32).max))
    hi = jnp.where(empty, 0, lax.div(jnp.maximum(last, 0), block_k) + 1)
    lo = jnp.where(empty, 0, lax.div(jnp.maximum(first, 0), block_k))
  else:
    hi = jnp.where(empty, jnp.int32(0), jnp.int32(num_kb))
    lo = jnp.where(empty, jnp.int32(0), jnp.int32(kv_len // block_k))
  if has_seg:
    lo = jnp.zeros_like(lo)
  # Explicit int32: weakly typed bounds become loop bounds of another type in Triton.
  return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _fwd_kernel(*refs, names, causal, scale, block_q, block_k, kv_len, num_kb):
  r = dict(zip(names, refs))
  o_ref, lse_ref = refs[len(names):]
  has_seg = "q_seg" in r
  q, pos = r["q"][...], r["pos"][...]
  q_seg = r["q_seg"][...] if has_seg else None
  lo, hi = _key_range(pos, causal=causal, has_seg=has_seg, block_k=block_k, kv_len=kv_len,
                      num_kb=num_kb)

  def step(j, carry, masked):
    acc, m, l = carry
    start = pl.multiple_of(j * block_k, block_k)
    k, v = r["k"][pl.ds(start, block_k), :], r["v"][pl.ds(start, block_k), :]
    s = dot(q, k, trans_b=True) * (scale * LOG2E)
    if masked:
      kv_seg = r["kv_seg"][pl.ds(start, block_k)] if has_seg else None
      mask = tile_mask(start + jnp.arange(block_k, dtype=jnp.int32), pos, q_seg, kv_seg,
                       causal=causal, kv_len=kv_len, block_q=block_q)
      s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if masked:
      p = jnp.where(mask, p, 0.0)
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v)
    return acc, m_new, l

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  carry = lax.fori_loop(0, lo, functools.partial(step, masked=False), carry)
  acc, m, l = lax.fori_loop(lo, hi, functools.partial(step, masked=True), carry)
  seen = (l > 0.0) & (pos >= 0)
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log2(l_safe), EMPTY_LSE)


def _dq_kernel(*refs, names, causal, scale, block_q, block_k, kv_len, num_kb):
  r = dict(zip(names, refs))
  (dq_ref,) = refs[len(names):]
  has_seg = "q_seg" in r
  q, do, pos = r["q"][...], r["do"][...], r["pos"][...]
  lse2, delta = r["lse"][...], r["delta"][...]
  q_seg = r["q_seg"][...] if has_seg else None
  lo, hi = _key_range(pos, causal=causal, has_seg=has_seg, block_k=block_k, kv_len=kv_len,
                      num_kb=num_kb)

  def step(j, dq, masked):
    start = pl.multiple_of(j * block_k, block_k)
    k, v = r["k"][pl.ds(start, block_k), :], r["v"][pl.ds(start, block_k), :]
    p = jnp.exp2(dot(q, k, trans_b=True) * (scale * LOG2E) - lse2[:, None])
    if masked:
      kv_seg = r["kv_seg"][pl.ds(start, block_k)] if has_seg else None
      mask = tile_mask(start + jnp.arange(block_k, dtype=jnp.int32), pos, q_seg, kv_seg,
                       causal=causal, kv_len=kv_len, block_q=block_q)
      p = jnp.where(mask, p, 0.0)
    ds = p * (dot(do, v, trans_b=True) - delta[:, None])
    return dq + dot(ds.astype(k.dtype), k)

  dq = jnp.zeros(q.shape, jnp.float32)
  dq = lax.fori_loop(0, lo, functools.partial(step, masked=False), dq)
  dq = lax.fori_loop(lo, hi, functools.partial(step, masked=True), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, names, group, causal, scale, block_q, block_k):
  r = dict(zip(names, refs))
  dk_ref, dv_ref = refs[len(names):]
  has_seg = "kv_seg" in r
  kb = pl.program_id(0)
  k, v = r["k"][...], r["v"][...]
  kv_idx = kb * block_k + jnp.arange(block_k, dtype=jnp.int32)
  kv_seg = r["kv_seg"][...] if has_seg else None
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for g in range(group):  # the query heads sharing this key head

    def step(i, carry, masked, g=g):
      dk, dv = carry
      start = pl.multiple_of(i * block_q, block_q)
      sl = pl.ds(start, block_q)
      q, do = r[f"q{g}"][sl, :], r[f"do{g}"][sl, :]
      p = jnp.exp2(dot(q, k, trans_b=True) * (scale * LOG2E) - r[f"lse{g}"][sl][:, None])
      if masked:  # keys past kv_len only feed their own (discarded) dk / dv rows: no mask
        mask = kv_idx[None, :] <= r[f"pos{g}"][sl][:, None] if causal else None
        if has_seg:
          seg_eq = r[f"q_seg{g}"][sl][:, None] == kv_seg[None, :]
          mask = seg_eq if mask is None else mask & seg_eq
        if mask is not None:
          p = jnp.where(mask, p, 0.0)
      dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
      ds = p * (dot(do, v, trans_b=True) - r[f"delta{g}"][sl][:, None])
      dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
      return dk, dv

    lo, mid, hi = r[f"lo{g}"][0], r[f"mid{g}"][0], r[f"hi{g}"][0]
    mid_blk = _cdiv(mid, block_q)
    carry = lax.fori_loop(lax.div(lo, block_q), mid_blk, functools.partial(step, masked=True), (dk, dv))
    dk, dv = lax.fori_loop(mid_blk, _cdiv(hi, block_q), functools.partial(step, masked=False),
                           carry)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _q_side_specs(t: int, d: int, block_q: int, group: int):
  """BlockSpecs of the (nQ, B, H) grid."""
  tile = pl.BlockSpec((None, block_q, None, d), lambda i, b, h: (b, i, h, 0))
  vec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
  whole_kv = pl.BlockSpec((None, t, None, d), lambda i, b, h: (b, 0, h // group, 0))
  kv_seg = pl.BlockSpec((None, t), lambda i, b, h: (b, 0))
  return tile, vec, whole_kv, kv_seg


def forward(q, k, v, pos, q_seg, kv_seg, *, causal: bool, scale: float, block_q: int,
            block_k: int, kv_len: int, interpret: bool = False, num_warps: int | None = None,
            num_stages: int = 2):
  """Compacted q [B, T, H, D], k / v [B, T, H_kv, D], pos / q_seg [B, H, T], kv_seg [B, T].

  T is padded to the block sizes; kv_len is the real length. Returns the unweighted o
  [B, T, H, D] and lse [B, H, T] float32 in base 2 (EMPTY_LSE for unused slots).
  """
  b, t, h, d = q.shape
  group = h // k.shape[2]
  tile, vec, whole_kv, kv_seg_spec = _q_side_specs(t, d, block_q, group)
  specs = {"q": tile, "k": whole_kv, "v": whole_kv, "pos": vec}
  args = {"q": q, "k": k, "v": v, "pos": pos}
  if q_seg is not None:
    specs.update(q_seg=vec, kv_seg=kv_seg_spec)
    args.update(q_seg=q_seg, kv_seg=kv_seg)
  names = tuple(args)
  kernel = functools.partial(_fwd_kernel, names=names, causal=causal, scale=scale,
                             block_q=block_q, block_k=block_k, kv_len=kv_len,
                             num_kb=t // block_k)
  return pl.pallas_call(
      kernel,
      grid=(t // block_q, b, h),
      in_specs=[specs[n] for n in names],
      out_specs=[tile, vec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      compiler_params=_params(num_warps or _warps(block_q, block_k), num_stages),
      interpret=interpret,
      name="head_routing_fwd",
  )(*(args[n] for n in names))


def backward(q, k, v, pos, q_seg, kv_seg, lse, do, delta, bounds, *, causal: bool, scale: float,
             block_q: int, block_k: int, kv_len: int, interpret: bool = False,
             num_warps: int | None = None, num_stages: int = 2):
  """dq (compacted) [B, T, H, D], dk / dv [B, T, H_kv, D].

  do: compacted cotangent of the unweighted o (zero in unused slots); delta [B, H, T] =
  rowsum(o * do); bounds = common.key_block_bounds(...) (lo, mid, hi) [B, H, nK].
  """
  b, t, h, d = q.shape
  h_kv = k.shape[2]
  group = h // h_kv
  warps = num_warps or _warps(block_q, block_k)
  tile, vec, whole_kv, kv_seg_spec = _q_side_specs(t, d, block_q, group)
  specs = {"q": tile, "k": whole_kv, "v": whole_kv, "do": tile, "lse": vec, "delta": vec,
           "pos": vec}
  args = {"q": q, "k": k, "v": v, "do": do, "lse": lse, "delta": delta, "pos": pos}
  if q_seg is not None:
    specs.update(q_seg=vec, kv_seg=kv_seg_spec)
    args.update(q_seg=q_seg, kv_seg=kv_seg)
  names = tuple(args)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, names=names, causal=causal, scale=scale, block_q=block_q,
                        block_k=block_k, kv_len=kv_len, num_kb=t // block_k),
      grid=(t // block_q, b, h),
      in_specs=[specs[n] for n in names],
      out_specs=tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(warps, num_stages),
      interpret=interpret,
      name="head_routing_dq",
  )(*(args[n] for n in names))

  # dK/dV: one key tile per program; each query head of the group gets its own refs (static
  # head offset) so no head axis is sliced dynamically.
  kv_tile = pl.BlockSpec((None, block_k, None, d), lambda j, bi, hk: (bi, j, hk, 0))
  specs = {"k": kv_tile, "v": kv_tile}
  args = {"k": k, "v": v}
  if q_seg is not None:
    specs["kv_seg"] = pl.BlockSpec((None, block_k), lambda j, bi, hk: (bi, j))
    args["kv_seg"] = kv_seg
  for g in range(group):
    head = lambda hk, g=g: hk * group + g  # noqa: E731
    whole_q = pl.BlockSpec((None, t, None, d), lambda j, bi, hk, head=head: (bi, 0, head(hk), 0))
    whole_vec = pl.BlockSpec((None, None, t), lambda j, bi, hk, head=head: (bi, head(hk), 0))
    bound = pl.BlockSpec((None, None, 1), lambda j, bi, hk, head=head: (bi, head(hk), j))
    specs.update({f"q{g}": whole_q, f"do{g}": whole_q, f"lse{g}": whole_vec,
                  f"delta{g}": whole_vec, f"pos{g}": whole_vec,
                  f"lo{g}": bound, f"mid{g}": bound, f"hi{g}": bound})
    args.update({f"q{g}": q, f"do{g}": do, f"lse{g}": lse, f"delta{g}": delta, f"pos{g}": pos,
                 f"lo{g}": bounds[0], f"mid{g}": bounds[1], f"hi{g}": bounds[2]})
    if q_seg is not None:
      specs[f"q_seg{g}"] = whole_vec
      args[f"q_seg{g}"] = q_seg
  names = tuple(args)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, names=names, group=group, causal=causal, scale=scale,
                        block_q=block_q, block_k=block_k),
      grid=(t // block_k, b, h_kv),
      in_specs=[specs[n] for n in names],
      out_specs=[kv_tile, kv_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(warps, num_stages),
      interpret=interpret,
      name="head_routing_dkv",
  )(*(args[n] for n in names))
  return dq, dk, dv
