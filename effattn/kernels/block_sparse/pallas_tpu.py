"""Block-sparse flash attention in Pallas Mosaic TPU (verified in interpret mode on CPU).

The block lists are scalar-prefetched into SMEM and drive the index maps, so the pipeline DMAs
only the listed key tiles: grid (B, H, nQ, K) where the last axis walks the list slots; slots
past a row's count repeat its last index (no new DMA) and skip compute. Running statistics live
in VMEM scratch across the slot axis. TPU tiles want the sequence on the second-minor axis, so
this path works in [B, H, T, D] (transposed at the boundary) and keeps per-token vectors as
[B', Hx, 1, N].

Backward: dQ on the forward grid; dK/dV per query head on grid (B, H, nK, Q) over the transposed
lists, summed over each GQA group outside the kernel.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effattn.kernels.block_sparse.common import LN2, MASK_VALUE, Aux, dot, tile_scores

Q_VECS = ("q_pos", "q_seg", "q_thr", "q_thr_pos")
KV_VECS = ("kv_pos", "kv_seg", "kv_bias")


def _row(n: int, num_heads: int, group: int):
  """Query head -> row of a [B', n, ...] array with n in {1, H_kv, H}."""
  if n == 1:
    return lambda h: 0
  return (lambda h: h) if n == num_heads else (lambda h: h // group)


def _b(x, b):
  return 0 if x.shape[0] == 1 else b


def _vec4(x):
  return None if x is None else x[:, :, None, :]


def _present(aux: Aux, names):
  return tuple(n for n in names if getattr(aux, n) is not None)


def _tile(r, q, k, q_start, kv_start, *, block_q, block_k, scale, causal, q_names, kv_names,
          window=None):
  vecs = {n: r[n][0] for n in q_names + kv_names}  # [1, N] blocks -> [N]
  q_pos = vecs.pop("q_pos", q_start + jnp.arange(block_q, dtype=jnp.int32))
  kv_pos = vecs.pop("kv_pos", kv_start + jnp.arange(block_k, dtype=jnp.int32))
  return tile_scores(q, k, scale=scale, causal=causal, q_pos=q_pos, kv_pos=kv_pos, window=window,
                     **vecs)


def _list_indexer(indices):
  """Indexes the scalar-prefetched lists (and counts), whose batch/head axes may be 1."""
  lb, lh = indices.shape[0] > 1, indices.shape[1] > 1

  def at(ref, b, h, *rest):
    return ref[(b if lb else 0, h if lh else 0) + rest]

  return at


def _vec_specs(aux: Aux, q_names, kv_names, at, *, num_heads: int, num_kv_heads: int,
               block_q: int, block_k: int, transposed: bool):
  """BlockSpecs and [B', Hx, 1, N] arrays of the present aux vectors on a grid (B, H, tile,
  slot): on the forward one a query tile's vectors are its own and the key vectors the listed
  tile's; on the transposed one of dK/dV (the lists of query tiles per key tile) the reverse."""
  group = num_heads // num_kv_heads

  def own(bi, hi, a, c, idx):
    return a

  def listed(bi, hi, a, c, idx):
    return at(idx, bi, hi, a, c)

  q_tile, kv_tile = (listed, own) if transposed else (own, listed)
  specs, args = {}, {}
  for n in q_names:
    x = _vec4(getattr(aux, n))
    row = _row(x.shape[1], num_heads, group)
    specs[n] = pl.BlockSpec((None, None, 1, block_q), lambda bi, hi, a, c, idx, cnt, x=x, row=row:
                            (_b(x, bi), row(hi), 0, q_tile(bi, hi, a, c, idx)))
    args[n] = x
  for n in kv_names:
    x = _vec4(getattr(aux, n))
    row = _row(x.shape[1], num_kv_heads, 1)
    specs[n] = pl.BlockSpec((None, None, 1, block_k), lambda bi, hi, a, c, idx, cnt, x=x, row=row:
                            (_b(x, bi), row(hi // group), 0, kv_tile(bi, hi, a, c, idx)))
    args[n] = x
  return specs, args


def forward(q, k, v, kv_indices, kv_counts, aux: Aux, *, causal: bool, scale: float,
            block_q: int, block_k: int, interpret: bool = False, window: int | None = None):
  """o [B, T, H, D], lse [B, H, T] float32 (natural log). window: common.element_mask's."""
  b, t, h, d = q.shape
  h_kv = k.shape[2]
  group = h // h_kv
  n_slots = kv_indices.shape[-1]
  at = _list_indexer(kv_indices)
  q_names, kv_names = _present(aux, Q_VECS), _present(aux, KV_VECS)
  qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, T, D]

  def kv_block(bi, hi, i, j, idx, cnt):
    return (bi, hi // group, at(idx, bi, hi, i, j), 0)

  specs = {
      "q": pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i, j, idx, cnt: (bi, hi, i, 0)),
      "k": pl.BlockSpec((None, None, block_k, d), kv_block),
      "v": pl.BlockSpec((None, None, block_k, d), kv_block),
  }
  args = {"q": qt, "k": kt, "v": vt}
  vec_specs, vec_args = _vec_specs(aux, q_names, kv_names, at, num_heads=h, num_kv_heads=h_kv,
                                   block_q=block_q, block_k=block_k, transposed=False)
  specs.update(vec_specs)
  args.update(vec_args)
  names = tuple(args)

  def kernel(idx_ref, cnt_ref, *refs):
    r = dict(zip(names, refs))
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[len(names):]
    bi, hi, i, j = (pl.program_id(a) for a in range(4))

    @pl.when(j == 0)
    def _init():
      m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
      l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
      acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < at(cnt_ref, bi, hi, i))
    def _step():
      kv_start = at(idx_ref, bi, hi, i, j) * block_k
      s, mask = _tile(r, r["q"][...], r["k"][...], i * block_q, kv_start, block_q=block_q,
                      block_k=block_k, scale=scale, causal=causal, q_names=q_names,
                      kv_names=kv_names, window=window)
      m_prev = m_sc[...][:, 0]
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
      alpha = jnp.exp2(m_prev - m_new)
      p = jnp.exp2(s - m_new[:, None])
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      l_sc[...] = (alpha * l_sc[...][:, 0] + jnp.sum(p, axis=1))[:, None]
      m_sc[...] = m_new[:, None]
      v = r["v"][...]
      acc_sc[...] = alpha[:, None] * acc_sc[...] + dot(p.astype(v.dtype), v)

    @pl.when(j == n_slots - 1)
    def _finish():
      l = l_sc[...][:, 0]
      seen = l > 0.0
      l_safe = jnp.where(seen, l, 1.0)
      o_ref[...] = (acc_sc[...] / l_safe[:, None]).astype(o_ref.dtype)
      lse_ref[...] = jnp.where(seen, (m_sc[...][:, 0] + jnp.log2(l_safe)) * LN2, -jnp.inf)[None]

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, h, t // block_q, n_slots),
      in_specs=[specs[n] for n in names],
      out_specs=[
          pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i, j, idx, cnt: (bi, hi, i, 0)),
          pl.BlockSpec((None, None, 1, block_q), lambda bi, hi, i, j, idx, cnt: (bi, hi, 0, i)),
      ],
      scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32),
                      pltpu.VMEM((block_q, 1), jnp.float32),
                      pltpu.VMEM((block_q, d), jnp.float32)],
  )
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, 1, t), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_tpu_fwd",
  )(kv_indices, kv_counts, *(args[n] for n in names))
  return jnp.swapaxes(o, 1, 2), lse[:, :, 0]


