"""Trainable dynamic mask attention (DMA; Shi et al. 2025, SmallDoges/flash-dmattn, Doge).

Per key/value head, a content-aware, query-agnostic key importance from the values:

    delta_t = softplus(v_t_flat W_dt)        W_dt: [H_kv * D] -> [H_kv]
    bias_t  = A_h * delta_t                  A_h learned per key head, initialized at 0

The paper writes exp(A * softplus(.)); the official code keeps it in log space as above, which
we follow. Each query keeps the top-w causally visible keys by bias (w = keep_window; all of them
while t < w; ties go to the earlier position) and attends with

    y_t = softmax(q_t k^T / sqrt(D) + bias) v   over the kept keys.

Gradients reach A and W_dt through the bias (the top-w selection is not differentiated).
Queries and keys are RMS-normalized per head (learned scale) before RoPE, as in Doge.

Selection "per_query" (default, the paper-era code) ranks keys among those visible to each query;
"global" (current flash-dmattn) ranks once over all keys and applies causality afterwards, so
early queries keep fewer keys. The kept set is passed to the block-sparse kernel as a per-query
threshold on (bias, -position), and only tiles holding a kept key are listed, so compute skips
every dropped tile. The selection itself is exact in O(T log T) (`select_impl="ranked"`,
kernels/block_sparse/top_w.py: one sort of the keys, range order statistics per query);
`select_top_w` below is its dense O(T^2) oracle, also used while decoding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from effattn import logical_axes
from effattn.attention import base
from effattn.attention.registry import register
from effattn.kernels.block_sparse import (block_size_for, block_sparse_attention, sorted_chunks,
                                          top_w)
from effattn.kernels.block_sparse.common import element_mask
from effattn.kernels.softmax import reference_attention
from effattn.ranges import POSITIVE_INT, Range

_NEG_INF = -jnp.inf
# key_layout "auto" sorts the keys from T = SORTED_FROM x keep_window on: the kept keys are then
# at most a quarter of a prefix, and the layout's sort and second key copy pay for themselves.
SORTED_FROM = 4


def select_top_w(bias, *, keep_window: int, selection: str, q_index, kv_index, q_seg=None,
                 kv_seg=None, causal: bool = True, block_q: int | None = None,
                 block_k: int | None = None):
  """Per-query threshold of the top-w keys by (bias, -position), and the tiles holding any.

  bias: [B, H_kv, S] float32; q_index [B, T] / kv_index [B, S] token indices (causality);
  q_seg / kv_seg: [B, T] / [B, S] or None.
  Returns thr [B, H_kv, T], thr_pos [B, H_kv, T] (keep key j iff (bias_j, -j) >= (thr, -thr_pos))
  and, when block sizes are given, the bool tile mask [B, H_kv, nQ, nK] of tiles with a kept key.
  """
  b, h_kv, s_len = bias.shape
  t = q_index.shape[1]
  bias = jax.lax.stop_gradient(bias.astype(jnp.float32))
  bias = jnp.where(bias == 0, 0.0, bias)  # -0.0 ties with 0.0, as in the kernels' comparison
  w = min(keep_window, s_len)

  def visible(qi, qs):
    """[B, 1, tq, S] visibility of keys for a chunk of queries."""
    m = element_mask(causal=causal, q_pos=qi[:, None], kv_pos=kv_index[:, None],
                     q_seg=None if qs is None else qs[:, None],
                     kv_seg=None if kv_seg is None else kv_seg[:, None])
    real = (qi >= 0)[:, None, :, None]  # padded query rows see nothing (keep no tile)
    return real if m is None else m & real

  chunk = block_q or min(t, 64)
  n_q = -(-t // chunk)
  pad = n_q * chunk - t
  if selection == "global":
    vals, idx = jax.lax.top_k(bias, w)  # one ranking over all keys
    thr = jnp.broadcast_to(vals[..., -1:], (b, h_kv, n_q * chunk))
    pos = jnp.take_along_axis(jnp.broadcast_to(kv_index[:, None, :], idx.shape[:2] + (s_len,)),
                              idx[..., -1:], axis=-1)
    thr_pos = jnp.broadcast_to(pos.astype(jnp.int32), (b, h_kv, n_q * chunk))
  elif selection == "per_query":
    thr, thr_pos = None, None
  else:
    raise ValueError(f"model.attention.dynamic_mask.selection={selection!r} must be "
                     "'per_query' or 'global'")
  q_index_p = jnp.pad(q_index, ((0, 0), (0, pad)), constant_values=-1)  # padded: sees nothing
  q_seg_p = None if q_seg is None else jnp.pad(q_seg, ((0, 0), (0, pad)))

  def one_chunk(i):
    qi = jax.lax.dynamic_slice_in_dim(q_index_p, i * chunk, chunk, axis=1)
    qs = None if q_seg_p is None else jax.lax.dynamic_slice_in_dim(q_seg_p, i * chunk, chunk, 1)
    vis = visible(qi, qs)  # [B, 1, tq, S]
    if selection == "per_query":
      scores = jnp.where(vis, bias[:, :, None, :], _NEG_INF)  # [B, H_kv, tq, S]
      vals, idx = jax.lax.top_k(scores, w)
      c_thr, c_pos = vals[..., -1], jnp.take_along_axis(
          jnp.broadcast_to(kv_index[:, None, None, :], idx.shape[:-1] + (s_len,)),
          idx[..., -1:], axis=-1)[..., 0]
    else:
      c_thr = jax.lax.dynamic_slice_in_dim(thr, i * chunk, chunk, axis=2)
      c_pos = jax.lax.dynamic_slice_in_dim(thr_pos, i * chunk, chunk, axis=2)
    if block_k is None:
      return c_thr, c_pos.astype(jnp.int32), None
    kb = bias[:, :, None, :]
    kept = vis & ((kb > c_thr[..., None]) | (
        (kb == c_thr[..., None]) & (kv_index[:, None, None, :] <= c_pos[..., None])))
    n_k = -(-s_len // block_k)
    kept = jnp.pad(kept, ((0, 0), (0, 0), (0, 0), (0, n_k * block_k - s_len)))
    tiles = jnp.any(kept.reshape(b, h_kv, chunk, n_k, block_k), axis=(2, 4))
    return c_thr, c_pos.astype(jnp.int32), tiles

  c_thr, c_pos, tiles = jax.lax.map(one_chunk, jnp.arange(n_q))
  thr = jnp.moveaxis(c_thr, 0, 2).reshape(b, h_kv, -1)[:, :, :t]
  thr_pos = jnp.moveaxis(c_pos, 0, 2).reshape(b, h_kv, -1)[:, :, :t]
  if tiles is not None:
    tiles = jnp.moveaxis(tiles, 0, 2)  # [B, H_kv, nQ, nK]
  return thr, thr_pos, tiles


class _RMSScale(nnx.Module):
  """RMS normalization over the head dim with a learned scale [D] (Doge's q/k norm)."""

  def __init__(self, dim: int, eps: float = 1e-6):
    self.scale = logical_axes.param(jnp.ones((dim,), jnp.float32), ("norm",))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (xf * self.scale[...]).astype(x.dtype)


@register("dynamic_mask")
class DynamicMaskAttention(base.Attention):
  """DMA; see the module docstring."""

  DEFAULTS = {
      "keep_window": 2048,  # w: keys kept per query
      "selection": "per_query",  # per_query | global
      "qk_norm": True,  # RMS-normalize q and k per head (Doge)
      "block": 64,  # kernel tile size (tokens)
      # ranked: exact top-w by one sort of the keys and range order statistics, O(T log T)
      # (kernels/block_sparse/top_w.py); dense: a top-k over every visible key of every query,
      # O(T^2) (select_top_w, the oracle). Equal results.
      "select_impl": "ranked",
      # token: keys in token order (the kept keys spread over almost every tile of the prefix);
      # sorted: each chunk of sort_chunk keys before a query tile sorted by score, so its kept
      # keys are a prefix of the chunk (kernels/block_sparse/sorted_chunks.py). Same attention.
      # auto: sorted where T >= 4 keep_window (H200: 1.25x the token layout's step at T = 8 w,
      # 1.5x at 16 w, 0.94x at 2 w; docs/benchmarks.md).
      "key_layout": "auto",
      "sort_chunk": 1024,
  }
  OPS = ("block_sparse",)
  SUPPORTS = ("num_kv_heads", "head_dim")  # keep_window, not a sliding window, bounds the keys
  CHOICES = {"selection": ("per_query", "global"), "select_impl": ("ranked", "dense"),
             "key_layout": ("auto", "token", "sorted")}
  RANGES = {"keep_window": POSITIVE_INT, "block": Range(8, integer=True),  # block: power of 2
            "sort_chunk": Range(8, integer=True)}
  TINY = {"keep_window": 8, "block": 16}  # fewer keys kept than T = 32, two tiles

  @classmethod
  def check(cls, opts, sizes):
    base.check_power_of_two("model.attention.dynamic_mask.block", opts.block, 8)

  def __init__(self, cfg: Any, *, d_model: int, num_heads: int, rngs: nnx.Rngs, **kwargs):
    super().__init__(cfg, d_model=d_model, num_heads=num_heads, rngs=rngs, **kwargs)
    o = self.opts
    d, h, h_kv = self.head_dim, num_heads, self.num_kv_heads
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.qkvo_projections(
        d_model, h, h_kv, d, rngs=rngs, dtype=self.dtype)
    self.dt_proj = base.dense(h_kv * d, h_kv, rngs=rngs, dtype=jnp.float32)
    self.A = nnx.Param(jnp.zeros((h_kv,), jnp.float32))
    if o.qk_norm:
      self.q_norm = _RMSScale(d)
      self.k_norm = _RMSScale(d)

  def project(self, x, positions):
    """-> q [B, T, H, D], k, v [B, T, H_kv, D], bias [B, H_kv, T] float32."""
    q = base.split_heads(self.q_proj(x), self.num_heads)
    k = base.split_heads(self.k_proj(x), self.num_kv_heads)
    v_flat = self.v_proj(x)
    v = base.split_heads(v_flat, self.num_kv_heads)
    if self.opts.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.rope_theta is not None:
      q = base.apply_rope(q, positions, self.rope_theta)
      k = base.apply_rope(k, positions, self.rope_theta)
    delta = jax.nn.softplus(self.dt_proj(v_flat.astype(jnp.float32)))  # [B, T, H_kv]
    bias = (self.A[...] * delta).transpose(0, 2, 1)
    return q, k, v, bias

  def select(self, bias, segment_ids, causal: bool, block: int, ranks=None):
    """Thresholds, threshold positions and kept tiles of the top-w selection (select_top_w's
    outputs), and 1.0 where the ranked form fell back to the dense one (a segment id that
    recurs after another id; packing never makes one) else 0.0. ranks: top_w.key_ranks(bias)
    where the caller has them."""
    o = self.opts
    b, _, t = bias.shape
    idx = base.sequence_index(b, t)
    dense = lambda bias: select_top_w(  # noqa: E731
        bias, keep_window=o.keep_window, selection=o.selection, q_index=idx, kv_index=idx,
        q_seg=segment_ids, kv_seg=segment_ids, causal=causal, block_q=block, block_k=block)
    if o.select_impl == "dense":
      return (*dense(bias), jnp.zeros((), jnp.float32))
    ranked = lambda bias: top_w.select_top_w_ranked(  # noqa: E731
        bias, keep_window=o.keep_window, selection=o.selection, segment_ids=segment_ids,
        causal=causal, block_q=block, block_k=block, ranks=ranks)
    if segment_ids is None:
      return (*ranked(bias), jnp.zeros((), jnp.float32))
    ok = top_w.contiguous_runs(segment_ids)
    return (*jax.lax.cond(ok, ranked, dense, bias), 1.0 - ok.astype(jnp.float32))

  def key_layout(self, t: int) -> str:
    """The key layout of a T-token call ("auto" resolved; the sorted one is causal only)."""
    layout = self.opts.key_layout
    if layout == "auto":
      layout = "sorted" if t >= SORTED_FROM * self.opts.keep_window else "token"
    return layout

  def __call__(self, x, *, positions, segment_ids=None, causal=True, train=False):
    b, t, _ = x.shape
    q, k, v, bias = self.project(x, positions)
    bs = block_size_for(t, self.opts.block)
    sort = causal and self.key_layout(t) == "sorted"
    # One ranking of the keys serves the ranked selection and the sorted layout.
    ranks = top_w.key_ranks(bias) if sort or self.opts.select_impl == "ranked" else None
    thr, thr_pos, tiles, fallback = self.select(bias, segment_ids, causal, bs, ranks)
    if sort:
      lay = sorted_chunks.sorted_chunk_layout(
          k, v, bias, ranks[0], thr, thr_pos, tiles, num_heads=self.num_heads, block=bs,
          sort_chunk=self.opts.sort_chunk, segment_ids=segment_ids,
          ranges_exact=True if segment_ids is None else top_w.contiguous_runs(segment_ids))
    else:
      lay = sorted_chunks.token_layout(k, v, bias, tiles, num_heads=self.num_heads,
                                       segment_ids=segment_ids)
    o, _ = block_sparse_attention(
        q, lay.k, lay.v, lay.kv_indices, lay.kv_counts, block_q=bs, block_k=bs, causal=causal,
        kv_positions=lay.kv_positions, q_segment_ids=segment_ids,
        kv_segment_ids=lay.kv_segment_ids, kv_bias=lay.kv_bias, q_threshold=thr,
        q_threshold_pos=thr_pos, impl=self.op_impl("block_sparse"))
    # dma_kept_tile_frac: tiles the kernel visits over all (query, key) tile pairs.
    return self.o_proj(base.merge_heads(o)), {"dma_kept_tile_frac": lay.visited,
                                              "dma_select_fallback": fallback}

  def init_cache(self, batch, max_len, dtype=None):
    dtype = dtype or self.dtype
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "bias": jnp.zeros((batch, self.num_kv_heads, max_len), jnp.float32),
            "index": jnp.zeros((), jnp.int32)}

  def decode(self, x, *, positions, cache):
    """New tokens x [B, T, d_model] after the cached ones; dense over the cache, same mask."""
    b, t, _ = x.shape
    q, k, v, bias = self.project(x, positions)
    start = cache["index"]
    new = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype),
                                             (0, start, 0, 0)),
           "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype),
                                             (0, start, 0, 0)),
           "bias": jax.lax.dynamic_update_slice(cache["bias"], bias, (0, 0, start)),
           "index": start + t}
    max_len = new["k"].shape[1]
    q_idx, k_idx = base.sequence_index(b, t, start), base.sequence_index(b, max_len)
    valid = k_idx < start + t
    # Unfilled slots get segment 0, the new queries segment 1: they are never visible or ranked.
    seg_k = valid.astype(jnp.int32)
    thr, thr_pos, _ = select_top_w(
        new["bias"], keep_window=self.opts.keep_window, selection=self.opts.selection,
        q_index=q_idx, kv_index=k_idx, q_seg=jnp.ones((b, t), jnp.int32), kv_seg=seg_k)
    group = self.num_heads // self.num_kv_heads
    kb = new["bias"][:, :, None, :]
    keep = (kb > thr[..., None]) | ((kb == thr[..., None]) & (k_idx[:, None, None, :]
                                                               <= thr_pos[..., None]))
    mask = base.attention_mask(q_idx, k_idx, causal=True, k_valid=valid) & keep
    o = reference_attention(q, new["k"].astype(q.dtype), new["v"].astype(q.dtype),
                            jnp.repeat(mask, group, axis=1),
                            bias=jnp.repeat(new["bias"], group, axis=1)[:, :, None, :])
    return self.o_proj(base.merge_heads(o)), new
