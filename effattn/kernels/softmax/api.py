"""Softmax attention as a function, with the path chosen per backend.

`impl="auto"` uses cuDNN fused attention on GPU when the dtype, head dim and mask allow, and XLA
otherwise; "reference" is the plain einsum oracle. Packed sequences (segment ids) reach cuDNN
through its packed layout (segment offsets and lengths) when the row holds at most
`max_segments` segments, and otherwise the block-sparse Pallas kernel with the segment ids
(query-chunked XLA with a window); only an explicit dense mask (cache validity while decoding)
forces XLA. The path taken is logged once
per distinct choice.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from effattn.kernels.softmax.common import attention_mask, sequence_index
from effattn.kernels.paths import log_path_once

try:  # cuDNN's packed-sequence form is only in jax's internal API (jax.nn does not expose it).
  from jax._src.cudnn import fused_attention_stablehlo as _cudnn
  _CUDNN_PACKED = {"q_offsets", "kv_offsets", "q_seqlen", "kv_seqlen", "mask_type",
                   "sliding_window_length"} <= set(
                       inspect.signature(_cudnn.dot_product_attention).parameters)
except (ImportError, AttributeError, ValueError, TypeError):  # pragma: no cover
  _cudnn, _CUDNN_PACKED = None, False

IMPLS = ("auto", "cudnn", "xla", "reference")


def reference_attention(q, k, v, mask=None, *, scale=None, bias=None):
  """Plain softmax attention, the oracle. q: [B, Tq, H, D], k/v: [B, Tk, H_kv, D] -> [B, Tq, H, D].

  mask: bool, broadcastable to [B, H, Tq, Tk]; bias: additive, same broadcasting.
  K/V heads are shared by groups of H / H_kv query heads (GQA) without materializing repeats.
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
  p = jax.nn.softmax(s, axis=-1)
  p = p.reshape(b, h_kv, h // h_kv, tq, k.shape[1])
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
  return o.reshape(b, tq, h, v.shape[-1]).astype(q.dtype)


def _cudnn_supported(q, k, mask_is_dense: bool) -> str:
  """Empty string when cuDNN applies, else the reason it does not."""
  if jax.default_backend() != "gpu":
    return f"backend is {jax.default_backend()}"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (cuDNN needs bf16/fp16)"
  if q.shape[-1] % 8 or q.shape[-1] > 128:
    return f"head_dim {q.shape[-1]}"
  if mask_is_dense:
    return "a dense mask"
  return ""


def _cudnn_packed_unsupported(causal: bool, window: int | None) -> str:
  """Empty string when cuDNN's packed layout can take these segments, else why not."""
  if not _CUDNN_PACKED:
    return "this jax has no cuDNN packed-segment API"
  if window is not None and not causal:
    return "cuDNN windows are causal only"
  return ""


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


def _segment_mask(q, k, segment_ids, causal, window):
  idx = sequence_index(q.shape[0], q.shape[1])
  return attention_mask(idx, idx, causal=causal, q_segment_ids=segment_ids,
                        k_segment_ids=segment_ids, window=window)


def _query_chunked_xla(q, k, v, segment_ids, *, causal, window, scale, chunk: int = 512):
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


def _cudnn_packed(q, k, v, segment_ids, *, causal, window, scale, max_segments):
  """cuDNN over packed rows; rows with more than max_segments runs take the block-sparse
  kernel, or with a window the query-chunked XLA form (lax.cond: exact either way, and no
  branch holds a [T, T] array)."""
  from effattn.kernels.block_sparse import api as block_sparse
  from effattn.kernels.block_sparse.common import causal_block_mask, lists_from_block_mask

  lengths, offsets, count = packed_segments(segment_ids, max_segments)
  mask_type = _cudnn.MaskType.PADDING_CAUSAL if causal else _cudnn.MaskType.PADDING
  d = q.shape[-1]
  scale = d ** -0.5 if scale is None else scale

  def fused(q, k, v):
    return _cudnn.dot_product_attention(
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
    return _query_chunked_xla(q, k, v, segment_ids, causal=causal, window=window, scale=scale)

  fallback = kernel if window is None else chunked
  return jax.lax.cond(jnp.max(count) <= max_segments, fused, fallback, q, k, v)


def softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    window: int | None = None,
    scale: float | None = None,
    impl: str = "auto",
    max_segments: int = 16,
) -> jax.Array:
  """Softmax attention over [B, T, H, D] queries and [B, S, H_kv, D] keys/values.

  Args:
    causal: mask keys after the query (by index, aligned at the start).
    mask: optional dense bool mask [B, 1, Tq, Tk] (cache validity while decoding); when given it
      must already contain causality, the window and segments, and only XLA can take it.
    segment_ids: [B, T] packed-sequence ids of a self-attention (T = S): query i sees key j only
      within its run of equal ids. cuDNN takes them in its packed layout (rows of at most
      `max_segments` runs, else the block-sparse kernel); XLA builds the dense mask.
    window: sliding-window size (keys with q - k < window).
    impl: "auto" | "cudnn" | "xla" | "reference".
    max_segments: runs per row the cuDNN packed call is built for (a static shape).
  """
  if impl not in IMPLS:
    raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"num_kv_heads={k.shape[2]} must divide num_heads={q.shape[2]}")
  if segment_ids is not None:
    if mask is not None:
      raise ValueError("give softmax_attention a dense mask or segment_ids, not both")
    if segment_ids.shape != q.shape[:2] or q.shape[1] != k.shape[1]:
      raise ValueError(f"segment_ids {segment_ids.shape} must be [B, T] = {q.shape[:2]} of a "
                       f"self-attention (keys {k.shape[:2]})")
    if max_segments < 2:
      raise ValueError(f"{max_segments=} must be >= 2")
  if impl == "reference":
    log_path_once("softmax", "reference")
    if segment_ids is not None:
      mask = _segment_mask(q, k, segment_ids, causal, window)
    if mask is None:
      b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
      mask = attention_mask(sequence_index(b, tq), sequence_index(b, tk), causal=causal,
                            window=window)
    return reference_attention(q, k, v, mask, scale=scale)
  window_arg = None if window is None else ((window - 1, 0) if causal else (window - 1, window - 1))
  if impl == "auto":
    why = _cudnn_supported(q, k, mask is not None)
    if not why and segment_ids is not None:
      why = _cudnn_packed_unsupported(causal, window)
    impl = "cudnn" if not why else "xla"
    log_path_once("softmax", impl, why)
  else:
    log_path_once("softmax", impl, "forced")
  if impl == "cudnn":
    if mask is not None:
      raise ValueError("impl='cudnn' cannot take a dense mask; pass segment_ids or use "
                       "impl='auto'")
    if segment_ids is not None:
      why = _cudnn_packed_unsupported(causal, window)
      if why:
        raise ValueError(f"impl='cudnn' cannot take these segment_ids: {why}; use impl='auto'")
      return _cudnn_packed(q, k, v, segment_ids, causal=causal, window=window, scale=scale,
                           max_segments=max_segments)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        local_window_size=window_arg, implementation="cudnn")
  if segment_ids is not None:
    mask = _segment_mask(q, k, segment_ids, causal, window)
  if mask is not None:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                      local_window_size=window_arg, implementation="xla")
