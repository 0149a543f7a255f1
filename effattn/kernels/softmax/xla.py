"""Softmax attention through XLA: jax.nn.dot_product_attention(implementation="xla"), and the
query-chunked form of its dense mask for packed rows cuDNN's layout cannot hold."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effattn.kernels.softmax.common import (attention_mask, local_window, segment_mask,
                                            sequence_index)


def softmax_attention(q, k, v, *, causal, mask=None, segment_ids=None, window=None, scale=None):
  """The xla path of api.softmax_attention (a dense mask only where one is given or segments
  need it)."""
  if segment_ids is not None:
    mask = segment_mask(q, segment_ids, causal, window)
  if mask is not None:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                      local_window_size=local_window(causal, window),
                                      implementation="xla")


def query_chunked(q, k, v, segment_ids, *, causal, window, scale, chunk: int = 512):
  """The dense-mask XLA attention `chunk` queries at a time (scores recomputed in the backward
  pass): O(chunk * T) memory, for the rare packed rows cuDNN's layout cannot hold."""
  b, t = q.shape[:2]
  n = -(-t // chunk)
  pad = n * chunk - t
  q_pad = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  seg_q = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)  # matches no key
  k_idx = sequence_index(b, t)

  @jax.checkpoint
  def one_chunk(c):
    rows = jax.lax.dynamic_slice_in_dim(q_pad, c * chunk, chunk, axis=1)
    seg = jax.lax.dynamic_slice_in_dim(seg_q, c * chunk, chunk, axis=1)
    mask = attention_mask(sequence_index(b, chunk, c * chunk), k_idx, causal=causal,
                          q_segment_ids=seg, k_segment_ids=segment_ids, window=window)
    return jax.nn.dot_product_attention(rows, k, v, mask=mask, scale=scale,
                                        implementation="xla")

  o = jax.lax.map(one_chunk, jnp.arange(n))  # [n, B, chunk, H, D]
  return jnp.moveaxis(o, 0, 1).reshape((b, n * chunk) + q.shape[2:])[:, :t]
