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

import jax

from effattn.kernels.paths import log_path_once
from effattn.kernels.softmax import cudnn, reference, xla

IMPLS = ("auto", "cudnn", "xla", "reference")


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
    return reference.softmax_attention(q, k, v, causal=causal, mask=mask, segment_ids=segment_ids,
                                       window=window, scale=scale)
  if impl == "auto":
    why = cudnn.unsupported(q, mask is not None)
    if not why and segment_ids is not None:
      why = cudnn.packed_unsupported(causal, window)
    impl = "cudnn" if not why else "xla"
    log_path_once("softmax", impl, why)
  else:
    log_path_once("softmax", impl, "forced")
  if impl == "cudnn":
    if mask is not None:
      raise ValueError("impl='cudnn' cannot take a dense mask; pass segment_ids or use "
                       "impl='auto'")
    if segment_ids is not None:
      why = cudnn.packed_unsupported(causal, window)
      if why:
        raise ValueError(f"impl='cudnn' cannot take these segment_ids: {why}; use impl='auto'")
    return cudnn.softmax_attention(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                                   scale=scale, max_segments=max_segments)
  return xla.softmax_attention(q, k, v, causal=causal, mask=mask, segment_ids=segment_ids,
                               window=window, scale=scale)
