"""Pieces every block-sparse path shares: the element mask, block lists and tile sizes.

The op (see api.py) visits, for each (batch, head, query block), only the key blocks named in
`kv_indices[b, h, i, :kv_counts[b, h, i]]`. Inside a visited tile an element (query i, key j) is
kept when every given condition holds:

  causal:    kv_pos[j] <= q_pos[i]
  window:    q_pos[i] - kv_pos[j] < window (a static int; a sliding window over positions, so
             it composes with given positions; one-sided: with causal=False later keys stay)
  segments:  q_seg[i] == kv_seg[j]
  threshold: (kv_bias[j], -kv_pos[j]) >= (q_thr[i], -q_thr_pos[i]) lexicographically, i.e. key j
             ranks at or above the query's threshold key in a top-w by bias with ties broken
             towards the lower position (the order `jax.lax.top_k` uses). Dynamic-mask attention
             keeps each query's top-w keys this way without a [T, S] mask.

The same `element_mask` runs on whole [T, S] arrays in reference.py and on [bq, bk] tiles in the
kernels, so every path masks identically.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from effattn.kernels.matmul import dot  # noqa: F401  (re-exported: kernels use common.dot)
from effattn.kernels.permute import stable_partition

# Finite stand-in for -inf on masked scores: keeps max/exp arithmetic NaN-free in empty rows.
MASK_VALUE = -1e30
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes; the block lists are given at this granularity.

  block_q / block_k: query / key rows per tile. Both must be powers of two (Triton) and divide
  the padded sequence lengths (api.py pads ragged lengths).
  """

  block_q: int = 64
  block_k: int = 64

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if value < 8 or value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two >= 8; try 64 or 128")


def block_size_for(length: int, block: int) -> int:
  """The tile for `length` tokens: `block`, or the smallest power of two >= length (at least 8)
  when the sequence is shorter, so short sequences are not padded to a whole large tile."""
  return min(block, max(8, 1 << max(0, (length - 1).bit_length())))


class Aux(NamedTuple):
  """Optional per-query [B', Hq, T] and per-key [B', Hk, S] vectors (None = not used).

  B' in {1, B}; Hq in {1, H_kv, H} (H_kv: shared by a query-head group); Hk in {1, H_kv}.
  Positions default to token indices. kv_bias is float32 and differentiable; the rest are
  integer masks or thresholds and get no gradient.
  """

  q_pos: jax.Array | None = None
  kv_pos: jax.Array | None = None
  q_seg: jax.Array | None = None
  kv_seg: jax.Array | None = None
  kv_bias: jax.Array | None = None
  q_thr: jax.Array | None = None
  q_thr_pos: jax.Array | None = None


def _as_rows(x):
  return x[..., :, None]


def _as_cols(x):
  return x[..., None, :]


def element_mask(*, causal: bool, q_pos, kv_pos, q_seg=None, kv_seg=None, kv_bias=None,
                 q_thr=None, q_thr_pos=None, window: int | None = None, rows=_as_rows,
                 cols=_as_cols):
  """Boolean [..., Tq, Tk] keep-mask from per-query [..., Tq] and per-key [..., Tk] vectors.

  Returns None when nothing is masked. Arguments left None impose no condition (window is
  static: None adds no operation). `rows` /
  `cols` place a per-query / per-key vector on the tile (a kernel whose registers cannot be
  indexed with None passes vectors already broadcast to the tile and identity functions).
  """
  mask = None

  def both(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if causal:
    mask = both(mask, cols(kv_pos) <= rows(q_pos))
  if window is not None:
    mask = both(mask, rows(q_pos) - cols(kv_pos) < window)
  if q_seg is not None:
    mask = both(mask, rows(q_seg) == cols(kv_seg))
  if q_thr is not None:
    b, t = cols(kv_bias), rows(q_thr)
    tie_ok = cols(kv_pos) <= rows(q_thr_pos)
    mask = both(mask, (b > t) | ((b == t) & tie_ok))
  return mask


def masked_softmax(s, mask):
  """Softmax of scores s [..., S] over the keys `mask` (broadcast to s) keeps, and its lse
  [...] (natural log): a row that keeps no key gets p = 0 and lse = -inf (the jnp paths')."""
  mask = jnp.broadcast_to(mask, s.shape)
  s = jnp.where(mask, s, MASK_VALUE)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  seen = l > 0
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)[..., 0]
  return p / jnp.where(seen, l, 1.0), lse


