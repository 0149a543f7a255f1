"""Tile math of the landmark grouped-softmax kernels, shared by the Triton (pallas_gpu.py)
and Mosaic (pallas_tpu.py) versions: pure jnp on one query group tile and one key group
tile of Lt slots, so both lowerings run the same arithmetic and differ only in how tiles reach
the kernel (a loop over full-sequence refs on GPU, the pipelined grid axis on TPU).

Scores are in base 2 (c2 = scale * log2(e)); per-row vectors are [Lt]; a landmark key is [1, D].
"""

from __future__ import annotations

import jax.numpy as jnp

from effattn.kernels.block_sparse.common import MASK_VALUE, dot

_F32 = jnp.float32


def within(q, k, n_k, c2, lt: int):
  """Unnormalized within-group softmax of a query tile over key group k (n_k valid slots).

  Returns p [Lt, Lt] float32 (0 on invalid keys) and its row sums z [Lt] (>= 1 when n_k > 0).
  """
  s = dot(q, k, trans_b=True) * c2
  keep = (jnp.arange(lt, dtype=jnp.int32) < n_k)[None, :]
  s = jnp.where(keep, s, MASK_VALUE)
  m = jnp.max(s, axis=1)
  p = jnp.where(keep, jnp.exp2(s - m[:, None]), 0.0)
  z = jnp.sum(p, axis=1)
  return p, jnp.where(z > 0.0, z, 1.0)


def land_scores(q, kl, c2):
  """q [Lt, D] . kL [1, D] per row, in log2 units (a broadcast product: a [Lt, 1] dot is
  below Triton's minimum dot size)."""
  return jnp.sum(q.astype(_F32) * kl.astype(_F32), axis=1) * c2


def own_mask(n, lt: int):
  """Causal mask of a group over itself (n valid slots)."""
  r = jnp.arange(lt, dtype=jnp.int32)
  return (r[None, :] <= r[:, None]) & (r[None, :] < n)


def init_stats(lt: int, d: int):
  """(acc [Lt, D], m [Lt], l [Lt]) of an empty outer softmax."""
  return jnp.zeros((lt, d), _F32), jnp.full((lt,), MASK_VALUE, _F32), jnp.zeros((lt,), _F32)


def fwd_landmark(q, k, v, kl, n_k, c2, lt: int, acc, m, l):
  """Merges earlier group k (its value summary o_bar under landmark score q . kl) into the
  online outer softmax (acc, m, l)."""
  p, z = within(q, k, n_k, c2, lt)
  o_bar = dot(p.astype(v.dtype), v) / z[:, None]
  s_l = land_scores(q, kl, c2)
  m_new = jnp.maximum(m, s_l)
  alpha, p_l = jnp.exp2(m - m_new), jnp.exp2(s_l - m_new)
  return alpha[:, None] * acc + p_l[:, None] * o_bar, m_new, alpha * l + p_l


def fwd_own(q, k, v, n, c2, lt: int, acc, m, l):
  """Merges the query group's own tokens (causal, n valid slots) into (acc, m, l)."""
  mask = own_mask(n, lt)
  s = jnp.where(mask, dot(q, k, trans_b=True) * c2, MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  alpha = jnp.exp2(m - m_new)
  p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
  return (alpha[:, None] * acc + dot(p.astype(v.dtype), v), m_new,
          alpha * l + jnp.sum(p, axis=1))


def fwd_finish(acc, m, l):
  """o [Lt, D] float32 and lse [Lt] (log2 units; 0 on slots of absent groups)."""
  seen = l > 0.0  # false only in slots of absent groups
  l_safe = jnp.where(seen, l, 1.0)
  return acc / l_safe[:, None], jnp.where(seen, m + jnp.log2(l_safe), 0.0)


def _landmark_grads(q, k, v, kl, n_k, do, lse, delta, c2, lt: int):
  """Shared part of dQ and dK/dV/dkL for query group q over earlier key group k: w (within
  weights), p_c (outer weight of k's landmark), ds [Lt, Lt] (score gradient, unscaled) and
  ds_l [Lt] (landmark score gradient)."""
  p, z = within(q, k, n_k, c2, lt)
  w = p / z[:, None]
  dpv = dot(do, v, trans_b=True)
  # delta_c = do . o_bar = sum_j w_ij (do . v_j): no o_bar = w @ v needed.
  delta_c = jnp.sum(w * dpv, axis=1)
  p_c = jnp.exp2(land_scores(q, kl, c2) - lse)
  pw = p_c[:, None] * w  # weight of key j in query i's output
  return pw, pw * (dpv - delta_c[:, None]), p_c * (delta_c - delta)


def dq_landmark(q, k, v, kl, n_k, do, lse, delta, c2, lt: int):
  """dQ contribution (before the final * scale) of earlier group k."""
  _, ds, ds_l = _landmark_grads(q, k, v, kl, n_k, do, lse, delta, c2, lt)
  return dot(ds.astype(k.dtype), k) + ds_l[:, None] * kl.astype(_F32)


def _own_probs(q, k, n, lse, c2, lt: int):
  mask = own_mask(n, lt)
  return jnp.where(mask, jnp.exp2(dot(q, k, trans_b=True) * c2 - lse[:, None]), 0.0)


def dq_own(q, k, v, n, do, lse, delta, c2, lt: int):
  """dQ contribution (before * scale) of the query group's own tokens."""
  p = _own_probs(q, k, n, lse, c2, lt)
  ds = p * (dot(do, v, trans_b=True) - delta[:, None])
  return dot(ds.astype(k.dtype), k)


def dkv_own(q, k, v, n, do, lse, delta, c2, lt: int):
  """(dk before * scale, dv) of a group from its own queries: plain causal flash backward.
  Invalid query slots have do = 0 (and so delta = 0): they add nothing."""
  p = _own_probs(q, k, n, lse, c2, lt)
  dv = dot(p.astype(do.dtype), do, trans_a=True)
  ds = p * (dot(do, v, trans_b=True) - delta[:, None])
  return dot(ds.astype(q.dtype), q, trans_a=True), dv


def dkv_landmark(q, k, v, kl, n_k, do, lse, delta, c2, lt: int):
  """(dk, dv, dkl [1, D]) contributions (dk, dkl before * scale) of a later query group q to
  key group k and its landmark kl."""
  pw, ds, ds_l = _landmark_grads(q, k, v, kl, n_k, do, lse, delta, c2, lt)
  return (dot(ds.astype(q.dtype), q, trans_a=True), dot(pw.astype(do.dtype), do, trans_a=True),
          jnp.sum(ds_l[:, None] * q.astype(_F32), axis=0, keepdims=True))
