"""Softmax attention as a function, with the path chosen per backend.

`impl="auto"` uses cuDNN fused attention through `jax.nn.dot_product_attention` on GPU when the
dtype, head dim and mask allow, and XLA otherwise; "reference" is the plain einsum oracle.
The path taken is logged once per distinct choice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from effattn.attention.base import attention_mask, sequence_index

_LOGGED: set[tuple] = set()
IMPLS = ("auto", "cudnn", "xla", "reference")


def log_path_once(op: str, path: str, why: str = "") -> None:
  key = (op, path, why)
  if key not in _LOGGED:
    _LOGGED.add(key)
    logging.info("effattn %s: using %s path%s", op, path, f" ({why})" if why else "")


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
    return "packed segments need a dense mask"
  return ""


def softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    mask: jax.Array | None = None,
    window: int | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> jax.Array:
  """Softmax attention over [B, T, H, D] queries and [B, S, H_kv, D] keys/values.

  Args:
    causal: mask keys after the query (by index, aligned at the start).
    mask: optional dense bool mask [B, 1, Tq, Tk] (segments, cache validity); when given it must
      already contain causality and the window, and the cuDNN path is skipped.
    window: sliding-window size (keys with q - k < window), used when `mask` is None.
    impl: "auto" | "cudnn" | "xla" | "reference".
  """
  if impl not in IMPLS:
    raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"num_kv_heads={k.shape[2]} must divide num_heads={q.shape[2]}")
  if impl == "reference":
    log_path_once("softmax", "reference")
    if mask is None:
      b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
      mask = attention_mask(sequence_index(b, tq), sequence_index(b, tk), causal=causal,
                            window=window)
    return reference_attention(q, k, v, mask, scale=scale)
  window_arg = None if window is None else ((window - 1, 0) if causal else (window - 1, window - 1))
  if impl == "auto":
    why = _cudnn_supported(q, k, mask is not None)
    impl = "cudnn" if not why else "xla"
    log_path_once("softmax", impl, why)
  else:
    log_path_once("softmax", impl, "forced")
  if impl == "cudnn":
    if mask is not None:
      raise ValueError("impl='cudnn' cannot take a dense mask (packed segments); use impl='auto'")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        local_window_size=window_arg, implementation="cudnn")
  if mask is not None:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                      local_window_size=window_arg, implementation="xla")