def _dq(q, k, v, lse, do, delta, kv_indices, kv_counts, aux, *, causal, scale, block_q, block_k,
        interpret, window):
  b, h, t, d = q.shape
  h_kv = k.shape[1]
  group = h // h_kv
  n_slots = kv_indices.shape[-1]
  at = _list_indexer(kv_indices)
  q_names, kv_names = _present(aux, Q_VECS), _present(aux, KV_VECS)

  def kv_block(bi, hi, i, j, idx, cnt):
    return (bi, hi // group, at(idx, bi, hi, i, j), 0)

  q_block = lambda bi, hi, i, j, idx, cnt: (bi, hi, i, 0)  # noqa: E731
  vec_block = lambda bi, hi, i, j, idx, cnt: (bi, hi, 0, i)  # noqa: E731
  specs = {"q": pl.BlockSpec((None, None, block_q, d), q_block),
           "do": pl.BlockSpec((None, None, block_q, d), q_block),
           "lse": pl.BlockSpec((None, None, 1, block_q), vec_block),
           "delta": pl.BlockSpec((None, None, 1, block_q), vec_block),
           "k": pl.BlockSpec((None, None, block_k, d), kv_block),
           "v": pl.BlockSpec((None, None, block_k, d), kv_block)}
  args = {"q": q, "do": do, "lse": lse[:, :, None], "delta": delta[:, :, None], "k": k, "v": v}
  vec_specs, vec_args = _vec_specs(aux, q_names, kv_names, at, num_heads=h, num_kv_heads=h_kv,
                                   block_q=block_q, block_k=block_k, transposed=False)
  specs.update(vec_specs)
  args.update(vec_args)
  names = tuple(args)

  def kernel(idx_ref, cnt_ref, *refs):
    r = dict(zip(names, refs))
    dq_ref, dq_sc = refs[len(names):]
    bi, hi, i, j = (pl.program_id(a) for a in range(4))

    @pl.when(j == 0)
    def _init():
      dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(j < at(cnt_ref, bi, hi, i))
    def _step():
      kv_start = at(idx_ref, bi, hi, i, j) * block_k
      k_tile = r["k"][...]
      s, mask = _tile(r, r["q"][...], k_tile, i * block_q, kv_start, block_q=block_q,
                      block_k=block_k, scale=scale, causal=causal, q_names=q_names,
                      kv_names=kv_names, window=window)
      p = jnp.exp2(s - (r["lse"][0] / LN2)[:, None])
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      ds = p * (dot(r["do"][...], r["v"][...], trans_b=True) - r["delta"][0][:, None])
      dq_sc[...] += dot(ds.astype(k_tile.dtype), k_tile)

    @pl.when(j == n_slots - 1)
    def _finish():
      dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)

  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, t // block_q, n_slots),
          in_specs=[specs[n] for n in names],
          out_specs=pl.BlockSpec((None, None, block_q, d), q_block),
          scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_tpu_dq",
  )(kv_indices, kv_counts, *(args[n] for n in names))


