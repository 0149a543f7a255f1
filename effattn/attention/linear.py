"""Kernelized linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

    o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps),   S_t = sum_{s<=t} phi(k_s)^T v_s,
                                                    z_t = sum_{s<=t} phi(k_s)

Bidirectional: the sums run over every s of the segment. Feature maps: elu+1 (default), relu,
softmax over the features, and identity, which has no normalizer ("simple linear attention",
scaled by D^-0.5 like fla's chunk_linear_attn). The numerator and the normalizer both come from
the linear_scan kernel family (the normalizer is the same scan with an all-ones value column),
so decoding keeps an O(1) state per layer: S [B, H, D, D] and z [B, H, D].

Positions: none inside the mechanism (as in the paper); give the model learned positions if the
task needs them (RoPE would break the positivity the normalizer relies on).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from effattn.attention import base
from effattn.attention.registry import register
from effattn.kernels.linear_scan import decode_impl, linear_scan, linear_scan_normalizer
from effattn.ranges import NON_NEGATIVE

FEATURE_MAPS = {
    "elu+1": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "softmax": lambda x: jax.nn.softmax(x, axis=-1),
    "identity": lambda x: x,
}


class LinearState(NamedTuple):
  """Recurrent state of (normalized) linear attention; float32."""

  kv: jax.Array     # [B, H, Dk, Dv]  sum of phi(k)^T v
  k_sum: jax.Array  # [B, H, Dk]      sum of phi(k)


def linear_attention(phi_q, phi_k, v, *, causal: bool = True, segment_ids=None,
                     normalize: bool = True, eps: float = 1e-6, scale: float = 1.0,
                     state: LinearState | None = None, impl: str = "auto"):
  """Linear attention on feature-mapped queries and keys.

  Args:
    phi_q, phi_k: [B, T, H, Dk] features (non-negative when normalize=True); v: [B, T, H, Dv].
    causal: sums over s <= t (else over the whole segment).
    segment_ids: [B, T] packed sequences (state restarts at each new segment).
    normalize: divide by phi(q_t) . z_t + eps.
    eps: added to the normalizer.
    scale: multiplies the scores (cancels when normalized, up to eps).
    state: LinearState carried in (causal only), e.g. after a prompt.
    impl: linear_scan impl.

  Returns:
    (o [B, T, H, Dv] float32, LinearState after the last token).
  """
  b, _, h, dk = phi_q.shape
  kw = dict(causal=causal, segment_ids=segment_ids, scale=scale, impl=impl)
  num, kv = linear_scan(phi_q, phi_k, v, initial_state=None if state is None else state.kv,
                        out_dtype=jnp.float32, **kw)
  if not normalize:
    return num, LinearState(kv, jnp.zeros((b, h, dk), jnp.float32))
  den, k_sum = linear_scan_normalizer(phi_q, phi_k,
                                      initial_state=None if state is None else state.k_sum, **kw)
  return num / (den[..., None] + eps), LinearState(kv, k_sum)


def linear_weights(phi_q, phi_k, *, causal: bool = True, segment_ids=None,
                   normalize: bool = True, eps: float = 1e-6, scale: float = 1.0):
  """The implicit attention weights of linear_attention, float32 [B, H, T, T] (0 where masked):

      a_ij = scale phi(q_i) . phi(k_j) / (scale sum_{l visible} phi(q_i) . phi(k_l) + eps)

  (without the division when normalize=False), so o_i = sum_j a_ij v_j. O(T^2): for analysis.
  phi_q, phi_k: [B, T, H, Dk]; the keys visible to query i are those of its segment (up to i
  when causal).
  """
  b, t = phi_q.shape[:2]
  idx = base.sequence_index(b, t)
  mask = base.attention_mask(idx, idx, causal=causal, q_segment_ids=segment_ids,
                             k_segment_ids=segment_ids)
  s = jnp.einsum("bihd,bjhd->bhij", phi_q.astype(jnp.float32), phi_k.astype(jnp.float32))
  s = jnp.where(mask, s * scale, 0.0)
  return s / (jnp.sum(s, axis=-1, keepdims=True) + eps) if normalize else s


@register("linear")
class LinearAttention(base.Attention):
  """Linear attention with a configurable feature map and an O(1)-state decode."""

  DEFAULTS = {
      "feature_map": "elu+1",  # elu+1 | relu | softmax (over features) | identity (no normalizer)
      "eps": 1e-6,  # added to the normalizer phi(q) . z
  }
  OPS = ("linear_scan",)
  CONTEXT_PARALLEL = "causal"
  SUPPORTS = ("num_kv_heads", "head_dim")  # the state holds every past token: no window
  CHOICES = {"feature_map": tuple(FEATURE_MAPS)}
  RANGES = {"eps": NON_NEGATIVE}

  def __init__(self, cfg: Any, *, d_model: int, num_heads: int, rngs: nnx.Rngs, **kwargs):
    super().__init__(cfg, d_model=d_model, num_heads=num_heads, rngs=rngs, **kwargs)
    self.normalize = self.opts.feature_map != "identity"
    # The normalizer cancels any scale (up to eps); unnormalized scores are scaled like fla's.
    self.score_scale = 1.0 if self.normalize else self.head_dim ** -0.5
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.qkvo_projections(
        d_model, num_heads, self.num_kv_heads, self.head_dim, rngs=rngs, dtype=self.dtype)

  def features(self, x):
    """x [B, T, d_model] -> phi(q), phi(k) [B, T, H, D], v [B, T, H, D]."""
    phi = FEATURE_MAPS[self.opts.feature_map]
    q = phi(base.split_heads(self.q_proj(x), self.num_heads))
    k = phi(base.split_heads(self.k_proj(x), self.num_kv_heads))
    v = base.split_heads(self.v_proj(x), self.num_kv_heads)
    return q, base.repeat_kv(k, self.num_heads), base.repeat_kv(v, self.num_heads)

  def attend(self, x, *, causal, segment_ids=None, state=None, impl=None):
    q, k, v = self.features(x)
    o, state = linear_attention(
        q, k, v, causal=causal, segment_ids=segment_ids, normalize=self.normalize,
        eps=self.opts.eps, scale=self.score_scale, state=state,
        impl=impl or self.op_impl("linear_scan"))
    return self.o_proj(base.merge_heads(o.astype(x.dtype))), state

  def __call__(self, x, *, positions, segment_ids=None, causal=True, train=False):
    del positions, train
    return self.attend(x, causal=causal, segment_ids=segment_ids)[0], {}

  def attention_weights(self, x, *, positions, segment_ids=None, causal=True):
    """linear_weights of this layer's features: [B, H, T, T]."""
    del positions
    q, k, _ = self.features(x)
    return linear_weights(q, k, causal=causal, segment_ids=segment_ids,
                          normalize=self.normalize, eps=self.opts.eps, scale=self.score_scale)

  def init_cache(self, batch, max_len, dtype=None):
    del max_len, dtype  # O(1) state: the length never matters
    h, d = self.num_heads, self.head_dim
    return LinearState(jnp.zeros((batch, h, d, d), jnp.float32),
                       jnp.zeros((batch, h, d), jnp.float32))

  def decode(self, x, *, positions, cache):
    del positions
    return self.attend(x, causal=True, state=cache,
                       impl=decode_impl(self.op_impl("linear_scan"), x.shape[1]))
