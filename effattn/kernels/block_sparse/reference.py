"""Dense attention with the element mask equivalent to the block lists: the oracle.

Plain jnp, O(T * S) memory. Shapes follow api.py after normalization:
  q [B, T, H, D], k / v [B, S, H_kv, D]; kv_indices [B', H', nQ, K], kv_counts [B', H', nQ]
  (B' in {1, B}, H' in {1, H}); `aux` holds the optional per-query [B', Hq, T] and per-key
  [B', Hk, S] vectors (Hq in {1, H_kv, H}, Hk in {1, H_kv}).
Returns o [B, T, H, D] in q's dtype and lse [B, H, T] float32 (natural log; -inf for a query
that sees no key, whose output is 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effattn.kernels.block_sparse.common import (block_mask_from_lists, element_mask,
                                                  masked_softmax)


def per_query_head(x, num_heads: int):
  """[B', Hx, N] with Hx in {1, H_kv, H} -> [B', 1 or H, N] indexed by query head."""
  if x is None or x.shape[1] in (1, num_heads):
    return x
  return jnp.repeat(x, num_heads // x.shape[1], axis=1)


def dense_mask(kv_indices, kv_counts, aux, *, causal: bool, num_heads: int, q_len: int,
               kv_len: int, block_q: int, block_k: int, window: int | None = None):
  """Bool [B', H', T, S] keep-mask: visited blocks AND the element conditions."""
  n_k = -(-kv_len // block_k)
  blocks = block_mask_from_lists(kv_indices, kv_counts, n_k)
  mask = jnp.repeat(jnp.repeat(blocks, block_q, axis=2), block_k, axis=3)[:, :, :q_len, :kv_len]
  q = {name: per_query_head(getattr(aux, name), num_heads)
       for name in ("q_pos", "q_seg", "q_thr", "q_thr_pos")}
  kv = {name: per_query_head(getattr(aux, name), num_heads)
        for name in ("kv_pos", "kv_seg", "kv_bias")}
  q_pos = q["q_pos"] if q["q_pos"] is not None else jnp.arange(q_len)[None, None]
  kv_pos = kv["kv_pos"] if kv["kv_pos"] is not None else jnp.arange(kv_len)[None, None]
  elem = element_mask(causal=causal, q_pos=q_pos, kv_pos=kv_pos, q_seg=q["q_seg"],
                      kv_seg=kv["kv_seg"], kv_bias=kv["kv_bias"], q_thr=q["q_thr"],
                      q_thr_pos=q["q_thr_pos"], window=window)
  return mask if elem is None else mask & elem


def block_sparse_attention(q, k, v, kv_indices, kv_counts, aux, *, causal: bool, scale: float,
                           block_q: int, block_k: int, window: int | None = None):
  """Dense masked softmax attention; see the module docstring for shapes."""
  b, t, h, d = q.shape
  s_len, h_kv = k.shape[1], k.shape[2]
  mask = dense_mask(kv_indices, kv_counts, aux, causal=causal, num_heads=h, q_len=t,
                    kv_len=s_len, block_q=block_q, block_k=block_k, window=window)
  qg = q.reshape(b, t, h_kv, h // h_kv, d).astype(jnp.float32)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST).reshape(b, h, t, s_len) * scale
  bias = per_query_head(aux.kv_bias, h)
  if bias is not None:
    s = s + bias[:, :, None, :].astype(jnp.float32)
  p, lse = masked_softmax(s, mask)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p.reshape(b, h_kv, h // h_kv, t, s_len),
                 v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return o.reshape(b, t, h, v.shape[-1]).astype(q.dtype), lse