def _dkv(q, k, v, lse, do, delta, q_indices, q_counts, aux, *, causal, scale, block_q, block_k,
         interpret, window):
  """Per query head: dk, dv [B, H, S, D] float32 and dbias [B, H, 1, S] float32 (or None)."""
  b, h, t, d = q.shape
  s_len, h_kv = k.shape[2], k.shape[1]
  group = h // h_kv
  n_slots = q_indices.shape[-1]
  at = _list_indexer(q_indices)
  q_names, kv_names = _present(aux, Q_VECS), _present(aux, KV_VECS)

  def q_block(bi, hi, j, s, idx, cnt):
    return (bi, hi, at(idx, bi, hi, j, s), 0)

  def q_vec_block(bi, hi, j, s, idx, cnt):
    return (bi, hi, 0, at(idx, bi, hi, j, s))

  kv_block = lambda bi, hi, j, s, idx, cnt: (bi, hi // group, j, 0)  # noqa: E731
  specs = {"q": pl.BlockSpec((None, None, block_q, d), q_block),
           "do": pl.BlockSpec((None, None, block_q, d), q_block),
           "lse": pl.BlockSpec((None, None, 1, block_q), q_vec_block),
           "delta": pl.BlockSpec((None, None, 1, block_q), q_vec_block),
           "k": pl.BlockSpec((None, None, block_k, d), kv_block),
           "v": pl.BlockSpec((None, None, block_k, d), kv_block)}
  args = {"q": q, "do": do, "lse": lse[:, :, None], "delta": delta[:, :, None], "k": k, "v": v}
  vec_specs, vec_args = _vec_specs(aux, q_names, kv_names, at, num_heads=h, num_kv_heads=h_kv,
                                   block_q=block_q, block_k=block_k, transposed=True)
  specs.update(vec_specs)
  args.update(vec_args)
  names = tuple(args)
  has_bias = aux.kv_bias is not None

  def kernel(idx_ref, cnt_ref, *refs):
    r = dict(zip(names, refs))
    outs = refs[len(names):]
    dk_ref, dv_ref = outs[0], outs[1]
    dbias_ref = outs[2] if has_bias else None
    dk_sc, dv_sc, db_sc = outs[-3:]
    bi, hi, j, sl = (pl.program_id(a) for a in range(4))

    @pl.when(sl == 0)
    def _init():
      dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
      dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)
      db_sc[...] = jnp.zeros(db_sc.shape, jnp.float32)

    @pl.when(sl < at(cnt_ref, bi, hi, j))
    def _step():
      q_start = at(idx_ref, bi, hi, j, sl) * block_q
      q_tile, do = r["q"][...], r["do"][...]
      s, mask = _tile(r, q_tile, r["k"][...], q_start, j * block_k, block_q=block_q,
                      block_k=block_k, scale=scale, causal=causal, q_names=q_names,
                      kv_names=kv_names, window=window)
      p = jnp.exp2(s - (r["lse"][0] / LN2)[:, None])
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      dv_sc[...] += dot(p.astype(do.dtype), do, trans_a=True)
      ds = p * (dot(do, r["v"][...], trans_b=True) - r["delta"][0][:, None])
      dk_sc[...] += dot(ds.astype(q_tile.dtype), q_tile, trans_a=True)
      db_sc[...] += jnp.sum(ds, axis=0)[None]

    @pl.when(sl == n_slots - 1)
    def _finish():
      dk_ref[...] = dk_sc[...] * scale
      dv_ref[...] = dv_sc[...]
      if has_bias:
        dbias_ref[...] = db_sc[...]

  kv_out = lambda bi, hi, j, s, idx, cnt: (bi, hi, j, 0)  # noqa: E731
  out_specs = [pl.BlockSpec((None, None, block_k, d), kv_out)] * 2
  out_shape = [jax.ShapeDtypeStruct((b, h, s_len, d), jnp.float32)] * 2
  if has_bias:
    out_specs.append(pl.BlockSpec((None, None, 1, block_k),
                                  lambda bi, hi, j, s, idx, cnt: (bi, hi, 0, j)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, 1, s_len), jnp.float32))
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, s_len // block_k, n_slots),
          in_specs=[specs[n] for n in names], out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32),
                          pltpu.VMEM((block_k, d), jnp.float32),
                          pltpu.VMEM((1, block_k), jnp.float32)]),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_tpu_dkv",
  )(q_indices, q_counts, *(args[n] for n in names))
  return outs[0], outs[1], outs[2] if has_bias else None


