"""Masks of softmax attention, shared by its paths and by every mechanism that builds one.

    mask = attention_mask(q_index, k_index, causal=True, window=16)   # [B, 1, Tq, Tk] bool
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(
    q_index: jax.Array,
    k_index: jax.Array,
    *,
    causal: bool,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
    window: int | None = None,
    k_valid: jax.Array | None = None,
) -> jax.Array:
  """Boolean [B, 1, Tq, Tk] mask: True where query i may attend key j.

  q_index / k_index: [B, Tq] / [B, Tk] absolute token indices (not RoPE positions: packed
  segments restart positions, indices do not). A sliding window keeps q - k < window.
  k_valid: [B, Tk] marks filled cache slots while decoding.
  """
  qi, kj = q_index[:, :, None], k_index[:, None, :]
  mask = jnp.ones(qi.shape[:1] + (qi.shape[1], kj.shape[2]), dtype=bool)
  if causal:
    mask &= kj <= qi
  if window is not None:
    mask &= (qi - kj < window) & (kj - qi < window)
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
  if k_valid is not None:
    mask &= k_valid[:, None, :]
  return mask[:, None]


def sequence_index(batch: int, length: int, offset: jax.Array | int = 0) -> jax.Array:
  """[B, T] int32 token indices offset..offset+T-1."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset, (batch, length))


def segment_mask(q, segment_ids, causal: bool, window: int | None):
  """The [B, 1, T, T] mask of a packed self-attention: q [B, T, ...], segment_ids [B, T]."""
  idx = sequence_index(q.shape[0], q.shape[1])
  return attention_mask(idx, idx, causal=causal, q_segment_ids=segment_ids,
                        k_segment_ids=segment_ids, window=window)


def local_window(causal: bool, window: int | None):
  """jax.nn.dot_product_attention's local_window_size for a window of `window` keys."""
  if window is None:
    return None
  return (window - 1, 0) if causal else (window - 1, window - 1)
