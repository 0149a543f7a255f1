"""Tile math of the landmark grouped-softmax kernels, shared by the Triton (pallas_gpu.py)
and Mosaic (pallas_tpu.py) versions: pure jnp on one query tile of M rows against one key group
tile of Lt slots, so both lowerings run the same arithmetic and differ only in how tiles reach
the kernel (a loop over full-sequence refs on GPU, the pipelined grid axis on TPU).

A key group tile holds its group's tokens in slots [0, n) (n <= Lt - 1) and the group's
landmark key in the last slot, LAND = Lt - 1 (its value slot is zero). So one score matrix
s = q k^T holds both the within-group scores and the landmark score (column LAND), one dot
ds k gives the query gradient of both, and one dot ds^T q the key gradient of both (the
landmark's in row LAND): no per-tile broadcast products or cross-warp reductions.

Each query row meets a key group in one of three roles, given per row (`land`, `own`: [M]
bool, or scalars for a whole tile): an earlier group of its segment (the landmark path: the
within-group softmax of its tokens, weighted by the landmark's outer probability), its own
group (causal over the tokens before it: row r of a tile is slot r % Lt of its group), or
neither (nothing). One exponent per score covers both roles: exp2(s - m_w) with the row's
within-group max on the landmark path, exp2(s - m) with the outer max (or lse) on its own
group, so a tile of mixed rows (a query tile of several groups) costs one pass.

Scores are in base 2 (c2 = scale * log2(e)); per-row vectors are [M].
"""

from __future__ import annotations

import jax.numpy as jnp

from effattn.kernels.block_sparse.common import MASK_VALUE, dot

_F32 = jnp.float32


def _roles(s, n_k, land, own, lt: int):
  """Masks of tile scores s [M, Lt]: (landmark-path [M, Lt], own-group causal [M, Lt],
  landmark column [1, Lt], landmark rows [M]) and the landmark scores s_l [M]."""
  rows, cols = (jnp.arange(x, dtype=jnp.int32) for x in s.shape)
  cols = cols[None, :]
  keep = cols < n_k
  land_rows = jnp.broadcast_to(land, rows.shape)
  own_rows = jnp.broadcast_to(own, rows.shape)
  at_land = cols == lt - 1
  m_land = land_rows[:, None] & keep
  m_own = own_rows[:, None] & keep & (cols <= (rows % lt)[:, None])
  return (m_land, m_own, at_land, land_rows), jnp.sum(jnp.where(at_land, s, 0.0), axis=1)


def _exp(s, masks, ref_own):
  """(e, z): exp2 of each visible score against its row's reference (the within-group max on
  the landmark path, ref_own [M] on the own group) and the within-group row sums (1 off the
  landmark path)."""
  m_land, m_own, _, land_rows = masks
  m_w = jnp.max(jnp.where(m_land, s, MASK_VALUE), axis=1)
  ref = jnp.where(land_rows, m_w, ref_own)
  e = jnp.where(m_land | m_own, jnp.exp2(s - ref[:, None]), 0.0)
  z = jnp.where(land_rows, jnp.sum(e, axis=1), 1.0)
  return e, jnp.where(z > 0.0, z, 1.0)


def init_stats(m: int, d: int):
  """(acc [M, D], m [M], l [M]) of an empty outer softmax."""
  return jnp.zeros((m, d), _F32), jnp.full((m,), MASK_VALUE, _F32), jnp.zeros((m,), _F32)


def fwd_step(q, k, v, n_k, land, own, c2, lt: int, acc, m, l):
  """Merges key group k (n_k tokens) into the online outer softmax (acc, m, l) of query tile
  q: on landmark rows its value summary o_bar under the landmark score, on own rows its causal
  tokens."""
  s = dot(q, k, trans_b=True) * c2
  masks, s_l = _roles(s, n_k, land, own, lt)
  _, m_own, _, land_rows = masks
  cand = jnp.where(land_rows, s_l, jnp.max(jnp.where(m_own, s, MASK_VALUE), axis=1))
  m_new = jnp.maximum(m, cand)
  e, z = _exp(s, masks, m_new)
  # Landmark rows: key j's outer weight is p_l * e_j / z (their sum is p_l); own rows: e_j.
  p = e * jnp.where(land_rows, jnp.exp2(s_l - m_new) / z, 1.0)[:, None]
  alpha = jnp.exp2(m - m_new)
  return (alpha[:, None] * acc + dot(p.astype(v.dtype), v), m_new,
          alpha * l + jnp.sum(p, axis=1))


def fwd_finish(acc, m, l):
  """o [M, D] float32 and lse [M] (log2 units; 0 on slots of absent groups)."""
  seen = l > 0.0  # false only in slots of absent groups
  l_safe = jnp.where(seen, l, 1.0)
  return acc / l_safe[:, None], jnp.where(seen, m + jnp.log2(l_safe), 0.0)


def grads_step(q, k, v, n_k, land, own, do, lse, delta, c2, lt: int):
  """(p, ds) [M, Lt] of query tile q against key group k: p the weight of key j in row i's
  output (0 in the landmark column), ds the score gradient (unscaled; the landmark score's in
  column LAND). dQ += ds k; dK += ds^T q (the landmark key's in row LAND); dV += p^T do.
  Invalid query slots have do = 0 (and so delta = 0): they add nothing."""
  s = dot(q, k, trans_b=True) * c2
  masks, s_l = _roles(s, n_k, land, own, lt)
  _, _, at_land, land_rows = masks
  e, z = _exp(s, masks, lse)
  p_c = jnp.exp2(s_l - lse)  # landmark rows: the outer weight of k's landmark
  p = e * jnp.where(land_rows, p_c / z, 1.0)[:, None]
  dpv = dot(do, v, trans_b=True)  # 0 in the landmark column: its value slot is zero
  # Landmark rows: delta_c = do . o_bar = sum_j w_ij (do . v_j), with w = e / z.
  delta_c = jnp.sum(e * dpv, axis=1) / z
  ds = p * (dpv - jnp.where(land_rows, delta_c, delta)[:, None])
  ds_l = p_c * (delta_c - delta)
  return p, jnp.where(land_rows[:, None] & at_land, ds_l[:, None], ds)
