"""Causal softmax attention with persistent keys that every query sees, without a [T, T] mask.

    o = persistent_attention(q, k, v, persistent_k, persistent_v, segment_ids=seg, window=None)

Query i attends to the N_p persistent key/value pairs (Titans' persistent memory) and to the
keys j <= i of its own segment (within the sliding window when one is given), one softmax over
both. The dense form (a [T, N_p + T] mask, `reference`) is the oracle. Paths, chosen by the
softmax family's rule (api.FAMILY) on the shapes of the call, except for windowed calls:

  "cudnn"      the persistent pairs laid in front of each segment as N_p extra tokens (zero
               queries whose outputs are dropped), so a plain causal cuDNN call over
               T + N_p * M tokens (packed layout, M = max_segments - 1 segments) computes
               exactly the persistent + causal softmax. Rows with more segments, or a segment
               id recurring after another, take "xla" through lax.cond. A window would cut the
               persistent tokens off, so a windowed call takes "block_sparse" (logged);
  "block_sparse"  (`banded`) the sequence keys through the block-sparse op (block_sparse/
               api.py) over the band's key-block lists (tiles of 64 tokens, fewer for a short
               T): causal, segments by id and the window are its element conditions, and it
               returns its log-sum-exp; the persistent pairs in XLA (each query over N_p keys);
               the two partial softmaxes merged exactly by log-sum-exp (block_sparse/
               context_parallel.merge). Work O(T * (window + tile)), no [T, T] array, the
               op's own backward kernels. "auto" takes it for a windowed call where a GPU
               kernel of the op takes the shapes (the Triton one: head_dim 64 or 128; on a
               GPU, or under dispatch.interpret_kernels("gpu")), else "xla" (logged, with
               why); impl "pallas" or a block-sparse Pallas path (e.g. "pallas_gpu", with
               interpret=True off the GPU) forces it, with or without a window;
  "xla"        `chunk` queries at a time over [persistent || the keys they can see] (the band
               of window + chunk keys with a window), scores recomputed in the backward pass:
               O(chunk * T) memory, O(T * (chunk + window)) work with a window;
  "reference"  the dense mask, then the reference attention.

`over_cache` is the decode form: queries over the persistent pairs and a KV cache under a dense
mask, never copying the cache: a one-token step as products and sums over the cache as it lies
(read once in its dtype, f32 sums, one softmax with the persistent scores), a chunk of queries
as two softmaxes merged by log-sum-exp.

With T split over mesh.sequence (kernels/context_parallel.py) the sequence keys go through the
softmax ring (block_sparse/context_parallel.py), which returns its log-sum-exp; the persistent
pairs, the same for every query, are attended to on each device's own queries, and the two
partial softmaxes are merged exactly by log-sum-exp. A window has no ring path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effattn.kernels import context_parallel, dispatch
from effattn.kernels.block_sparse import FAMILY as BLOCK_SPARSE
from effattn.kernels.block_sparse import block_sparse_attention, block_size_for, causal_block_mask
from effattn.kernels.block_sparse import context_parallel as ring
from effattn.kernels.block_sparse.common import lists_from_block_mask, pad_lists
from effattn.kernels.paths import log_path_once
from effattn.kernels.softmax import api
from effattn.kernels.softmax.common import attention_mask, sequence_index
from effattn.kernels.softmax.reference import reference_attention

OP = "softmax_persistent"
BAND_TILE = 64  # the block_sparse path's tile (the Triton kernels' default)
# impl words that force the block_sparse path: the block-sparse op's Pallas kernels.
BLOCK_SPARSE_IMPLS = (dispatch.PALLAS,) + tuple(p.name for p in BLOCK_SPARSE.paths
                                                if p.is_pallas)


def _with_persistent(q, k, v, persistent_k, persistent_v):
  """[persistent || k], [persistent || v]: persistent_k / _v [N_p, H_kv, D] broadcast over B."""
  b = q.shape[0]
  per = lambda p: jnp.broadcast_to(p.astype(q.dtype), (b,) + p.shape)  # noqa: E731
  return (jnp.concatenate([per(persistent_k), k.astype(q.dtype)], axis=1),
          jnp.concatenate([per(persistent_v), v.astype(q.dtype)], axis=1))


def reference(q, k, v, persistent_k, persistent_v, *, segment_ids=None, window=None,
              scale=None):
  """The oracle: the dense [B, 1, T, N_p + T] mask and plain softmax attention."""
  b, t = q.shape[:2]
  idx = sequence_index(b, t)
  mask = attention_mask(idx, idx, causal=True, q_segment_ids=segment_ids,
                        k_segment_ids=segment_ids, window=window)
  n_p = persistent_k.shape[0]
  mask = jnp.concatenate([jnp.ones((b, 1, t, n_p), bool), mask], axis=-1)
  k, v = _with_persistent(q, k, v, persistent_k, persistent_v)
  return reference_attention(q, k, v, mask, scale=scale)


def chunked(q, k, v, persistent_k, persistent_v, *, segment_ids=None, window=None, scale=None,
            chunk: int = 512):
  """The xla path: `chunk` queries at a time over [persistent || their keys] (a band of
  chunk + window - 1 keys with a window, all T keys without), each chunk rematerialized in the
  backward pass."""
  b, t, h, d = q.shape
  c = min(chunk, t)
  n = -(-t // c)
  pad = n * c - t
  band = t if window is None else min(t + pad, c + window - 1)
  front = band - c  # keys before the chunk's first query that the band holds
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  q_p = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  seg_q = jnp.pad(seg, ((0, 0), (0, pad)))
  if window is None:
    k_p, v_p, seg_k = k, v, seg
  else:  # keys padded in front so every band is one static slice
    k_p, v_p = (jnp.pad(x, ((0, 0), (front, pad), (0, 0), (0, 0))) for x in (k, v))
    seg_k = jnp.pad(seg, ((0, 0), (front, pad)))
  n_p = persistent_k.shape[0]

  @jax.checkpoint
  def one_chunk(i):
    start = i * c
    rows = jax.lax.dynamic_slice_in_dim(q_p, start, c, axis=1)
    q_idx = sequence_index(b, c, start)
    q_seg = jax.lax.dynamic_slice_in_dim(seg_q, start, c, axis=1)
    if window is None:
      keys, values, k_seg, k_idx = k_p, v_p, seg_k, sequence_index(b, t)
    else:
      keys, values, k_seg = (jax.lax.dynamic_slice_in_dim(x, start, band, axis=1)
                             for x in (k_p, v_p, seg_k))
      k_idx = sequence_index(b, band, start - front)
    mask = attention_mask(q_idx, k_idx, causal=True, q_segment_ids=q_seg, k_segment_ids=k_seg,
                          window=window, k_valid=(k_idx >= 0) & (k_idx < t))
    mask = jnp.concatenate([jnp.ones((b, 1, c, n_p), bool), mask], axis=-1)
    keys, values = _with_persistent(rows, keys, values, persistent_k, persistent_v)
    return jax.nn.dot_product_attention(rows, keys, values, mask=mask, scale=scale,
                                        implementation="xla")

  o = jax.lax.map(one_chunk, jnp.arange(n))  # [n, B, c, H, D]
  return jnp.moveaxis(o, 0, 1).reshape(b, n * c, h, d)[:, :t]


def _over_persistent(q, persistent_k, persistent_v, scale):
  """Each query over the N_p persistent pairs alone: (o [B, T, H, D], lse [B, H, T]) float32."""
  group = q.shape[2] // persistent_k.shape[1]
  pk, pv = (jnp.repeat(p.astype(jnp.float32), group, axis=1) for p in (persistent_k,
                                                                      persistent_v))
  s = jnp.einsum("bthd,nhd->bhtn", q.astype(jnp.float32), pk) * scale
  lse = jax.nn.logsumexp(s, axis=-1)
  return jnp.einsum("bhtn,nhd->bthd", jnp.exp(s - lse[..., None]), pv), lse


def _masked_with_lse(q, k, v, mask, scale):
  """q [B, Tq, H, D] over k, v [B, S, H_kv, D] under mask [B, 1, Tq, S]: (o [B, Tq, H, D],
  lse [B, H, Tq]) float32. Scores accumulate in f32 from the inputs' dtype (a bf16 cache is
  read as it is, not converted); a fully masked row weighs nothing in a merge (lse ~ f32 min)."""
  b, tq, h, d = q.shape
  h_kv = k.shape[2]
  qg = q.reshape(b, tq, h_kv, h // h_kv, d)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(q.dtype),
                 preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)  # [B, 1, 1, Tq, S]
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None]).astype(v.dtype)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v, preferred_element_type=jnp.float32)
  return o.reshape(b, tq, h, v.shape[-1]), lse.reshape(b, h, tq)


def _one_query_over_cache(q, k, v, persistent_k, persistent_v, mask, scale):
  """over_cache for one query per row (a decode step: q [B, 1, H, D], mask [B, 1, 1, S]).

  A query against a cache is a matrix-vector product, so both of its products are written as
  what they are: an elementwise product and a sum over the cache as it is laid out, [B, S,
  H_kv, (G,) D]: q broadcast over S for the scores (sum over D), the weights broadcast over D
  for the output (sum over S). Each fuses into one reduction that reads the cache once, in its
  dtype, with every product and sum in f32. As dots (einsums with batch dims b, h, f32 out) a
  compiler may lay the cache out batch-major for a GEMM or convert it to the f32 output type
  first: a transposed or f32 copy of the cache in a step's temporaries (the CPU's dot emitter
  transposes every dot's cache operand, mha's included; the H200's compiled step of the dots'
  form held ~3x one layer's bf16 K cache of temporaries, 3.2 GiB at 64k, mha's 0.18). The
  persistent scores join the cache's in one softmax (one max, one denominator), so no
  log-sum-exp merge is needed. The group axis G = H / H_kv is left out when it is 1 (a size-1 axis in the product costs the
  CPU's fused reductions an order of magnitude)."""
  b, _, h, d = q.shape
  h_kv = k.shape[2]
  g = h // h_kv
  f32 = jnp.float32
  grouped = g > 1
  per_kv = (lambda x: x[:, :, :, None]) if grouped else (lambda x: x)  # noqa: E731
  qg = (q.reshape(b, h_kv, g, d) if grouped else q[:, 0]).astype(f32)  # [B, H_kv, (G,) D]
  s = jnp.sum(per_kv(k).astype(f32) * qg[:, None], axis=-1) * scale  # [B, S, H_kv, (G)]
  s = jnp.moveaxis(s, 1, -1)  # [B, H_kv, (G,) S]: the softmax's sums run along its minor axis
  visible = mask[:, 0, 0].reshape((mask.shape[0],) + (1,) * (s.ndim - 2) + (s.shape[-1],))
  s = jnp.where(visible, s, jnp.finfo(f32).min)
  top = jnp.max(s, axis=-1)  # [B, H_kv, (G)]
  n_p = persistent_k.shape[0]
  if n_p:
    pk, pv = (jnp.moveaxis(p.astype(f32), 0, 1) for p in (persistent_k, persistent_v))
    if grouped:  # [H_kv, N_p, D] -> [H_kv, 1, N_p, D]
      pk, pv = pk[:, None], pv[:, None]
    s_p = jnp.sum(qg[..., None, :] * pk, axis=-1) * scale  # [B, H_kv, (G,) N_p]
    top = jnp.maximum(top, jnp.max(s_p, axis=-1))
  e = jnp.exp(s - top[..., None])  # masked slots: exp(f32 min - top) = 0
  weights = jnp.moveaxis(e, -1, 1)[..., None]  # [B, S, H_kv, (G,) 1]: the cache's layout
  num = jnp.sum(weights * per_kv(v).astype(f32), axis=1)  # [B, H_kv, (G,) D]
  den = jnp.sum(e, axis=-1)
  if n_p:
    e_p = jnp.exp(s_p - top[..., None])
    num = num + jnp.sum(e_p[..., None] * pv, axis=-2)
    den = den + jnp.sum(e_p, axis=-1)
  return (num / den[..., None]).reshape(b, 1, h, v.shape[-1]).astype(q.dtype)


def over_cache(q, k, v, persistent_k, persistent_v, mask, *, scale=None):
  """The decode form: q [B, Tq, H, D] over the persistent pairs [N_p, H_kv, D] and a cache k, v
  [B, S, H_kv, D] under a dense mask [B, 1, Tq, S] (the persistent pairs always seen). `reference`
  with that mask, without copying the cache into [persistent || k]: one query per row (a decode
  step) as products and sums over the cache as it lies (`_one_query_over_cache`), a chunk of
  queries as two softmaxes (dots) merged by log-sum-exp. Returns o [B, Tq, H, D] in q's dtype."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if q.shape[1] == 1:
    return _one_query_over_cache(q, k, v, persistent_k, persistent_v, mask, scale)
  o, lse = _masked_with_lse(q, k, v, mask, scale)
  o_p, lse_p = _over_persistent(q, persistent_k, persistent_v, scale)
  return ring.merge(o_p, lse_p, o, lse)[0].astype(q.dtype)


def band_lists(t: int, tile: int, window: int | None):
  """The key-block lists [1, 1, nQ, K] / [1, 1, nQ] of causal attention within `window`.

  A band row holds at most ceil((window + tile - 1) / tile) blocks, so K is trimmed to that
  (rounded up to a power of two): each kernel program loads its row's K slots.
  """
  n = -(-t // tile)
  idx, cnt = lists_from_block_mask(causal_block_mask(n, n, tile, tile, window=window)[None, None])
  if window is None:
    return idx, cnt
  return pad_lists(idx[..., :min(n, -(-(window + tile - 1) // tile))], cnt)


def banded(q, k, v, persistent_k, persistent_v, *, segment_ids=None, window=None, scale=None,
           impl: str = "auto", interpret: bool = False, tile: int = BAND_TILE):
  """The block_sparse path (module docstring): the sequence keys through the block-sparse op
  over the band's lists, the persistent pairs in XLA, merged by log-sum-exp.

  impl / interpret: the block-sparse op's. Returns o [B, T, H, D] in q's dtype.
  """
  t, d = q.shape[1], q.shape[3]
  scale = d ** -0.5 if scale is None else scale
  tile = block_size_for(t, tile)
  idx, cnt = band_lists(t, tile, window)
  o, lse = block_sparse_attention(q, k.astype(q.dtype), v.astype(q.dtype), idx, cnt,
                                  block_q=tile, block_k=tile, causal=True,
                                  q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                  window=window, scale=scale, impl=impl, interpret=interpret)
  if persistent_k.shape[0] == 0:
    return o
  o_p, lse_p = _over_persistent(q, persistent_k, persistent_v, scale)
  o, _ = ring.merge(o_p, lse_p, o, lse)  # every query sees itself: lse is finite
  return o.astype(q.dtype)


def _band_kernel(q, window) -> str:
  """"" when a GPU Pallas kernel of the block-sparse op takes a windowed call of q's shapes
  here (a GPU, or dispatch.interpret_kernels("gpu")), else why not."""
  tile = block_size_for(q.shape[1], BAND_TILE)
  shapes = dict(head_dim=q.shape[-1], dtype=np.dtype(q.dtype).name, block_q=tile, block_k=tile,
                window=window)
  reasons = []
  for path in BLOCK_SPARSE.paths:
    if path.is_pallas and path.platform == "gpu":
      why = BLOCK_SPARSE.why_not(path, shapes, chosen=True)  # as "auto" chooses
      if not why:
        return ""
      reasons.append(f"{path.name}: {why}")
  return "; ".join(reasons)


def _context_parallel(q, k, v, persistent_k, persistent_v, *, segment_ids, window, scale,
                      impl, n: int):
  """persistent_attention with T split over mesh.sequence = n (module docstring)."""
  if window is not None:
    raise ValueError(f"{OP} context-parallel (mesh.sequence={n}): {window=} has no ring path; "
                     "set mesh.sequence=1 or window=None")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  step_impl = dispatch.op_impl(impl, "block_sparse")
  log_path_once(OP, "ring", f"mesh.sequence={n}, block_sparse {step_impl} per ring step")
  o, lse = ring.softmax_ring(block_sparse_attention, q, k, v, segment_ids, causal=True,
                             scale=scale, impl=step_impl, return_lse=True)
  if persistent_k.shape[0] == 0:
    return o
  o_p, lse_p = _over_persistent(q, persistent_k, persistent_v, scale)
  o, _ = ring.merge(o_p, lse_p, o, lse)
  return o.astype(q.dtype)


def layout(segment_ids, t: int, n_p: int, max_runs: int):
  """Where tokens and persistent copies go when N_p slots precede each segment run.

  Returns (tok_slot [B, T] slot of each token, src [B, T'] what each slot holds: token index,
  or T + r for copy r of the persistent pairs, seg [B, T'] segment id of each slot, ok [] bool:
  at most max_runs runs per row and no id recurring after another, copy_slot [B, max_runs *
  N_p] the slot of copy r of run m at m * N_p + r), T' = T + N_p * max_runs. Every slot is
  one token's or one copy's. Unused copies sit at the end as one run of their own, so a row
  has at most max_runs + 1 runs.
  """
  b = segment_ids.shape[0]
  seg = segment_ids.astype(jnp.int32)
  starts = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  run = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1
  count = run[:, -1] + 1
  tok_slot = jnp.arange(t, dtype=jnp.int32) + (run + 1) * n_p
  first = jax.vmap(lambda row: jnp.nonzero(row, size=max_runs, fill_value=t)[0])(starts)
  m = jnp.arange(max_runs, dtype=jnp.int32)
  used = m[None, :] < count[:, None]
  base = jnp.where(used, first.astype(jnp.int32), t) + m * n_p  # [B, M]
  copy_slot = (base[:, :, None] + jnp.arange(n_p, dtype=jnp.int32)).reshape(b, -1)
  run_id = jnp.take_along_axis(seg, jnp.minimum(first, t - 1).astype(jnp.int32), axis=1)
  unused_id = seg[:, -1:] + 1  # differs from the last real run: the unused copies stay apart
  copy_seg = jnp.repeat(jnp.where(used, run_id, unused_id), n_p, axis=1)
  copy_src = jnp.broadcast_to(jnp.tile(jnp.arange(n_p, dtype=jnp.int32) + t, max_runs),
                              copy_slot.shape)
  width = t + n_p * max_runs
  rows = jnp.arange(b)[:, None]
  src = jnp.zeros((b, width), jnp.int32).at[rows, tok_slot].set(
      jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), unique_indices=True)
  src = src.at[rows, copy_slot].set(copy_src, unique_indices=True)
  seg_out = jnp.zeros((b, width), jnp.int32).at[rows, tok_slot].set(seg, unique_indices=True)
  seg_out = seg_out.at[rows, copy_slot].set(copy_seg, unique_indices=True)
  ordered = jnp.sort(seg, axis=1)
  distinct = jnp.sum(ordered[:, 1:] != ordered[:, :-1], axis=1) + 1
  ok = jnp.all(count <= max_runs) & jnp.all(count == distinct)
  return tok_slot, src, seg_out, ok, copy_slot


def laid_out(q, k, v, persistent_k, persistent_v, *, segment_ids=None, scale=None,
             max_segments: int = 16, attention_impl: str = "cudnn", lay=None):
  """The cudnn path's arithmetic: persistent pairs as N_p tokens in front of each segment, one
  causal softmax_attention over the result (attention_impl: cudnn on the GPU; xla or reference
  check the layout anywhere). lay: `layout`'s result, if already made. Returns (o, ok); o is
  exact where ok holds."""
  b, t, h, d = q.shape
  n_p = persistent_k.shape[0]
  zeros = jnp.zeros((b, n_p, h, d), q.dtype)
  if segment_ids is None:  # one run per row: the pairs simply go first
    k2, v2 = _with_persistent(q, k, v, persistent_k, persistent_v)
    o = api.softmax_attention(jnp.concatenate([zeros, q], axis=1), k2, v2, causal=True,
                              scale=scale, impl=attention_impl)
    return o[:, n_p:], jnp.ones((), bool)
  tok_slot, _, seg, ok, copy_slot = lay or layout(segment_ids, t, n_p, max_segments - 1)
  rows = jnp.arange(b)[:, None]
  width = seg.shape[1]
  runs = copy_slot.shape[1] // max(n_p, 1)

  # Scatters into distinct slots, not gathers from [x || pairs]: their transposes are gathers,
  # where a gather's would be a scatter-add over the T' slots (atomics on the GPU) and the
  # persistent copies' gradient a scatter-add into N_p rows.
  def place(x, pairs):
    """x [B, T, Hx, D] into the token slots; pairs [N_p, Hx, D] into each run's copy slots
    (None: zeros, the copies' dropped queries)."""
    out = jnp.zeros((b, width) + x.shape[2:], q.dtype).at[rows, tok_slot].set(
        x.astype(q.dtype), unique_indices=True, indices_are_sorted=True)
    if pairs is None or n_p == 0:
      return out
    copies = jnp.broadcast_to(jnp.tile(pairs.astype(q.dtype), (runs, 1, 1)),
                              (b, runs * n_p) + pairs.shape[1:])
    return out.at[rows, copy_slot].set(copies, unique_indices=True)

  o = api.softmax_attention(place(q, None), place(k, persistent_k), place(v, persistent_v),
                            causal=True, segment_ids=seg, scale=scale, impl=attention_impl,
                            max_segments=max_segments)
  return o.at[rows, tok_slot].get(unique_indices=True, indices_are_sorted=True), ok


def persistent_attention(q, k, v, persistent_k, persistent_v, *, segment_ids=None, window=None,
                         scale=None, impl: str = "auto", chunk: int = 512,
                         max_segments: int = 16, interpret: bool = False):
  """Causal softmax attention of q over [persistent || k] (module docstring).

  Args:
    q: [B, T, H, D]; k, v: [B, T, H_kv, D] (H_kv divides H).
    persistent_k, persistent_v: [N_p, H_kv, D], seen by every query.
    segment_ids: [B, T] packed sequences (keys of the query's segment only), or None.
    window: sliding window over the sequence keys (q - k < window); None: all earlier keys.
    impl: "auto" | "cudnn" | "xla" | "reference" (the softmax family's words), or "pallas" |
      a block-sparse Pallas path ("pallas_gpu", ...) for the block_sparse path.
    chunk: queries per step of the xla path. max_segments: runs per row of the cuDNN layout.
    interpret: run the block_sparse path's Pallas kernels in interpret mode (CPU tests).

  Returns:
    o [B, T, H, D] in q's dtype.
  """
  if persistent_k.ndim != 3 or persistent_k.shape != persistent_v.shape or (
      persistent_k.shape[1:] != k.shape[2:]):
    raise ValueError(f"persistent_k {persistent_k.shape} and persistent_v "
                     f"{persistent_v.shape} must both be [N_p, H_kv, D] with k's "
                     f"[H_kv, D] = {k.shape[2:]}")
  if q.shape[1] != k.shape[1] or (segment_ids is not None and segment_ids.shape != q.shape[:2]):
    raise ValueError(f"a self-attention: q {q.shape}, k {k.shape} and segment_ids [B, T] must "
                     "share T")
  n = context_parallel.sequence_size()
  if n > 1:
    return _context_parallel(q, k, v, persistent_k, persistent_v, segment_ids=segment_ids,
                             window=window, scale=scale, impl=impl, n=n)
  kw = dict(segment_ids=segment_ids, window=window, scale=scale)
  if impl in BLOCK_SPARSE_IMPLS:
    log_path_once(OP, "block_sparse", f"forced: block_sparse impl={impl}")
    return banded(q, k, v, persistent_k, persistent_v, impl=impl, interpret=interpret, **kw)
  path, _ = api.FAMILY.choose(impl, dtype=np.dtype(q.dtype), head_dim=q.shape[-1],
                              dense_mask=False, segments=segment_ids is not None, causal=True,
                              window=window)
  if path == "reference":
    return reference(q, k, v, persistent_k, persistent_v, **kw)
  if window is not None and impl in ("auto", "cudnn"):
    # cuDNN's layout cannot take a window (it would hide the persistent tokens); the band
    # through the block-sparse kernels can, where one runs here.
    why = _band_kernel(q, window)
    if impl == "cudnn":
      raise dispatch.PathError(
          f"{OP} impl='cudnn' cannot run: a sliding window would hide the persistent keys from "
          f"cuDNN's layout; impl='auto' would run {'xla' if why else 'block_sparse'}")
    if not why:
      log_path_once(OP, "block_sparse", "a window: the band through the block-sparse kernels, "
                    "the persistent pairs merged by log-sum-exp")
      return banded(q, k, v, persistent_k, persistent_v, interpret=interpret, **kw)
    path = "xla"
    log_path_once(OP, path, f"a window, and no block-sparse GPU kernel takes it here ({why})")
  else:
    log_path_once(OP, path)
  xla_path = lambda q, k, v: chunked(  # noqa: E731
      q, k, v, persistent_k, persistent_v, chunk=chunk, **kw)
  if path == "xla":
    return xla_path(q, k, v)
  lay = None if segment_ids is None else layout(segment_ids, q.shape[1], persistent_k.shape[0],
                                                 max_segments - 1)
  cudnn_path = lambda q, k, v: laid_out(  # noqa: E731
      q, k, v, persistent_k, persistent_v, segment_ids=segment_ids, scale=scale,
      max_segments=max_segments, lay=lay)[0]
  if lay is None:
    return cudnn_path(q, k, v)
  return jax.lax.cond(lay[3], cudnn_path, xla_path, q, k, v)
