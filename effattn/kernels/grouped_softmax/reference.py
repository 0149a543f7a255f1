"""The landmark grouped softmax in its dense form: the oracle of every path of this family.

For query i of group g(i) (`gid`) in segment s(i) (`seg`), with scores s_ij = scale q_i . k_j:

  outer group G_i = {tokens j <= i of g(i)} U {landmark keys of the earlier groups of s(i)}
  own-group token j:      a_ij = exp(s_ij) / sum_{l in G_i} exp(s_il)
  token j of group c < g(i): a_ij = [exp(s_ij) / sum_{l in c} exp(s_il)] * p_{i, landmark(c)}

Each row sums to 1. O(T^2) scores; xla.py evaluates the same rows a chunk of queries at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30


def group_table(gid, seg, g_slots: int):
  """Per group slot: whether it exists and its segment ([B, G] each; groups never straddle
  segments)."""
  onehot = jax.nn.one_hot(gid, g_slots, dtype=jnp.float32)  # [B, T, G]
  count = jnp.sum(onehot, axis=1)
  group_seg = jnp.einsum("btg,bt->bg", onehot, seg.astype(jnp.float32)) / jnp.maximum(count, 1.0)
  return count > 0, group_seg


def grouped_rows(q, q_idx, q_gid, q_seg, k, v, k_land, gid, seg, table, *, scale: float):
  """The grouped softmax of some query rows over every key.

  q: [B, C, H, D] with token indices q_idx [C] and groups / segments q_gid, q_seg [B, C];
  k, v: [B, T, H, D]; k_land: [B, G, H, D]; gid, seg: [B, T]; table: group_table's output.
  Returns o [B, C, H, D] (float32) and the weights a [B, H, C, T].
  """
  g_slots = k_land.shape[1]
  f32 = jnp.float32
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f32), k.astype(f32)) * scale
  s_land = jnp.einsum("bqhd,bghd->bhqg", q.astype(f32), k_land.astype(f32)) * scale
  b, h, c, t = s.shape
  own = ((q_gid[:, :, None] == gid[:, None, :])
         & (jnp.arange(t)[None, None, :] <= q_idx[None, :, None]))  # [B, C, T]
  earlier = (q_seg[:, :, None] == seg[:, None, :]) & (gid[:, None, :] < q_gid[:, :, None])
  exists, group_seg = table
  land_vis = (exists[:, None, :] & (jnp.arange(g_slots)[None, None, :] < q_gid[:, :, None])
              & (group_seg[:, None, :] == q_seg[:, :, None].astype(f32)))  # [B, C, G]
  # Within-group log-normalizer of every query over every group: lse_g(i).
  s_e = jnp.where(earlier[:, None], s, _NEG)
  m_g = jax.vmap(lambda sb, gb: jax.ops.segment_max(jnp.moveaxis(sb, -1, 0), gb, g_slots))(
      s_e, gid)  # [B, G, H, C]
  m_g = jnp.where(m_g > _NEG / 2, m_g, 0.0)
  m_tok = jnp.moveaxis(jnp.take_along_axis(m_g, gid[:, :, None, None], axis=1), 1, -1)
  e_in = jnp.where(earlier[:, None], jnp.exp(s - m_tok), 0.0)  # [B, H, C, T]
  z_g = jax.vmap(lambda eb, gb: jax.ops.segment_sum(jnp.moveaxis(eb, -1, 0), gb, g_slots))(
      e_in, gid)  # [B, G, H, C]
  z_tok = jnp.moveaxis(jnp.take_along_axis(z_g, gid[:, :, None, None], axis=1), 1, -1)
  within = e_in / jnp.where(z_tok > 0, z_tok, 1.0)
  # Outer softmax over own-block tokens and visible landmarks.
  s_own = jnp.where(own[:, None], s, _NEG)
  s_l = jnp.where(land_vis[:, None], s_land, _NEG)
  m = jnp.maximum(s_own.max(-1), s_l.max(-1))[..., None]
  p_own = jnp.where(own[:, None], jnp.exp(s_own - m), 0.0)
  p_land = jnp.where(land_vis[:, None], jnp.exp(s_l - m), 0.0)
  denom = p_own.sum(-1, keepdims=True) + p_land.sum(-1, keepdims=True)
  denom = jnp.where(denom > 0, denom, 1.0)  # padded query rows see nothing
  p_own, p_land = p_own / denom, p_land / denom
  land_of_key = jnp.take_along_axis(p_land, jnp.broadcast_to(gid[:, None, None, :],
                                                             (b, h, c, t)), axis=-1)
  a = p_own + within * land_of_key
  return jnp.einsum("bhqk,bkhd->bqhd", a, v.astype(f32)), a


def grouped_softmax_attention(q, k, v, k_land, gid, seg, *, scale: float):
  """The grouped softmax over regular tokens and landmark keys (dense reference form).

  q, k, v: [B, T, H, D]; k_land: [B, G, H, D] landmark key of group g (G = T slots, unused
  ones never visible); gid, seg: [B, T] group and segment of each token.
  Returns o [B, T, H, D] and the attention weights a [B, H, T, T] (rows sum to 1).
  """
  table = group_table(gid, seg, k_land.shape[1])
  o, a = grouped_rows(q, jnp.arange(q.shape[1]), gid, seg, k, v, k_land, gid, seg, table,
                      scale=scale)
  return o.astype(q.dtype), a
