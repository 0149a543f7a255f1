"""Head-routed attention computed densely: the oracle.

Every head attends over every token (plain jnp, O(T^2) memory); a (token, head) pair whose gate
is 0 is dropped, the others are weighted by their gate:

    o[b, t, h] = gates[b, t, h] * softmax(q[b, t, h] k[b, :, h_kv]^T * scale + mask) v[b, :, h_kv]
                 if gates[b, t, h] != 0, else 0,

with h_kv = h // (H / H_kv) (GQA) and mask = causal and/or equal segment ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def head_routed_attention(q, k, v, gates, *, causal: bool, segment_ids=None, scale: float):
  """q [B, T, H, D], k / v [B, T, H_kv, D], gates [B, T, H] -> o [B, T, H, D] in q's dtype."""
  b, t, h, d = q.shape
  h_kv = k.shape[2]
  hp = jax.lax.Precision.HIGHEST
  qg = q.reshape(b, t, h_kv, h // h_kv, d).astype(jnp.float32)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32), precision=hp) * scale
  mask = jnp.ones((b, 1, 1, t, t), bool)
  if causal:
    mask &= jnp.tril(jnp.ones((t, t), bool))
  if segment_ids is not None:
    mask &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, None]
  p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32), precision=hp).reshape(b, t, h, d)
  g = gates.astype(jnp.float32)[..., None]
  return jnp.where(g != 0, g * o, 0.0).astype(q.dtype)
