"""Block-sparse flash attention in Pallas with the Triton lowering (GPU).

Three kernels, each looping only over the blocks its list names, so work is proportional to the
visited blocks:
  forward  grid (nQ, B, H):     o and lse of one query tile, over its key-block list;
  dQ       grid (nQ, B, H):     dq of one query tile, over the same list;
  dK/dV    grid (nK, B, H_kv):  dk, dv (and d kv_bias) of one key tile, over the query-block
                                lists of the transposed pattern, for every query head sharing
                                the key head (GQA without materialized repeats).
Layout [B, T, H, D]; K/V refs span the whole sequence of one head and tiles are sliced by index.
Arguments are normalized by api.py (padded lengths, power-of-two list width).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effattn.kernels.block_sparse.common import LN2, MASK_VALUE, Aux, dot, tile_scores

Q_VECS = ("q_pos", "q_seg", "q_thr", "q_thr_pos")
KV_VECS = ("kv_pos", "kv_seg", "kv_bias")


def _batch(x, b):
  return 0 if x.shape[0] == 1 else b


def _q_head_of(n: int, num_heads: int, group: int):
  """Maps a query head h to the row of a [B', n, N] array (n in {1, H_kv, H})."""
  if n == 1:
    return lambda h: 0
  if n == num_heads:
    return lambda h: h
  return lambda h: h // group


def _kv_head_of(n: int):
  """Maps a key head to the row of a [B', n, N] array (n in {1, H_kv})."""
  return (lambda hk: 0) if n == 1 else (lambda hk: hk)


def _params(num_warps: int, num_stages: int):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _warps(block_q: int, block_k: int, d: int) -> int:
  return 4 if block_q * block_k <= 64 * 64 or d <= 64 else 8


def _present(aux: Aux, names) -> tuple[str, ...]:
  return tuple(n for n in names if getattr(aux, n) is not None)


def _scores_in_kernel(q, k, refs, q_sl, kv_sl, q_start, kv_start, *, block_q, block_k, scale,
                      causal, q_names, kv_names, window=None):
  """Scores of the tile (q rows q_sl, k rows kv_sl) with every present mask vector."""
  qv = {n: refs[n][q_sl] for n in q_names}
  kv = {n: refs[n][kv_sl] for n in kv_names}
  q_pos = qv.pop("q_pos", None)
  kv_pos = kv.pop("kv_pos", None)
  if q_pos is None:
    q_pos = q_start + jnp.arange(block_q, dtype=jnp.int32)
  if kv_pos is None:
    kv_pos = kv_start + jnp.arange(block_k, dtype=jnp.int32)
  return tile_scores(q, k, scale=scale, causal=causal, q_pos=q_pos, kv_pos=kv_pos, window=window,
                     **qv, **kv)


def _listed_tile(r, j, q, i, *, block_q, block_k, **score_kw):
  """Key tile of list slot j of query tile i (the forward and dQ loops): k, v [bk, D] and the
  masked scores of q against k (common.tile_scores')."""
  kv_start = pl.multiple_of(r["idx"][j] * block_k, block_k)
  kv_sl = pl.ds(kv_start, block_k)
  k, v = r["k"][kv_sl, :], r["v"][kv_sl, :]
  q_sl = pl.ds(0, block_q)  # q-side vectors are already blocked to this tile
  s, mask = _scores_in_kernel(q, k, r, q_sl, kv_sl, i * block_q, kv_start, block_q=block_q,
                              block_k=block_k, **score_kw)
  return k, v, s, mask


def _query_tile_inputs(k, v, kv_indices, kv_counts, aux: Aux, q_names, kv_names, *,
                       num_heads: int, block_q: int):
  """BlockSpecs and arrays of what a program of the query-tile grid (nQ, B, H) of the forward
  and dQ kernels reads besides its query rows: the whole k, v of its key head, its list and
  count, and the aux vectors (query-side blocked to its tile, key-side whole)."""
  s_len, h_kv, d = k.shape[1], k.shape[2], k.shape[3]
  group = num_heads // h_kv
  lists_b, lists_h = kv_indices.shape[0] > 1, kv_indices.shape[1] > 1
  specs = {
      "k": pl.BlockSpec((None, s_len, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
      "v": pl.BlockSpec((None, s_len, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
      "idx": pl.BlockSpec((None, None, None, kv_indices.shape[-1]), lambda i, bi, hi: (
          bi if lists_b else 0, hi if lists_h else 0, i, 0)),
      "cnt": pl.BlockSpec((None, None, 1), lambda i, bi, hi: (
          bi if lists_b else 0, hi if lists_h else 0, i)),
  }
  args = {"k": k, "v": v, "idx": kv_indices, "cnt": kv_counts}
  for n in q_names:
    x = getattr(aux, n)
    hmap = _q_head_of(x.shape[1], num_heads, group)
    specs[n] = pl.BlockSpec((None, None, block_q), lambda i, bi, hi, x=x, hmap=hmap: (
        _batch(x, bi), hmap(hi), i))
    args[n] = x
  for n in kv_names:
    x = getattr(aux, n)
    hmap = _kv_head_of(x.shape[1])
    specs[n] = pl.BlockSpec((None, None, s_len), lambda i, bi, hi, x=x, hmap=hmap: (
        _batch(x, bi), hmap(hi // group), 0))
    args[n] = x
  return specs, args


def _fwd_kernel(*refs, names, q_names, kv_names, causal, scale, block_q, block_k, window):
  r = dict(zip(names, refs))
  o_ref, lse_ref = refs[len(names):]
  i = pl.program_id(0)
  q = r["q"][...]

  def body(j, carry):
    acc, m, l = carry
    _, v, s, mask = _listed_tile(r, j, q, i, block_q=block_q, block_k=block_k, scale=scale,
                                 causal=causal, q_names=q_names, kv_names=kv_names, window=window)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v)
    return acc, m_new, l

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(0, r["cnt"][0], body, init)
  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)


def _dq_kernel(*refs, names, q_names, kv_names, causal, scale, block_q, block_k, window):
  r = dict(zip(names, refs))
  (dq_ref,) = refs[len(names):]
  i = pl.program_id(0)
  q, do = r["q"][...], r["do"][...]
  lse2 = r["lse"][...] / LN2
  delta = r["delta"][...]

  def body(j, dq):
    k, v, s, mask = _listed_tile(r, j, q, i, block_q=block_q, block_k=block_k, scale=scale,
                                 causal=causal, q_names=q_names, kv_names=kv_names, window=window)
    p = jnp.exp2(s - lse2[:, None])
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    ds = p * (dot(do, v, trans_b=True) - delta[:, None])
    return dq + dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, r["cnt"][0], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, names, q_names, kv_names, group, causal, scale, block_q, block_k,
                has_bias, window):
  r = dict(zip(names, refs))
  outs = refs[len(names):]
  dk_ref, dv_ref = outs[0], outs[1]
  kb = pl.program_id(0)
  kv_start = kb * block_k
  kv_sl = pl.ds(0, block_k)  # kv-side vectors are already blocked to this tile
  k, v = r["k"][...], r["v"][...]
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  dbias = jnp.zeros((block_k,), jnp.float32)
  for g in range(group):  # the query heads that share this key head
    rg = {n: r[f"{n}{g}"] for n in ("q", "do", "lse", "delta", "qidx", "qcnt") + q_names}
    rg.update({n: r[n] for n in kv_names})

    def body(j, carry, rg=rg):
      dk, dv, dbias = carry
      q_start = pl.multiple_of(rg["qidx"][j] * block_q, block_q)
      q_sl = pl.ds(q_start, block_q)
      q, do = rg["q"][q_sl, :], rg["do"][q_sl, :]
      s, mask = _scores_in_kernel(q, k, rg, q_sl, kv_sl, q_start, kv_start, block_q=block_q,
                                  block_k=block_k, scale=scale, causal=causal,
                                  q_names=q_names, kv_names=kv_names, window=window)
      p = jnp.exp2(s - (rg["lse"][q_sl] / LN2)[:, None])
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
      ds = p * (dot(do, v, trans_b=True) - rg["delta"][q_sl][:, None])
      dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
      if has_bias:
        dbias = dbias + jnp.sum(ds, axis=0)
      return dk, dv, dbias

    dk, dv, dbias = lax.fori_loop(0, rg["qcnt"][0], body, (dk, dv, dbias))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  if has_bias:
    outs[2][...] = dbias


def forward(q, k, v, kv_indices, kv_counts, aux: Aux, *, causal: bool, scale: float,
            block_q: int, block_k: int, interpret: bool = False, num_warps: int | None = None,
            num_stages: int = 2, window: int | None = None):
  """o [B, T, H, D], lse [B, H, T] float32 (natural log). window: common.element_mask's."""
  b, t, h, d = q.shape
  q_names, kv_names = _present(aux, Q_VECS), _present(aux, KV_VECS)
  tile_specs, tile_args = _query_tile_inputs(k, v, kv_indices, kv_counts, aux, q_names, kv_names,
                                             num_heads=h, block_q=block_q)
  specs = {"q": pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
           **tile_specs}
  args = {"q": q, **tile_args}
  names = tuple(args)
  kernel = functools.partial(_fwd_kernel, names=names, q_names=q_names, kv_names=kv_names,
                             causal=causal, scale=scale, block_q=block_q, block_k=block_k,
                             window=window)
  return pl.pallas_call(
      kernel,
      grid=(t // block_q, b, h),
      in_specs=[specs[n] for n in names],
      out_specs=[pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
                 pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      compiler_params=_params(num_warps or _warps(block_q, block_k, d), num_stages),
      interpret=interpret,
      name="block_sparse_fwd",
  )(*(args[n] for n in names))


def backward(q, k, v, lse, do, delta, kv_indices, kv_counts, q_indices, q_counts, aux: Aux, *,
             causal: bool, scale: float, block_q: int, block_k: int, interpret: bool = False,
             num_warps: int | None = None, num_stages: int = 2, window: int | None = None):
  """dq [B, T, H, D], dk / dv [B, S, H_kv, D], dbias [B, H_kv, S] float32 or None.

  delta [B, H, T] = rowsum(o * do) - dlse; q_indices / q_counts are the transposed lists
  [B', H', nK, Q] / [B', H', nK].
  """
  b, t, h, d = q.shape
  s_len, h_kv = k.shape[1], k.shape[2]
  group = h // h_kv
  q_names, kv_names = _present(aux, Q_VECS), _present(aux, KV_VECS)
  warps = num_warps or _warps(block_q, block_k, d)

  # dQ: same tiling and lists as the forward pass.
  tile_specs, tile_args = _query_tile_inputs(k, v, kv_indices, kv_counts, aux, q_names, kv_names,
                                             num_heads=h, block_q=block_q)
  specs = {
      "q": pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
      "do": pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
      "lse": pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i)),
      "delta": pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i)),
      **tile_specs,
  }
  args = {"q": q, "do": do, "lse": lse, "delta": delta, **tile_args}
  names = tuple(args)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, names=names, q_names=q_names, kv_names=kv_names,
                        causal=causal, scale=scale, block_q=block_q, block_k=block_k,
                        window=window),
      grid=(t // block_q, b, h),
      in_specs=[specs[n] for n in names],
      out_specs=pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(warps, num_stages),
      interpret=interpret,
      name="block_sparse_dq",
  )(*(args[n] for n in names))

  # dK/dV: one key tile per program, looping over every query head of its group. Each group
  # member gets its own refs (static head offset) so no head axis is sliced dynamically.
  qlists_b, qlists_h = q_indices.shape[0] > 1, q_indices.shape[1] > 1
  specs = {
      "k": pl.BlockSpec((None, block_k, None, d), lambda j, bi, hk: (bi, j, hk, 0)),
      "v": pl.BlockSpec((None, block_k, None, d), lambda j, bi, hk: (bi, j, hk, 0)),
  }
  args = {"k": k, "v": v}
  for n in kv_names:
    x = getattr(aux, n)
    hmap = _kv_head_of(x.shape[1])
    specs[n] = pl.BlockSpec((None, None, block_k), lambda j, bi, hk, x=x, hmap=hmap: (
        _batch(x, bi), hmap(hk), j))
    args[n] = x
  for g in range(group):
    head = lambda hk, g=g: hk * group + g  # noqa: E731
    specs[f"q{g}"] = pl.BlockSpec((None, t, None, d), lambda j, bi, hk, head=head: (
        bi, 0, head(hk), 0))
    specs[f"do{g}"] = specs[f"q{g}"]
    specs[f"lse{g}"] = pl.BlockSpec((None, None, t), lambda j, bi, hk, head=head: (
        bi, head(hk), 0))
    specs[f"delta{g}"] = specs[f"lse{g}"]
    specs[f"qidx{g}"] = pl.BlockSpec((None, None, None, q_indices.shape[-1]),
                                     lambda j, bi, hk, head=head: (
                                         bi if qlists_b else 0, head(hk) if qlists_h else 0, j, 0))
    specs[f"qcnt{g}"] = pl.BlockSpec((None, None, 1), lambda j, bi, hk, head=head: (
        bi if qlists_b else 0, head(hk) if qlists_h else 0, j))
    args.update({f"q{g}": q, f"do{g}": do, f"lse{g}": lse, f"delta{g}": delta,
                 f"qidx{g}": q_indices, f"qcnt{g}": q_counts})
    for n in q_names:
      x = getattr(aux, n)
      hmap = _q_head_of(x.shape[1], h, group)
      specs[f"{n}{g}"] = pl.BlockSpec((None, None, t), lambda j, bi, hk, x=x, hmap=hmap,
                                      head=head: (_batch(x, bi), hmap(head(hk)), 0))
      args[f"{n}{g}"] = x
  names = tuple(args)
  has_bias = aux.kv_bias is not None
  out_specs = [pl.BlockSpec((None, block_k, None, d), lambda j, bi, hk: (bi, j, hk, 0))] * 2
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  if has_bias:
    out_specs.append(pl.BlockSpec((None, None, block_k), lambda j, bi, hk: (bi, hk, j)))
    out_shape.append(jax.ShapeDtypeStruct((b, h_kv, s_len), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_dkv_kernel, names=names, q_names=q_names, kv_names=kv_names,
                        group=group, causal=causal, scale=scale, block_q=block_q,
                        block_k=block_k, has_bias=has_bias, window=window),
      grid=(s_len // block_k, b, h_kv),
      in_specs=[specs[n] for n in names],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(warps, num_stages),
      interpret=interpret,
      name="block_sparse_dkv",
  )(*(args[n] for n in names))
  dbias = outs[2] if has_bias else None
  return dq, outs[0], outs[1], dbias
