"""Mixture-of-Head attention (Jin et al. 2024, "MoH: Multi-Head Attention as Mixture-of-Head
Attention"; official code SkyworkAI/MoH, MoH-ViT/attention.py).

Multi-head attention written as a gated sum over heads, y_t = sum_i g_{t,i} h_{t,i} W_o^i, with
h_s shared heads always on and E = H - h_s routed heads of which each token picks its top-K:

    [alpha_1, alpha_2] = softmax(W_h x_t)                           (two-stage routing)
    g_i = alpha_1 * softmax(W_s x_t)_i                 shared heads i < h_s
    g_i = alpha_2 * softmax(W_r x_t)_i * [i in top-K]  routed heads

`scaling="official"` (default) follows the official code, which keeps MHA's output magnitude:
routed gates are renormalized over the top-K and multiplied by K, shared gates multiplied by h_s
(a single shared head has gate 1), and [alpha_1, alpha_2] multiplied by 2. With K = E and
uniform router logits every gate is then exactly 1 (MHA). `scaling="paper"` is the formula above.

Compute: shared heads run as plain softmax attention (cuDNN on GPU); routed heads go through the
head_routing kernels, which compute each head only for the tokens routed to it, so attention
FLOPs follow (h_s + K) / H. The official code computes every head and masks.

Load balance (aux `loss_moh_balance`, already times `balance_weight`): L_b = E * sum_i f_i P_i,
f_i the fraction of tokens routed to head i and P_i its mean routing probability, over real
tokens (segment id != 0). Logged: `moh_active_fraction` (share of (token, head) pairs with a
non-zero gate), `moh_load_imbalance` (max_i f_i / mean_i f_i, 1 = balanced) and, where a path
taken runs cuDNN's packed layout, `softmax_fallback_frac`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from effattn.attention import base
from effattn.attention.registry import register
from effattn.attention.softmax import SoftmaxAttention
from effattn.kernels.head_routing import head_routed_attention
from effattn.kernels.softmax import softmax_attention
from effattn.ranges import NON_NEGATIVE, ConfigError, Range

SCALINGS = ("official", "paper")


@register("moh")
class MixtureOfHeadAttention(SoftmaxAttention):
  """Shared heads always on plus top-K routed heads per token, gated; see the module docstring.

  Heads 0..h_s-1 are shared, h_s..H-1 routed. K/V heads follow softmax attention (num_kv_heads,
  GQA), with h_s a multiple of the group size so no K/V head mixes shared and routed queries.
  """

  DEFAULTS = {
      "num_shared_heads": None,  # h_s; None: H // 2 (MoH-LLaMA3-8B: 16 shared of 32)
      "top_k": None,  # routed heads per token; None: half of the E routed heads
      "scaling": "official",  # official (SkyworkAI/MoH code) | paper
      "balance_weight": 0.01,  # weight of the load-balance loss in aux["loss_moh_balance"]
      "block_q": 64,  # head_routing kernel tiles
      "block_k": 64,
  }
  OPS = ("softmax", "head_routing")  # shared heads, routed heads
  SUPPORTS = ("num_kv_heads", "head_dim")  # the routed-head kernel has no window
  CONTEXT_PARALLEL = False  # the routed heads' head_routing op has no context-parallel path
  CHOICES = {"scaling": SCALINGS}
  RANGES = {"num_shared_heads": Range(0, integer=True, none_ok=True),
            "top_k": Range(1, integer=True, none_ok=True), "balance_weight": NON_NEGATIVE,
            "block_q": Range(16, integer=True), "block_k": Range(16, integer=True)}  # powers of 2

  @staticmethod
  def head_split(opts, num_heads: int) -> tuple[int, int]:
    """(shared heads h_s, routed heads per token K) with their defaults filled in."""
    shared = num_heads // 2 if opts.num_shared_heads is None else int(opts.num_shared_heads)
    routed = num_heads - shared
    top_k = (max(1, routed // 2) if routed else 0) if opts.top_k is None else int(opts.top_k)
    return shared, top_k

  @classmethod
  def check(cls, opts, sizes):
    h = sizes.num_heads
    shared, top_k = cls.head_split(opts, h)
    if not 0 <= shared <= h:
      raise ConfigError(f"model.attention.moh.num_shared_heads={shared} must be in "
                        f"[0, num_heads={h}]")
    if h - shared and not 1 <= top_k <= h - shared:
      raise ConfigError(f"model.attention.moh.top_k={top_k} must be in [1, {h - shared}] (the "
                        "routed heads)")
    group = h // (sizes.num_kv_heads or h)
    if shared % group:
      raise ConfigError(f"model.attention.moh.num_shared_heads={shared} must be a "
                        f"multiple of num_heads / num_kv_heads = {group}")
    for field in ("block_q", "block_k"):
      base.check_power_of_two(f"model.attention.moh.{field}", getattr(opts, field), 16)

  def __init__(self, cfg: Any, *, d_model: int, num_heads: int, rngs: nnx.Rngs, **kwargs):
    super().__init__(cfg, d_model=d_model, num_heads=num_heads, rngs=rngs, **kwargs)
    self.num_shared, self.top_k = self.head_split(self.opts, num_heads)
    self.num_routed = e = num_heads - self.num_shared
    # Routers in float32: softmax / top-k on bf16 logits flips near-ties.
    router = lambda n: base.dense(d_model, n, rngs=rngs, dtype=jnp.float32)  # noqa: E731
    self.w_routed = router(e) if e else None
    self.w_shared = router(self.num_shared) if self.num_shared > 1 else None
    self.w_mix = router(2) if self.num_shared and e else None

  def route(self, x, valid=None):
    """x [B, T, d_model] -> gates [B, T, H] float32 and the routing aux terms.

    valid: [B, T] bool of real tokens (for the load-balance statistics), None = all.
    """
    official = self.opts.scaling == "official"
    xf = x.astype(jnp.float32)
    b, t, _ = x.shape
    parts, aux = [], {}
    if self.num_shared:
      if self.w_shared is not None:
        shared = jax.nn.softmax(self.w_shared(xf), axis=-1)
        shared = shared * self.num_shared if official else shared
      else:
        shared = jnp.ones((b, t, 1), jnp.float32)
      parts.append(shared)
    if self.num_routed:
      probs = jax.nn.softmax(self.w_routed(xf), axis=-1)
      _, top = jax.lax.top_k(probs, self.top_k)
      chosen = jnp.sum(jax.nn.one_hot(top, self.num_routed, dtype=jnp.float32), axis=-2)
      routed = probs * chosen
      if official:
        denom = jnp.maximum(jnp.sum(routed, -1, keepdims=True), jnp.finfo(jnp.float32).eps)
        routed = routed / denom * self.top_k
      parts.append(routed)
      aux.update(self._balance(probs, chosen, valid))
    if self.w_mix is not None:
      alpha = jax.nn.softmax(self.w_mix(xf), axis=-1)
      alpha = alpha * 2.0 if official else alpha
      parts = [parts[0] * alpha[..., :1], parts[1] * alpha[..., 1:]]
    gates = jnp.concatenate(parts, axis=-1)
    w = jnp.ones((b, t), jnp.float32) if valid is None else valid.astype(jnp.float32)
    active = jnp.mean((gates != 0).astype(jnp.float32), axis=-1)
    aux["moh_active_fraction"] = jnp.sum(active * w) / jnp.maximum(jnp.sum(w), 1.0)
    return gates, aux

  def _balance(self, probs, chosen, valid):
    """L_b = E * sum_i f_i P_i over real tokens, and the load imbalance max f / mean f."""
    w = jnp.ones(probs.shape[:2], jnp.float32) if valid is None else valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    f = jnp.einsum("bt,bte->e", w, chosen) / n
    p = jnp.einsum("bt,bte->e", w, probs) / n
    loss = self.num_routed * jnp.sum(f * p)
    return {"loss_moh_balance": self.opts.balance_weight * loss,
            "moh_load_imbalance": jnp.max(f) / jnp.maximum(jnp.mean(f), 1e-9)}

  def __call__(self, x, *, positions, segment_ids=None, causal=True, train=False):
    q, k, v = self.project(x, positions)
    valid = None if segment_ids is None else segment_ids != 0
    gates, aux = self.route(x, valid)
    hs, hs_kv = self.num_shared, self.num_shared // (self.num_heads // self.num_kv_heads)
    outs, fracs = [], []
    if hs:
      o, frac = softmax_attention(q[:, :, :hs], k[:, :, :hs_kv], v[:, :, :hs_kv], causal=causal,
                                  segment_ids=segment_ids, impl=self.op_impl("softmax"),
                                  return_fallback_frac=True)
      outs.append(o * gates[..., :hs, None].astype(o.dtype))
      fracs.append(frac)
    if self.num_routed:
      o, frac = head_routed_attention(
          q[:, :, hs:], k[:, :, hs_kv:], v[:, :, hs_kv:], gates[..., hs:].astype(q.dtype),
          causal=causal, segment_ids=segment_ids, block_q=self.opts.block_q,
          block_k=self.opts.block_k, impl=self.op_impl("head_routing"),
          return_fallback_frac=True)
      outs.append(o)
      fracs.append(frac)
    o = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    return self.o_proj(base.merge_heads(o)), {**aux, **base.fallback_aux("softmax", *fracs)}

  def decode(self, x, *, positions, cache):
    """Every head over the cache, then gated (a decode step is a handful of tokens)."""
    b, t, _ = x.shape
    q, k, v = self.project(x, positions)
    gates, _ = self.route(x)
    start = cache["index"]
    k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, start, 0, 0))
    v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, start, 0, 0))
    k_idx = base.sequence_index(b, k_all.shape[1])
    mask = base.attention_mask(base.sequence_index(b, t, start), k_idx, causal=True,
                               k_valid=k_idx < start + t)
    o = softmax_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), causal=True, mask=mask,
                          impl="reference" if self.impl == "reference" else "xla")
    g = gates[..., None]
    o = jnp.where(g != 0, g.astype(o.dtype) * o, 0).astype(o.dtype)
    return self.o_proj(base.merge_heads(o)), {"k": k_all, "v": v_all, "index": start + t}
