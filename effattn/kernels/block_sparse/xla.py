"""Blocked plain-jnp path: per query block, gather only the listed key blocks.

Work and memory per query block are O(K * block_k), so the cost follows the lists like the
kernels do; gradients come from autodiff. This is the path `impl="auto"` takes on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effattn.kernels import matmul
from effattn.kernels.block_sparse.common import Aux, element_mask, masked_softmax


def _per_head(x, b: int, h: int):
  """[B', Hx, N] with Hx in {1, H_kv, H} -> [B, H, N]."""
  if x is None:
    return None
  if x.shape[1] not in (1, h):
    x = jnp.repeat(x, h // x.shape[1], axis=1)
  return jnp.broadcast_to(x, (b, h, x.shape[-1]))


def block_sparse_attention(q, k, v, kv_indices, kv_counts, aux: Aux, *, causal: bool,
                           scale: float, block_q: int, block_k: int, window: int | None = None):
  """Same contract as reference.block_sparse_attention, lengths padded to the block sizes."""
  b, t, h, d = q.shape
  s_len, h_kv = k.shape[1], k.shape[2]
  n_q, n_k, n_slots = t // block_q, s_len // block_k, kv_indices.shape[-1]
  idx = jnp.broadcast_to(kv_indices, (b, h, n_q, n_slots))
  cnt = jnp.broadcast_to(kv_counts, (b, h, n_q))
  # Key blocks per query head: [B, H, nK, bk, D] views without repeating K/V in memory twice.
  head_of = jnp.arange(h) // (h // h_kv)
  kb = k.reshape(b, n_k, block_k, h_kv, d)
  vb = v.reshape(b, n_k, block_k, h_kv, d)
  kv_pos = aux.kv_pos if aux.kv_pos is not None else jnp.arange(s_len, dtype=jnp.int32)[None, None]
  kv_vecs = {"kv_pos": _per_head(kv_pos, b, h), "kv_seg": _per_head(aux.kv_seg, b, h),
             "kv_bias": _per_head(aux.kv_bias, b, h)}
  q_pos = aux.q_pos if aux.q_pos is not None else jnp.arange(t, dtype=jnp.int32)[None, None]
  q_vecs = {"q_pos": _per_head(q_pos, b, h), "q_seg": _per_head(aux.q_seg, b, h),
            "q_thr": _per_head(aux.q_thr, b, h), "q_thr_pos": _per_head(aux.q_thr_pos, b, h)}
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(h)[None, :, None]

  def one_block(i):
    sel = idx[:, :, i]  # [B, H, K]
    kg = kb[bi, sel, :, head_of[None, :, None]]  # [B, H, K, bk, D]
    vg = vb[bi, sel, :, head_of[None, :, None]]
    kg = kg.reshape(b, h, n_slots * block_k, d)
    vg = vg.reshape(b, h, n_slots * block_k, d)
    key_index = (sel[..., None] * block_k + jnp.arange(block_k)).reshape(b, h, -1)
    kv = {n: None if x is None else x[bi, hi, key_index] for n, x in kv_vecs.items()}
    qs = jax.lax.dynamic_slice_in_dim(q, i * block_q, block_q, axis=1)  # [B, bq, H, D]
    qv = {n: None if x is None else jax.lax.dynamic_slice_in_dim(x, i * block_q, block_q, 2)
          for n, x in q_vecs.items()}
    s = jnp.einsum("bqhd,bhkd->bhqk", qs.astype(jnp.float32), kg.astype(jnp.float32),
                   precision=matmul.f32_precision()) * scale
    if kv["kv_bias"] is not None:
      s = s + kv["kv_bias"][:, :, None, :].astype(jnp.float32)
    slot_ok = (jnp.arange(n_slots) < cnt[:, :, i, None])  # [B, H, K]
    mask = jnp.repeat(slot_ok, block_k, axis=-1)[:, :, None, :]
    elem = element_mask(causal=causal, window=window, **qv, **kv)
    mask = mask if elem is None else mask & elem
    p, lse = masked_softmax(s, mask)
    o = jnp.einsum("bhqk,bhkd->bqhd", p, vg.astype(jnp.float32),
                   precision=matmul.f32_precision())
    return o.astype(q.dtype), lse

  o, lse = jax.lax.map(one_block, jnp.arange(n_q))  # [nQ, B, bq, H, D], [nQ, B, H, bq]
  o = jnp.moveaxis(o, 0, 1).reshape(b, t, h, v.shape[-1])
  lse = jnp.moveaxis(lse, 0, 2).reshape(b, h, t)
  return o, lse
