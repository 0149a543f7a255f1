"""Dense path: every head over every token with the platform's attention, then gated.

This is what the official MoH code does (compute all heads, mask by the gates): it saves no
attention FLOPs, but it runs on cuDNN on GPU and XLA elsewhere, so it is the fallback where the
Pallas kernels do not apply (CPU, odd head dims) and the baseline the kernels must beat.
"""

from __future__ import annotations

import jax.numpy as jnp

from effattn.kernels.softmax import softmax_attention


def head_routed_attention(q, k, v, gates, *, causal: bool, segment_ids=None, scale: float,
                          attention_impl: str = "auto"):
  """Same contract as reference.head_routed_attention (`attention_impl` goes to
  softmax_attention); returns (o, softmax's runtime-fallback fraction or None)."""
  o, frac = softmax_attention(q, k, v, causal=causal, segment_ids=segment_ids, scale=scale,
                              impl=attention_impl, return_fallback_frac=True)
  g = gates[..., None]
  return jnp.where(g != 0, g.astype(o.dtype) * o, 0).astype(q.dtype), frac
