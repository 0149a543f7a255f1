"""Softmax attention as a function, with the path chosen per backend.

    o = softmax_attention(q, k, v, causal=True, segment_ids=seg, window=None, impl="auto")

Paths (FAMILY, in the order "auto" tries them; the rules are kernels/dispatch.py's):
  "cudnn"      cuDNN fused attention (GPU; bf16/fp16, head_dim a multiple of 8 up to 128, no
               dense mask). Packed sequences (segment ids) reach it through its packed layout
               (segment offsets and lengths) when every row holds at most `max_segments`
               segments; otherwise the batch takes the block-sparse kernel with the segment
               ids (query-chunked XLA with a window), see cudnn.py;
  "xla"        jax.nn.dot_product_attention(implementation="xla"); a dense mask where one is
               given (cache validity while decoding) or segments need it;
  "reference"  the plain einsum oracle (reference.py).
The path taken is logged once per distinct choice.
"""

from __future__ import annotations

import jax
import numpy as np

from effattn.kernels import context_parallel, dispatch, paths
from effattn.kernels.block_sparse import api as block_sparse
from effattn.kernels.block_sparse import context_parallel as ring
from effattn.kernels.softmax import cudnn, reference, xla

FAMILY = dispatch.Family("softmax", (
    dispatch.Path("cudnn", platform="gpu", limits=cudnn.LIMITS),
    dispatch.Path("xla"),
    dispatch.Path("reference"),
))


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
    return_fallback_frac: bool = False,
):
  """Softmax attention over [B, T, H, D] queries and [B, S, H_kv, D] keys/values.

  Args:
    causal: mask keys after the query (by index, aligned at the start).
    mask: optional dense bool mask [B, 1, Tq, Tk] (cache validity while decoding); when given it
      must already contain causality, the window and segments, and only XLA can take it.
    segment_ids: [B, T] packed-sequence ids of a self-attention (T = S): query i sees key j only
      within its run of equal ids. cuDNN takes them in its packed layout (rows of at most
      `max_segments` runs, else the block-sparse kernel); XLA builds the dense mask.
    window: sliding-window size (keys with q - k < window).
    impl: "auto" | a path of FAMILY (kernels/dispatch.py has the rules).
    max_segments: runs per row the cuDNN packed call is built for (a static shape).
    return_fallback_frac: also return the fraction of batch rows that took a runtime fallback
      (the packed cuDNN path's lax.cond), or None when the chosen path has none.

  Returns:
    o [B, T, H, D] in q's dtype; with return_fallback_frac, (o, fraction or None).
  """
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
  n = context_parallel.sequence_size()
  if n > 1:  # T split over mesh.sequence: ring attention over block-sparse steps
    if mask is not None or window is not None:
      what = "a dense mask" if mask is not None else f"{window=}"
      raise ValueError(f"softmax_attention context-parallel (mesh.sequence={n}): {what} has no "
                       "ring path; set mesh.sequence=1")
    step_impl = dispatch.op_impl(impl, "block_sparse")
    paths.log_path_once("softmax", "ring", f"mesh.sequence={n}, block_sparse {step_impl} per "
                        "ring step")
    o = ring.softmax_ring(block_sparse.block_sparse_attention, q, k, v, segment_ids,
                          causal=causal, scale=scale, impl=step_impl)
    return (o, None) if return_fallback_frac else o
  path, _ = FAMILY.choose(impl, dtype=np.dtype(q.dtype), head_dim=q.shape[-1],
                          dense_mask=mask is not None, segments=segment_ids is not None,
                          causal=causal, window=window)
  frac = None
  if path == "reference":
    o = reference.softmax_attention(q, k, v, causal=causal, mask=mask, segment_ids=segment_ids,
                                    window=window, scale=scale)
  elif path == "cudnn":
    o, frac = cudnn.softmax_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                      window=window, scale=scale, max_segments=max_segments)
  else:
    o = xla.softmax_attention(q, k, v, causal=causal, mask=mask, segment_ids=segment_ids,
                              window=window, scale=scale)
  return (o, frac) if return_fallback_frac else o
