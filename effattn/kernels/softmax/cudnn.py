"""Softmax attention through cuDNN's fused kernel, including its packed-segment layout.

Packed rows (segment ids) reach cuDNN as segment offsets and lengths (at most `max_segments`
runs per row, a static shape), so no [T, T] mask is built. A batch with a row of more runs takes
the block-sparse kernel with the segment ids, or with a sliding window the query-chunked XLA
form (lax.cond: exact either way, and no branch holds a [T, T] array).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from effattn.kernels import dispatch
from effattn.kernels.block_sparse import api as block_sparse
from effattn.kernels.block_sparse.common import causal_block_mask, lists_from_block_mask
from effattn.kernels.softmax import xla
from effattn.kernels.softmax.common import local_window

try:  # cuDNN's packed-sequence form is only in jax's internal API (jax.nn does not expose it).
  from jax._src.cudnn import fused_attention_stablehlo as jax_cudnn
  PACKED_API = {"q_offsets", "kv_offsets", "q_seqlen", "kv_seqlen", "mask_type",
                "sliding_window_length"} <= set(
                    inspect.signature(jax_cudnn.dot_product_attention).parameters)
except (ImportError, AttributeError, ValueError, TypeError):  # pragma: no cover
  jax_cudnn, PACKED_API = None, False


def _dtype(dtype) -> str:
  return "" if dtype in (jnp.bfloat16, jnp.float16) else f"dtype {dtype} (cuDNN needs bf16/fp16)"


def _head_dim(head_dim) -> str:
  return "" if head_dim % 8 == 0 and head_dim <= 128 else (
      f"head_dim {head_dim} (cuDNN needs a multiple of 8, at most 128)")


def _packed(segments: bool, causal: bool, window) -> str:
  """Empty string when cuDNN's packed layout can take these segments, else why not."""
  if not segments:
    return ""
  if not PACKED_API:
    return "this jax has no cuDNN packed-segment API"
  if window is not None and not causal:
    return "cuDNN windows are causal only"
  return ""


# What the cudnn path takes (softmax api's FAMILY): checked in this order, each reason logged.
LIMITS = (
    dispatch.Limit(("dtype",), lambda dtype: _dtype(dtype)),
    dispatch.Limit(("head_dim",), lambda head_dim: _head_dim(head_dim)),
    dispatch.Limit(("dense_mask",), lambda dense_mask: "a dense mask" if dense_mask else ""),
    dispatch.Limit(("segments", "causal", "window"), _packed),
)


def packed_segments(segment_ids: jax.Array, max_segments: int):
  """Runs of equal ids in each row -> cuDNN's packed layout.

  segment_ids: [B, T] (padding is a run like any other, so it attends only to itself).
  Returns (lengths [B, M], offsets [B, M + 1], count [B]) with M = max_segments: each row's run
  lengths and start offsets, -1 past its `count` runs. A row with more than M runs is truncated
  here; callers check `count`.
  """
  b, t = segment_ids.shape
  starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                           axis=1)
  count = jnp.sum(starts, axis=1, dtype=jnp.int32)
  first = jax.vmap(lambda row: jnp.nonzero(row, size=max_segments, fill_value=t)[0])(starts)
  first = first.astype(jnp.int32)
  ends = jnp.concatenate([first[:, 1:], jnp.full((b, 1), t, jnp.int32)], axis=1)
  real = jnp.arange(max_segments)[None, :] < count[:, None]
  lengths = jnp.where(real, ends - first, -1)
  offsets = jnp.concatenate([jnp.where(real, first, -1), jnp.full((b, 1), -1, jnp.int32)], 1)
  return lengths, offsets, count


def packed_attention(q, k, v, segment_ids, *, causal, window, scale, max_segments):
  """cuDNN over packed rows; a batch with a row of more than max_segments runs takes the
  block-sparse kernel, or with a window the query-chunked XLA form (lax.cond: exact either way,
  and no branch holds a [T, T] array).

  Returns (o [B, T, H, D], the fraction of rows that took the fallback: 1.0 or 0.0, since the
  whole batch takes it when one row needs it).
  """
  lengths, offsets, count = packed_segments(segment_ids, max_segments)
  mask_type = jax_cudnn.MaskType.PADDING_CAUSAL if causal else jax_cudnn.MaskType.PADDING
  d = q.shape[-1]
  scale = d ** -0.5 if scale is None else scale

  def fused(q, k, v):
    return jax_cudnn.dot_product_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
        scale=scale, mask_type=mask_type, sliding_window_length=window)

  def kernel(q, k, v):
    blk = 64
    n = -(-q.shape[1] // blk)
    blocks = (causal_block_mask(n, n, blk, blk) if causal else jnp.ones((n, n), bool))
    idx, cnt = lists_from_block_mask(blocks[None, None])
    o, _ = block_sparse.block_sparse_attention(
        q, k, v, idx, cnt, block_q=blk, block_k=blk, causal=causal, q_segment_ids=segment_ids,
        kv_segment_ids=segment_ids, scale=scale)
    return o

  def chunked(q, k, v):
    return xla.query_chunked(q, k, v, segment_ids, causal=causal, window=window, scale=scale)

  fallback = kernel if window is None else chunked
  fits = jnp.max(count) <= max_segments
  return jax.lax.cond(fits, fused, fallback, q, k, v), 1.0 - fits.astype(jnp.float32)


def softmax_attention(q, k, v, *, causal, segment_ids=None, window=None, scale=None,
                      max_segments: int = 16):
  """The cudnn path of api.softmax_attention (no dense mask: cuDNN takes segments packed).

  Returns (o, fallback fraction of packed_attention, or None without segments: no fallback).
  """
  if segment_ids is not None:
    return packed_attention(q, k, v, segment_ids, causal=causal, window=window, scale=scale,
                            max_segments=max_segments)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                      local_window_size=local_window(causal, window),
                                      implementation="cudnn"), None
