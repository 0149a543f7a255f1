"""Softmax attention baseline: MHA, GQA (num_kv_heads < H) and MQA (num_kv_heads = 1).

Optional sliding window (`window`), RoPE applied by the module when the model uses rotary
positions, segment ids for packed sequences, and a KV cache for decoding (with a window, a ring
of its W slots: kv_cache.py). aux holds `softmax_fallback_frac` where the path taken (cuDNN's
packed layout) has a runtime fallback.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from effattn.attention import base, kv_cache
from effattn.attention.registry import register
from effattn.kernels.softmax import attention_probs, softmax_attention


@register("softmax")
class SoftmaxAttention(base.Attention):
  """y = softmax(q k^T / sqrt(D) + mask) v with H_kv key/value heads shared by H / H_kv queries."""

  DEFAULTS = {}
  OPS = ("softmax",)
  SUPPORTS = ("num_kv_heads", "head_dim", "window")
  CONTEXT_PARALLEL = True

  @classmethod
  def context_parallel(cls, opts, sizes, causal):
    why_not = super().context_parallel(opts, sizes, causal)
    return why_not or ("a sliding window has no ring path" if sizes.window is not None else "")

  def __init__(self, cfg: Any, *, d_model: int, num_heads: int, rngs: nnx.Rngs, **kwargs):
    super().__init__(cfg, d_model=d_model, num_heads=num_heads, rngs=rngs, **kwargs)
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.qkvo_projections(
        d_model, num_heads, self.num_kv_heads, self.head_dim, rngs=rngs, dtype=self.dtype)

  def project(self, x, positions):
    """x [B, T, d_model] -> q [B, T, H, D], k and v [B, T, H_kv, D], RoPE applied."""
    q = base.split_heads(self.q_proj(x), self.num_heads)
    k = base.split_heads(self.k_proj(x), self.num_kv_heads)
    v = base.split_heads(self.v_proj(x), self.num_kv_heads)
    if self.rope_theta is not None:
      q = base.apply_rope(q, positions, self.rope_theta)
      k = base.apply_rope(k, positions, self.rope_theta)
    return q, k, v

  def __call__(self, x, *, positions, segment_ids=None, causal=True, train=False):
    q, k, v = self.project(x, positions)
    o, frac = softmax_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                window=self.window, impl=self.op_impl("softmax"),
                                return_fallback_frac=True)
    return self.o_proj(base.merge_heads(o)), base.fallback_aux("softmax", frac)

  def attention_weights(self, x, *, positions, segment_ids=None, causal=True):
    """softmax(q k^T / sqrt(D)) over the keys the mask leaves (window, segments): [B, H, T, T]."""
    q, k, _ = self.project(x, positions)
    idx = base.sequence_index(x.shape[0], x.shape[1])
    mask = base.attention_mask(idx, idx, causal=causal, q_segment_ids=segment_ids,
                               k_segment_ids=segment_ids, window=self.window)
    return jnp.where(mask, attention_probs(q, k, mask), 0.0)

  def init_cache(self, batch, max_len, dtype=None):
    # A window keeps only its last W keys: a ring of W slots, whatever max_len (kv_cache.py).
    slots = max_len if self.window is None else self.window
    return kv_cache.init(batch, slots, self.num_kv_heads, self.head_dim, dtype or self.dtype)

  def _attend_cached(self, q, k, v, mask):
    return softmax_attention(q, k.astype(q.dtype), v.astype(q.dtype), causal=True, mask=mask,
                             impl="reference" if self.impl == "reference" else "xla")

  def decode(self, x, *, positions, cache):
    b, t, _ = x.shape
    q, k, v = self.project(x, positions)
    if self.window is not None:
      o, cache = kv_cache.window_attend(q, k, v, cache, window=self.window,
                                        attend=self._attend_cached, what=self.registered_name)
      return self.o_proj(base.merge_heads(o)), cache
    kv_cache.check(cache, k.shape, what=self.registered_name, window=None)
    start = cache["index"]
    k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, start, 0, 0))
    v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, start, 0, 0))
    max_len = k_all.shape[1]
    k_idx = base.sequence_index(b, max_len)
    mask = base.attention_mask(base.sequence_index(b, t, start), k_idx, causal=True,
                               k_valid=k_idx < start + t)
    o = self._attend_cached(q, k_all, v_all, mask)
    return self.o_proj(base.merge_heads(o)), {"k": k_all, "v": v_all, "index": start + t}
