"""Keys sorted by score inside chunks, so a top-w selection visits few tiles.

A top-w selection by a per-key score (dynamic-mask attention's value gate, top_w.py) keeps
each query's w best keys of its prefix. Those keys are spread over the whole prefix, so in
token order almost every key tile holds one (at T = 16k and w = 2,048, 8 kept keys per 64-key
tile on average) and the block-sparse kernel does the dense causal work. But every key of a
chunk that lies wholly before a query tile is visible to all of its queries: inside such a
chunk the keys may be put in any order without touching causality. Sorted by rank (the order
of (-score, position) of top_w.rank_keys), the kept keys of every query of the tile are a
prefix of each past chunk, and the tile visits ceil(prefix / block_k) key tiles there instead
of all of them.

Layout, per (batch row, key head): K' = [chunk-sorted keys ; keys in token order], 2 S keys.
A query tile lists
  - in the sorted half: for each chunk ending at or before the tile's first query, the first
    ceil(n / block_k) tiles, n = the keys of the chunk whose rank is within the loosest
    threshold of the tile's queries (skipped when the chunk ends before the segment of every
    query of the tile begins);
  - in the token-order half: the kept tiles of the selection (top_w.py's tile mask) from the
    first key of the tile's own chunk on (the chunk holding the causal diagonal).
Each key is in exactly one of the two places for a given query tile, and the kernel's element
mask (causality on the true positions `kv_positions`, segments, the threshold on (bias,
-position)) is the one of the token-order layout: the result is the same attention. Per
query tile the work is about w / block_k + (past chunks) + (own chunk's tiles) / 2 tiles
instead of (tiles before the diagonal). Gradients reach k, v and the bias through the gathers
and the op's own backward; `order` is a permutation, so the gathers are permute.permute and
their transposes gathers by the inverse order (autodiff's would be scatter-adds, atomics on
the GPU).

Causal self-attention only (queries and keys the tokens 0..T-1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from effattn.kernels.block_sparse import top_w
from effattn.kernels.block_sparse.common import lists_from_block_mask
from effattn.kernels.permute import inverse_permutation, permute

_FAR = 1 << 30  # the position of a padding key: after every query, so causality drops it


class Layout(NamedTuple):
  """Keys and lists for block_sparse_attention: the chunk-sorted layout (shapes below) or the
  token-order one (k, v, bias and segments as they are)."""
  k: jax.Array  # [B, 2 S, H_kv, D]
  v: jax.Array  # [B, 2 S, H_kv, D]
  kv_positions: jax.Array | None  # [B, H_kv, 2 S] true token positions (None: token order)
  kv_bias: jax.Array  # [B, H_kv, 2 S] float32
  kv_segment_ids: jax.Array | None  # [B, H_kv, 2 S], [B, T] in token order, or None
  kv_indices: jax.Array  # [B, H, nQ, K]
  kv_counts: jax.Array  # [B, H, nQ]
  visited: jax.Array  # scalar: visited tiles / (nQ * nK), as the token-order mask reports


def chunk_tiles(num_k_blocks: int, sort_chunk: int, block: int) -> int:
  """Key tiles per chunk: the largest power of two <= sort_chunk / block dividing nK."""
  m = max(1, sort_chunk // block)
  m = 1 << (m.bit_length() - 1)
  while num_k_blocks % m:
    m //= 2
  return m


def _take_keys(x, order, inverse):
  """x [B, S, H_kv, ...] gathered per (row, key head) by the permutation order [B, H_kv, S]
  (inverse: its inverse); the gradient is a gather by inverse, no scatter-add."""
  return permute(x, jnp.swapaxes(order, 1, 2), jnp.swapaxes(inverse, 1, 2), axis=1)


def _query_head_lists(mask, num_heads: int):
  """Per key head tile mask [B, H_kv, nQ, N] -> the op's lists per query head."""
  return lists_from_block_mask(jnp.repeat(mask, num_heads // mask.shape[1], axis=1))


def token_layout(k, v, bias, tiles, *, num_heads: int, segment_ids=None) -> Layout:
  """The keys in token order: the selection's kept tiles are the lists."""
  return Layout(k, v, None, bias, segment_ids, *_query_head_lists(tiles, num_heads),
                jnp.mean(tiles.astype(jnp.float32)))


def sorted_chunk_layout(k, v, bias, rank, thr, thr_pos, tiles, *, num_heads: int, block: int,
                        sort_chunk: int, segment_ids=None, ranges_exact: bool | jax.Array = True
                        ) -> Layout:
  """The chunk-sorted layout for a causal top-w selection.

  k, v: [B, T, H_kv, D]; bias: [B, H_kv, T] float32 (gets gradients); rank: [B, H_kv, T] of
  top_w.key_ranks(bias); thr / thr_pos [B, H_kv, T] and tiles [B, H_kv, nQ, nK] bool: a
  selection's outputs (top_w.py, or the dense oracle) with block_q = block_k = block;
  segment_ids: [B, T] or None; ranges_exact: whether each segment id is one contiguous run
  (then a chunk before the segments of a whole query tile is skipped; otherwise every past
  chunk is a candidate, which is still exact).
  """
  b, t, h_kv, _ = k.shape
  n_k = tiles.shape[-1]
  n_q = tiles.shape[-2]
  s = n_k * block  # keys padded to whole tiles
  m = chunk_tiles(n_k, sort_chunk, block)
  chunk = m * block
  n_c = n_k // m

  # A query's loosest kept rank: the rank of its threshold key, or t where it keeps everything.
  thr_rank = jnp.where(thr == -jnp.inf, t, jnp.take_along_axis(rank, thr_pos, axis=-1))

  pad = s - t
  rank_p = jnp.pad(rank, ((0, 0), (0, 0), (0, pad)), constant_values=t + 1)  # never kept
  # Inside each chunk, the keys in rank order.
  within = jnp.argsort(rank_p.reshape(b, h_kv, n_c, chunk), axis=-1).astype(jnp.int32)
  order = (within + (jnp.arange(n_c, dtype=jnp.int32) * chunk)[:, None]).reshape(b, h_kv, s)
  inverse = inverse_permutation(order, axis=-1)  # order is a bijection on 0..S-1
  sorted_rank = jnp.take_along_axis(rank_p, order, axis=-1).reshape(b, h_kv, n_c, chunk)

  # Per query tile: the loosest threshold, and the first key any of its queries may see.
  q_pad = n_q * block - t
  thr_rank_p = jnp.pad(thr_rank, ((0, 0), (0, 0), (0, q_pad)), constant_values=-1)
  tile_rank = jnp.max(thr_rank_p.reshape(b, h_kv, n_q, block), axis=-1)  # [B, H_kv, nQ]
  if segment_ids is None:
    tile_lo = jnp.zeros((b, n_q), jnp.int32)
  else:
    lo, _ = top_w.visible_ranges(segment_ids, b, t, causal=True)
    lo = jnp.pad(lo, ((0, 0), (0, q_pad)), constant_values=t)
    tile_lo = jnp.where(ranges_exact, jnp.min(lo.reshape(b, n_q, block), axis=-1), 0)

  # n[b, h, qt, c]: keys of chunk c within the tile's loosest rank (a prefix of the sorted chunk).
  count = jax.vmap(jax.vmap(jax.vmap(  # over b, h, c
      lambda row, r: jnp.searchsorted(row, r, side="right"), in_axes=(0, None)),
      in_axes=(0, 0)), in_axes=(0, 0))(sorted_rank, tile_rank)  # [B, H_kv, nC, nQ]
  count = jnp.swapaxes(count, -1, -2)  # [B, H_kv, nQ, nC]
  q_start = jnp.arange(n_q, dtype=jnp.int32) * block
  c_end = (jnp.arange(n_c, dtype=jnp.int32) + 1) * chunk
  past = c_end[None, :] <= q_start[:, None]  # [nQ, nC]: the chunk is wholly before the tile
  past = past[None, None] & (c_end[None, None, None, :] > tile_lo[:, None, :, None])
  need = jnp.where(past, -(-count // block), 0)  # [B, H_kv, nQ, nC] tiles of the chunk
  sorted_mask = (jnp.arange(m)[None, None, None, None, :] < need[..., None]).reshape(
      b, h_kv, n_q, n_k)
  own_start = (q_start // chunk) * chunk // block  # first key tile of the tile's own chunk
  token_mask = tiles & (jnp.arange(n_k)[None, :] >= own_start[:, None])[None, None]
  mask = jnp.concatenate([sorted_mask, token_mask], axis=-1)  # [B, H_kv, nQ, 2 nK]
  kv_indices, kv_counts = _query_head_lists(mask, num_heads)

  def both(x, pad_value):
    """[B, T, H_kv, ...] -> [B, 2 S, H_kv, ...]: sorted chunks, then token order."""
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=pad_value)
    return jnp.concatenate([_take_keys(x, order, inverse), x], axis=1)

  def both_vec(x, pad_value):
    """[B, H_kv, T] -> [B, H_kv, 2 S]."""
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad)), constant_values=pad_value)
    return jnp.concatenate([permute(x, order, inverse, axis=-1), x], axis=-1)

  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, h_kv, t))
  kv_positions = both_vec(positions, _FAR)
  kv_seg = None
  if segment_ids is not None:
    kv_seg = both_vec(jnp.broadcast_to(segment_ids[:, None, :].astype(jnp.int32),
                                       (b, h_kv, t)), -1)
  visited = jnp.mean(jnp.sum(mask, axis=-1) / n_k)
  return Layout(both(k, 0), both(v, 0), kv_positions, both_vec(bias.astype(jnp.float32), 0.0),
                kv_seg, kv_indices, kv_counts, visited)
