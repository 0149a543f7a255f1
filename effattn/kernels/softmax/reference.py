"""Plain softmax attention, the oracle of every softmax path (and of the mechanisms' decoders)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effattn.kernels.softmax.common import attention_mask, segment_mask, sequence_index


def attention_probs(q, k, mask=None, *, scale=None, bias=None):
  """The attention weights softmax(q k^T * scale + bias) of every query over the keys, float32
  [B, H, Tq, Tk]. q: [B, Tq, H, D], k: [B, Tk, H_kv, D] (GQA: H_kv divides H).

  mask: bool, broadcastable to [B, H, Tq, Tk]; bias: additive, same broadcasting. A fully masked
  row comes out uniform (softmax of equal minima), as in the attention itself.
  """
  b, tq, h, d = q.shape
  h_kv = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, tq, h_kv, h // h_kv, d)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg.astype(jnp.float32), k.astype(jnp.float32)) * scale
  s = s.reshape(b, h, tq, k.shape[1])
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  if mask is not None:
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(s, axis=-1)


def reference_attention(q, k, v, mask=None, *, scale=None, bias=None):
  """Plain softmax attention, the oracle. q: [B, Tq, H, D], k/v: [B, Tk, H_kv, D] -> [B, Tq, H, D].

  mask: bool, broadcastable to [B, H, Tq, Tk]; bias: additive, same broadcasting.
  K/V heads are shared by groups of H / H_kv query heads (GQA) without materializing repeats.
  """
  b, tq, h, _ = q.shape
  h_kv = k.shape[2]
  p = attention_probs(q, k, mask, scale=scale, bias=bias)
  p = p.reshape(b, h_kv, h // h_kv, tq, k.shape[1])
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
  return o.reshape(b, tq, h, v.shape[-1]).astype(q.dtype)


def softmax_attention(q, k, v, *, causal, mask=None, segment_ids=None, window=None, scale=None):
  """The reference path of api.softmax_attention: the dense mask, then reference_attention."""
  if segment_ids is not None:
    mask = segment_mask(q, segment_ids, causal, window)
  if mask is None:
    b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    mask = attention_mask(sequence_index(b, tq), sequence_index(b, tk), causal=causal,
                          window=window)
  return reference_attention(q, k, v, mask, scale=scale)
