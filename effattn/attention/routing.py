"""Routing Transformer attention (Roy et al., TACL 2021): online k-means routes tokens to clusters.

Heads are split into local heads (causal sliding window) and routing heads. A routing head uses
one shared projection for queries and keys (Q = K), layer-normalized without scale or bias, and
C centroids mu [H_route, C, D] that are non-gradient state (`AttentionState`), refreshed by an
exponential moving average of assigned vectors while training:

    ema_count <- decay * ema_count + (1 - decay) * count
    ema_sum   <- decay * ema_sum   + (1 - decay) * sum of assigned vectors
    mu         = ema_sum / Laplace-smoothed ema_count        (the official code's form)

A token's nearest centroid is the one with the largest dot product. Attention runs within each
cluster, causally by position. Two memberships:

  "nearest"  (default) each token joins its nearest centroid. Routing depends on the token alone,
             so the layer is causal and decoding equals the forward pass. Tokens are sorted by
             (cluster, position) and the block-sparse kernel visits only tile pairs whose
             cluster ranges overlap: work ~ sum over clusters of size^2.
  "balanced" the official code's fixed-size clusters: each centroid takes its top-w tokens by
             similarity (w = cluster_size, default T // C), so work is exactly C * w^2. Tokens
             chosen by several clusters average their outputs (sum / (count + 1e-2), as the
             code does); tokens chosen by none get 0 from routing heads. Membership then depends
             on the whole sequence (future tokens can evict past ones), which is not causal;
             decoding uses nearest-centroid routing. Use it for the paper's bounded cost.

aux: `loss_commitment` = commitment * mean ||u - stopgrad(mu_nearest)||^2 (already weighted);
`softmax_fallback_frac` where the local heads run cuDNN's packed path (rows past its segments).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from effattn.attention import base
from effattn.attention.registry import register
from effattn.kernels.block_sparse import (block_size_for, block_sparse_attention,
                                          lists_from_block_mask)
from effattn.kernels.permute import inverse_permutation, permute
from effattn.kernels.softmax import reference_attention, softmax_attention
from effattn.ranges import (NON_NEGATIVE, POSITIVE_INT, UNIT_OPEN_TOP, ConfigError, Range)

# Cluster ids are folded into segment ids as cluster * _SEG_STRIDE + segment.
_SEG_STRIDE = 1 << 20


def unit_layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm over the last axis without scale or bias (vectors of norm ~ sqrt(D))."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def ema_centroids(ema_sum: jax.Array, ema_count: jax.Array, eps: float = 1e-5) -> jax.Array:
  """mu = ema_sum / Laplace-smoothed ema_count. ema_sum [H, C, D], ema_count [H, C]."""
  n = jnp.sum(ema_count, axis=-1, keepdims=True)
  smoothed = (ema_count + eps) / (n + ema_count.shape[-1] * eps) * n
  return ema_sum / smoothed[..., None]


def ema_update(ema_sum, ema_count, u, assign, weight, decay: float):
  """One online k-means step. u [B, T, H, D], assign [B, T, H] int, weight [B, T] (0 = skip)."""
  onehot = jax.nn.one_hot(assign, ema_count.shape[-1], dtype=jnp.float32)
  onehot = onehot * weight[:, :, None, None]
  count = jnp.einsum("bthc->hc", onehot)
  total = jnp.einsum("bthc,bthd->hcd", onehot, u.astype(jnp.float32))
  return (decay * ema_sum + (1 - decay) * total, decay * ema_count + (1 - decay) * count)


def cluster_block_mask(sorted_clusters: jax.Array, block: int, causal: bool) -> jax.Array:
  """Tile pairs to visit when tokens are sorted by cluster: [B, H, T] -> [B, H, nT, nT] bool.

  A query tile visits a key tile when their cluster ranges overlap (and, causally, the key tile
  is not after it: within a cluster, sorted order is position order).
  """
  b, h, t = sorted_clusters.shape
  n = -(-t // block)
  padded = jnp.pad(sorted_clusters, ((0, 0), (0, 0), (0, n * block - t)), mode="edge")
  lo = padded.reshape(b, h, n, block).min(-1)
  hi = padded.reshape(b, h, n, block).max(-1)
  blocks = (lo[..., :, None] <= hi[..., None, :]) & (lo[..., None, :] <= hi[..., :, None])
  if causal:
    blocks &= jnp.tril(jnp.ones((n, n), bool))
  return blocks


@register("routing")
class RoutingAttention(base.Attention):
  """Local heads + k-means routing heads; see the module docstring."""

  DEFAULTS = {
      "num_clusters": 4,  # C
      "routing_heads": None,  # None: half of the heads (at least 1); the rest are local heads
      "local_window": 256,  # causal sliding window of the local heads
      "membership": "nearest",  # nearest | balanced
      "cluster_size": None,  # w of balanced membership; None: T // C
      "decay": 0.999,  # EMA lambda
      "commitment": 1e-4,  # beta of the commitment loss
      "block": 64,  # kernel tile size (tokens)
  }
  OPS = ("softmax", "block_sparse")  # local heads, routing heads
  # Q = K per routing head, so no key/value head sharing; local heads have their own window.
  SUPPORTS = ("head_dim",)
  CHOICES = {"membership": ("nearest", "balanced")}
  RANGES = {"num_clusters": POSITIVE_INT, "routing_heads": Range(1, integer=True, none_ok=True),
            "local_window": POSITIVE_INT, "cluster_size": Range(1, integer=True, none_ok=True),
            "decay": UNIT_OPEN_TOP, "commitment": NON_NEGATIVE,
            "block": Range(8, integer=True)}  # block: a power of two
  TINY = {"local_window": 4, "block": 16}  # a window shorter than T = 32, two tiles

  @classmethod
  def check(cls, opts, sizes):
    if opts.routing_heads is not None and opts.routing_heads > sizes.num_heads:
      raise ConfigError(f"model.attention.routing.routing_heads={opts.routing_heads} must be in "
                        f"1..{sizes.num_heads} (model.num_heads)")
    base.check_power_of_two("model.attention.routing.block", opts.block, 8)

  def __init__(self, cfg: Any, *, d_model: int, num_heads: int, rngs: nnx.Rngs, **kwargs):
    super().__init__(cfg, d_model=d_model, num_heads=num_heads, rngs=rngs, **kwargs)
    o = self.opts
    self.num_routing = int(o.routing_heads if o.routing_heads is not None
                           else max(1, num_heads // 2))
    self.num_local = num_heads - self.num_routing
    d, hl, hr = self.head_dim, self.num_local, self.num_routing
    cols = dict(rngs=rngs, dtype=self.dtype, head_dim=d)
    if hl:
      self.q_proj = base.dense(d_model, hl * d, axes=base.COLUMNS, **cols)
      self.k_proj = base.dense(d_model, hl * d, axes=base.KV_COLUMNS, **cols)
    self.qk_proj = base.dense(d_model, hr * d, axes=base.COLUMNS, **cols)
    self.v_proj = base.dense(d_model, num_heads * d, axes=base.KV_COLUMNS, **cols)
    self.o_proj = base.dense(num_heads * d, d_model, axes=base.ROWS, **cols)
    # Centroids start as random points of the layer-norm sphere (norm sqrt(D)).
    init = jax.random.normal(rngs.params(), (hr, o.num_clusters, d), jnp.float32)
    init = init / jnp.linalg.norm(init, axis=-1, keepdims=True) * d ** 0.5
    self.ema_sum = base.AttentionState(init)
    self.ema_count = base.AttentionState(jnp.ones((hr, o.num_clusters), jnp.float32))

  # -- projections ---------------------------------------------------------------------------

  def centroids(self) -> jax.Array:
    """mu [H_route, C, D]."""
    return ema_centroids(self.ema_sum[...], self.ema_count[...])

  def project(self, x, positions):
    """-> local q, k [B, T, H_local, D] (RoPE), u [B, T, H_route, D] (normalized, pre-RoPE),
    ur (u with RoPE, the routing heads' queries and keys), v [B, T, H, D]."""
    rope = (lambda t: base.apply_rope(t, positions, self.rope_theta)) if self.rope_theta else (
        lambda t: t)
    v = base.split_heads(self.v_proj(x), self.num_heads)
    u = unit_layer_norm(base.split_heads(self.qk_proj(x), self.num_routing))
    ur = rope(u.astype(v.dtype))
    ql = kl = None
    if self.num_local:
      ql = rope(base.split_heads(self.q_proj(x), self.num_local))
      kl = rope(base.split_heads(self.k_proj(x), self.num_local))
    return ql, kl, u, ur, v

  def assign(self, u) -> jax.Array:
    """Nearest centroid by dot product: u [B, T, H_route, D] -> [B, T, H_route] int32."""
    sim = jnp.einsum("bthd,hcd->bthc", u, self.centroids())
    return jnp.argmax(sim, axis=-1).astype(jnp.int32)

  # -- full sequence -------------------------------------------------------------------------

  def __call__(self, x, *, positions, segment_ids=None, causal=True, train=False):
    b, t, _ = x.shape
    ql, kl, u, ur, v = self.project(x, positions)
    vl, vr = v[:, :, :self.num_local], v[:, :, self.num_local:]
    seg = segment_ids if segment_ids is not None else jnp.ones((b, t), jnp.int32)
    assign = self.assign(u)
    outs, frac = [], None
    if self.num_local:
      o, frac = self._local(ql, kl, vl, segment_ids, causal)
      outs.append(o)
    if self.opts.membership == "nearest":
      outs.append(self._route_nearest(ur, vr, assign, seg, causal))
    else:
      outs.append(self._route_balanced(u, ur, vr, seg, causal))
    y = self.o_proj(base.merge_heads(jnp.concatenate(outs, axis=2)))

    real = (seg > 0).astype(jnp.float32) if segment_ids is not None else jnp.ones((b, t))
    mu = jax.lax.stop_gradient(self.centroids())
    nearest = mu[jnp.arange(self.num_routing)[None, None], assign]  # [B, T, Hr, D]
    err = jnp.mean(jnp.square(u - nearest), axis=(2, 3))
    commit = jnp.sum(err * real) / jnp.maximum(jnp.sum(real), 1.0)
    if train:
      new_sum, new_count = ema_update(self.ema_sum[...], self.ema_count[...],
                                      jax.lax.stop_gradient(u), assign, real, self.opts.decay)
      self.ema_sum[...], self.ema_count[...] = new_sum, new_count
    return y, {"loss_commitment": self.opts.commitment * commit,
               **base.fallback_aux("softmax", frac)}

  def _local(self, q, k, v, segment_ids, causal):
    return softmax_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                             window=self.opts.local_window, impl=self.op_impl("softmax"),
                             return_fallback_frac=True)

  def _route_nearest(self, ur, v, assign, seg, causal):
    """Each token attends causally to earlier tokens of its own cluster. -> [B, T, Hr, D]."""
    b, t, hr, d = ur.shape
    if self.impl == "reference":  # the plain formula, in token order
      idx = base.sequence_index(b, t)
      same = assign.transpose(0, 2, 1)  # [B, Hr, T]
      mask = base.attention_mask(idx, idx, causal=causal, q_segment_ids=seg,
                                 k_segment_ids=seg)  # [B, 1, T, T]
      mask = mask & (same[..., :, None] == same[..., None, :])
      return reference_attention(ur, ur, v, mask)
    # Sort each head's tokens by (cluster, position): clusters become contiguous runs.
    key = assign * t + jnp.arange(t, dtype=jnp.int32)[None, :, None]
    perm = jnp.argsort(key, axis=1).astype(jnp.int32)  # [B, T, Hr], unique keys: a permutation
    inverse = inverse_permutation(perm, axis=1)  # no second sort
    # Gathers whose gradients are gathers by the inverse (autodiff's: scatter-adds, GPU atomics).
    take = lambda a: permute(a, perm, inverse, axis=1)  # noqa: E731
    cl_sorted = jnp.take_along_axis(assign, perm, axis=1).transpose(0, 2, 1)  # [B, Hr, T]
    pos = perm.transpose(0, 2, 1)
    seg_sorted = jnp.take_along_axis(seg[:, :, None], perm, axis=1).transpose(0, 2, 1)
    bs = block_size_for(t, self.opts.block)
    kv_idx, kv_cnt = lists_from_block_mask(cluster_block_mask(cl_sorted, bs, causal))
    us = take(ur)
    o, _ = block_sparse_attention(
        us, us, take(v), kv_idx, kv_cnt, block_q=bs, block_k=bs, causal=causal,
        q_positions=pos, kv_positions=pos, q_segment_ids=cl_sorted * _SEG_STRIDE + seg_sorted,
        kv_segment_ids=cl_sorted * _SEG_STRIDE + seg_sorted, impl=self.op_impl("block_sparse"))
    return permute(o, inverse, perm, axis=1)  # back to token order

  def _route_balanced(self, u, ur, v, seg, causal):
    """Each centroid attends among its top-w tokens; outputs averaged per token."""
    b, t, hr, d = ur.shape
    c = self.opts.num_clusters
    w = min(t, self.opts.cluster_size or max(1, t // c))
    sim = jnp.einsum("bthd,hcd->bhct", u, self.centroids())
    _, members = jax.lax.top_k(sim, w)  # [B, Hr, C, w]
    members = jnp.sort(members, axis=-1)
    bs = block_size_for(w, self.opts.block)
    wp = -(-w // bs) * bs  # clusters padded to whole tiles so tiles never mix clusters
    valid = jnp.arange(wp) < w
    members = jnp.pad(members, ((0, 0), (0, 0), (0, 0), (0, wp - w)))
    flat = members.reshape(b, hr, c * wp)  # [B, Hr, C*wp] token index per slot
    cluster = jnp.repeat(jnp.arange(c, dtype=jnp.int32), wp)
    slot_seg = jnp.take_along_axis(jnp.broadcast_to(seg[:, None], (b, hr, t)), flat, axis=-1)
    slot_seg = cluster * _SEG_STRIDE + slot_seg
    pad = ~jnp.tile(valid, c)
    q_seg = jnp.where(pad, -1, slot_seg)
    kv_seg = jnp.where(pad, -2, slot_seg)
    gather = lambda a: jnp.take_along_axis(a, flat.transpose(0, 2, 1)[..., None], axis=1)  # noqa
    n_per = wp // bs
    blk = jnp.arange(c * n_per) // n_per
    blocks = blk[:, None] == blk[None, :]
    if causal:
      blocks &= jnp.tril(jnp.ones_like(blocks))
    kv_idx, kv_cnt = lists_from_block_mask(blocks[None, None])
    o, _ = block_sparse_attention(
        gather(ur), gather(ur), gather(v), kv_idx, kv_cnt, block_q=bs, block_k=bs,
        causal=causal, q_positions=flat, kv_positions=flat, q_segment_ids=q_seg,
        kv_segment_ids=kv_seg, impl=self.op_impl("block_sparse"))  # [B, C*wp, Hr, D]
    o = jnp.where(pad[None, :, None, None], 0.0, o.astype(jnp.float32))
    tok = flat.transpose(0, 2, 1)  # [B, C*wp, Hr]
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(hr)[None, None, :]
    total = jnp.zeros((b, t, hr, d), jnp.float32).at[bi, tok, hi].add(o)
    count = jnp.zeros((b, t, hr), jnp.float32).at[bi, tok, hi].add(
        jnp.broadcast_to(~pad[None, :, None], tok.shape).astype(jnp.float32))
    return (total / (count[..., None] + 1e-2)).astype(v.dtype)

  # -- decoding ------------------------------------------------------------------------------

  def init_cache(self, batch, max_len, dtype=None):
    dtype = dtype or self.dtype
    d = self.head_dim
    cache = {"ur": jnp.zeros((batch, max_len, self.num_routing, d), dtype),
             "v": jnp.zeros((batch, max_len, self.num_heads, d), dtype),
             "cluster": jnp.zeros((batch, max_len, self.num_routing), jnp.int32),
             "index": jnp.zeros((), jnp.int32)}
    if self.num_local:
      cache["kl"] = jnp.zeros((batch, max_len, self.num_local, d), dtype)
    return cache

  def decode(self, x, *, positions, cache):
    """New tokens x [B, T, d_model] after the cached ones; nearest-centroid routing."""
    b, t, _ = x.shape
    ql, kl, u, ur, v = self.project(x, positions)
    start = cache["index"]
    put = lambda name, val: jax.lax.dynamic_update_slice(  # noqa: E731
        cache[name], val.astype(cache[name].dtype), (0, start) + (0,) * (val.ndim - 2))
    new = {"ur": put("ur", ur), "v": put("v", v), "cluster": put("cluster", self.assign(u)),
           "index": start + t}
    max_len = new["v"].shape[1]
    q_idx, k_idx = base.sequence_index(b, t, start), base.sequence_index(b, max_len)
    mask = base.attention_mask(q_idx, k_idx, causal=True, k_valid=k_idx < start + t)
    cl = new["cluster"].transpose(0, 2, 1)  # [B, Hr, L]
    q_cl = jax.lax.dynamic_slice_in_dim(cl, start, t, axis=2)
    route_mask = mask & (q_cl[..., :, None] == cl[..., None, :])
    dtype = ur.dtype
    outs = []
    if self.num_local:
      new["kl"] = put("kl", kl)
      local_mask = base.attention_mask(q_idx, k_idx, causal=True, window=self.opts.local_window,
                                       k_valid=k_idx < start + t)
      outs.append(reference_attention(ql, new["kl"].astype(dtype),
                                      new["v"][:, :, :self.num_local].astype(dtype), local_mask))
    outs.append(reference_attention(ur, new["ur"].astype(dtype),
                                    new["v"][:, :, self.num_local:].astype(dtype), route_mask))
    return self.o_proj(base.merge_heads(jnp.concatenate(outs, axis=2))), new