def backward(q, k, v, lse, do, delta, kv_indices, kv_counts, q_indices, q_counts, aux: Aux, *,
             causal: bool, scale: float, block_q: int, block_k: int, interpret: bool = False,
             window: int | None = None):
  """Same contract as pallas_gpu.backward."""
  b, t, h, d = q.shape
  s_len, h_kv = k.shape[1], k.shape[2]
  group = h // h_kv
  qt, kt, vt, dot_ = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, do))
  kw = dict(causal=causal, scale=scale, block_q=block_q, block_k=block_k, interpret=interpret,
            window=window)
  dq = _dq(qt, kt, vt, lse, dot_, delta, kv_indices, kv_counts, aux, **kw)
  dk, dv, dbias = _dkv(qt, kt, vt, lse, dot_, delta, q_indices, q_counts, aux, **kw)
  # Sum the per-query-head key gradients over each GQA group.
  dk = dk.reshape(b, h_kv, group, s_len, d).sum(2)
  dv = dv.reshape(b, h_kv, group, s_len, d).sum(2)
  if dbias is not None:
    dbias = dbias.reshape(b, h_kv, group, s_len).sum(2)
  return (jnp.swapaxes(dq, 1, 2), jnp.swapaxes(dk, 1, 2).astype(k.dtype),
          jnp.swapaxes(dv, 1, 2).astype(v.dtype), dbias)