def lists_from_block_mask(block_mask: jax.Array):
  """Dense [B, H, nQ, nK] bool block mask -> (indices [B, H, nQ, K], counts [B, H, nQ]) int32.

  Indices of each row are ascending; slots past the count repeat the last valid index (so a
  pipelined TPU kernel does not refetch) or hold 0 in an empty row. K is nK rounded up to a
  power of two (Triton); the kernels loop over `counts` only, so work follows the kept blocks.

  The order is permute.stable_partition's (a stable argsort of ~mask without a sort kernel):
  this runs in every forward and, through transpose_lists, every backward.
  """
  block_mask = jnp.asarray(block_mask, bool)
  k = block_mask.shape[-1]
  order, _, counts = stable_partition(block_mask, axis=-1)
  slot = jnp.arange(k, dtype=jnp.int32)
  last = jnp.take_along_axis(order, jnp.clip(counts - 1, 0, k - 1)[..., None], axis=-1)
  indices = jnp.where(slot < counts[..., None], order, jnp.where(counts[..., None] > 0, last, 0))
  return pad_lists(indices, counts)


def pad_lists(indices: jax.Array, counts: jax.Array):
  """Pads the slot axis of `indices` to a power of two, repeating the last slot."""
  k = indices.shape[-1]
  k_pad = 1 << max(0, (k - 1).bit_length())
  if k_pad != k:
    indices = jnp.concatenate(
        [indices, jnp.repeat(indices[..., -1:], k_pad - k, axis=-1)], axis=-1)
  return indices.astype(jnp.int32), counts.astype(jnp.int32)


def block_mask_from_lists(indices: jax.Array, counts: jax.Array, num_k_blocks: int) -> jax.Array:
  """(indices [B, H, nQ, K], counts [B, H, nQ]) -> dense bool [B, H, nQ, nK] (a scatter)."""
  valid = jnp.arange(indices.shape[-1]) < counts[..., None]
  target = jnp.where(valid, indices, num_k_blocks)  # out of range: dropped by the scatter
  rows = jnp.indices(indices.shape, sparse=True)[:-1]
  mask = jnp.zeros(indices.shape[:-1] + (num_k_blocks,), bool)
  return mask.at[(*rows, target)].set(True, mode="drop")


def transpose_lists(indices: jax.Array, counts: jax.Array, num_k_blocks: int):
  """Query-block lists per key block, for the backward dK/dV pass: [B, H, nK, Q], [B, H, nK].

  One bool scatter back to the dense mask, then the sort-free compaction of its columns.
  """
  dense = block_mask_from_lists(indices, counts, num_k_blocks)
  return lists_from_block_mask(jnp.swapaxes(dense, -1, -2))


def causal_block_mask(num_q_blocks: int, num_k_blocks: int, block_q: int, block_k: int,
                      window: int | None = None) -> jax.Array:
  """[nQ, nK] bool: key blocks holding any key j <= i (and i - j < window) for the query block."""
  q_lo = jnp.arange(num_q_blocks)[:, None] * block_q
  q_hi = q_lo + block_q - 1
  k_lo = jnp.arange(num_k_blocks)[None, :] * block_k
  k_hi = k_lo + block_k - 1
  mask = k_lo <= q_hi
  if window is not None:
    mask &= q_lo - k_hi < window
  return mask


def tile_scores(q, k, *, scale: float, causal: bool, q_pos, kv_pos, q_seg=None, kv_seg=None,
                kv_bias=None, q_thr=None, q_thr_pos=None, window: int | None = None):
  """Masked scores of one tile in log2 units: q [bq, D], k [bk, D] -> ([bq, bk], mask or None).

  Kernels work in base 2 (exp2 is the native instruction); lse is converted back at the edges.
  """
  s = dot(q, k, trans_b=True) * (scale * LOG2E)
  if kv_bias is not None:
    s = s + kv_bias[None, :] * LOG2E
  mask = element_mask(causal=causal, q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg, kv_seg=kv_seg,
                      kv_bias=kv_bias, q_thr=q_thr, q_thr_pos=q_thr_pos, window=window)
  if mask is not None:
    s = jnp.where(mask, s, MASK_VALUE)
  return s, mask
