"""Per-query top-w key thresholds and the tiles they keep, without a [T, S] array.

The threshold mask of common.py keeps key j for query i when (bias_j, -j) ranks at or above
the query's threshold key: each query keeps the top-w of the keys it may see, by a per-key
score (dynamic-mask attention's value gate), ties towards the lower position. The keys a query
sees are a contiguous range of token indices: [start of its segment, i] (causal) or its whole
segment, so the threshold of query i is the w-th smallest *rank* in that range, once every key
is ranked:

  rank_j   position of key j in one sort of (-bias, j) per row: unique integers, so
           "key j is kept by query i" is rank_j <= thr_rank_i, with no ties left;
  thr_rank the w-th smallest rank of [lo_i, hi_i): a range order statistic, answered for every
           query at once by a wavelet matrix over the ranks (one stable partition and prefix
           count per bit of the rank; a query descends one level per bit);
  tiles    tile (query block, key block) holds a kept key iff some query of the block has a
           visible key of the block with rank <= its threshold. Every visible key block but
           the first and last of a query's range is whole, so whole blocks need only the
           block's minimum rank, and the two partial ones a prefix / suffix minimum.

Work per (batch row, key head): O(S log S) for the ranking and the wavelet matrix, O(T log S)
for the thresholds, O(T + nQ nK) for the tiles; memory O((S + T) log S + nQ nK). The dense
form (top-k over every visible key of every query, O(T S)) is attention/dynamic_mask.py's
`select_top_w`, the oracle this is tested against.

Contract: queries and keys are the same tokens (self-attention, T = S), token indices 0..T-1,
and each segment id forms ONE contiguous run per row (packing does this). `contiguous_runs`
checks the last condition on device; callers take the dense form where it fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def contiguous_runs(segment_ids: jax.Array) -> jax.Array:
  """[B, T] ids -> scalar bool: in every row each id occupies one contiguous run."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  ordered = jnp.sort(segment_ids, axis=1)
  distinct = jnp.sum(ordered[:, 1:] != ordered[:, :-1], axis=1)
  return jnp.all(jnp.sum(change, axis=1) == distinct)


def _rows(x):
  return jnp.arange(x.shape[0])[:, None]


def rank_keys(bias: jax.Array) -> tuple[jax.Array, jax.Array]:
  """bias [R, S] float32 -> (rank [R, S], order [R, S]) int32: rank 0 is the largest bias,
  ties to the lower index (the order of jax.lax.top_k); order[r] is the key of rank r.

  -0.0 and 0.0 tie, as in the kernels' float comparison of bias and threshold."""
  r, s = bias.shape
  iota = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (r, s))
  _, order = jax.lax.sort((-bias, iota), num_keys=2)
  rank = jnp.zeros_like(order).at[_rows(order), order].set(iota, unique_indices=True)
  return rank, order


def key_ranks(bias: jax.Array) -> tuple[jax.Array, jax.Array]:
  """bias [B, H_kv, T] -> rank_keys' (rank, order), [B, H_kv, T] each, of the selection's
  scores (no gradient; -0.0 ties with 0.0)."""
  b, h_kv, t = bias.shape
  bias = jax.lax.stop_gradient(bias.astype(jnp.float32))
  bias = jnp.where(bias == 0, 0.0, bias)
  rank, order = rank_keys(bias.reshape(b * h_kv, t))
  return rank.reshape(b, h_kv, t), order.reshape(b, h_kv, t)


def _rank_bits(n: int) -> int:
  return max(1, (n - 1).bit_length())


def wavelet_levels(values: jax.Array, bits: int) -> list[tuple[jax.Array, jax.Array]]:
  """Wavelet matrix of values [R, N] in [0, 2^bits): per level (top bit first) the count of
  zero bits before each position, [R, N + 1], and the level's total of zeros [R]. Each level
  stably moves the zeros of its bit before the ones (a scatter with unique targets)."""
  levels = []
  a = values
  n = values.shape[1]
  pos = jnp.arange(n, dtype=jnp.int32)
  for level in range(bits):
    one = (a >> (bits - 1 - level)) & 1
    zeros_before = jnp.cumsum(1 - one, axis=1, dtype=jnp.int32) - (1 - one)
    total = zeros_before[:, -1] + (1 - one[:, -1])
    levels.append((jnp.concatenate([zeros_before, total[:, None]], axis=1), total))
    if level + 1 < bits:
      dest = jnp.where(one == 0, zeros_before, total[:, None] + pos - zeros_before)
      a = jnp.zeros_like(a).at[_rows(a), dest].set(a, unique_indices=True)
  return levels


def kth_smallest(levels, lo: jax.Array, hi: jax.Array, k: jax.Array) -> jax.Array:
  """The k-th (0-based) smallest value of values[r, lo:hi] for every query: lo, hi, k [R, Q]
  int32 with 0 <= k < hi - lo (other queries get an unspecified value)."""
  bits = len(levels)
  value = jnp.zeros_like(k)
  for level, (zeros_before, total) in enumerate(levels):
    zl = jnp.take_along_axis(zeros_before, lo, axis=1)
    zr = jnp.take_along_axis(zeros_before, hi, axis=1)
    in_zeros = zr - zl
    to_zeros = k < in_zeros
    lo = jnp.where(to_zeros, zl, total[:, None] + lo - zl)
    hi = jnp.where(to_zeros, zr, total[:, None] + hi - zr)
    k = jnp.where(to_zeros, k, k - in_zeros)
    value = value | (jnp.where(to_zeros, 0, 1) << (bits - 1 - level))
  return value


def visible_ranges(segment_ids, batch: int, t: int, causal: bool):
  """[lo, hi) of the keys each query sees, [B, T] each (contiguous segment runs assumed)."""
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  if segment_ids is None:
    lo = jnp.zeros_like(idx)
    return lo, idx + 1 if causal else jnp.full_like(idx, t)
  starts = jnp.concatenate([jnp.ones((batch, 1), bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  lo = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  if causal:
    return lo, idx + 1
  ends = jnp.concatenate([starts[:, 1:], jnp.ones((batch, 1), bool)], axis=1)
  return lo, jax.lax.cummin(jnp.where(ends, idx, t - 1), axis=1, reverse=True) + 1


def _segmented_min(x, reset, reverse: bool = False):
  """Running minimum of x [R, N] along axis 1 restarting where reset [R, N] is True (scanning
  right to left with reverse=True)."""
  def combine(a, b):
    (fa, va), (fb, vb) = a, b
    return fa | fb, jnp.where(fb, vb, jnp.minimum(va, vb))
  reset = jnp.broadcast_to(reset, x.shape)
  return jax.lax.associative_scan(combine, (reset, x), axis=1, reverse=reverse)[1]


def kept_tiles(rank, thr_rank, lo, hi, *, block_q: int, block_k: int) -> jax.Array:
  """[R, nQ, nK] bool: tiles holding a key of some query's range [lo, hi) with rank <= its
  threshold. rank [R, S]; thr_rank, lo, hi [R, T] (every range non-empty, contiguous runs)."""
  r, s = rank.shape
  t = thr_rank.shape[1]
  n_k = -(-s // block_k)
  n_q = -(-t // block_q)
  g = min(block_q, block_k)  # rows of g queries share their last key block (causal)
  n_rows = -(-t // g)
  big = jnp.iinfo(jnp.int32).max
  key = jnp.arange(s, dtype=jnp.int32)
  # A range's last partial block starts at its key block or its segment (a reset either way);
  # its first partial block (only when the range goes past it) ends at the block's end.
  run_start = jnp.zeros((r, s), bool).at[_rows(lo), lo].set(True)
  prefix_min = _segmented_min(rank, (key % block_k == 0) | run_start)
  suffix_min = _segmented_min(rank, key % block_k == block_k - 1, reverse=True)
  block_min = jnp.min(jnp.pad(rank, ((0, 0), (0, n_k * block_k - s)), constant_values=big)
                      .reshape(r, n_k, block_k), axis=2)
  last = hi - 1
  kd, ks = last // block_k, lo // block_k
  row = jnp.arange(t, dtype=jnp.int32) // g
  flat = lambda kb: row[None, :] * n_k + kb  # noqa: E731 -- (row, key block) -> flat index
  hit_last = jnp.take_along_axis(prefix_min, last, axis=1) <= thr_rank
  hit_first = (ks < kd) & (jnp.take_along_axis(suffix_min, lo, axis=1) <= thr_rank)
  tiles = jnp.zeros((r, n_rows * n_k), jnp.int32)
  tiles = tiles.at[_rows(kd), flat(kd)].max(hit_last.astype(jnp.int32))
  tiles = tiles.at[_rows(ks), flat(ks)].max(hit_first.astype(jnp.int32))
  # Whole blocks ks < kb < kd: per row the ranges of different segments are disjoint and one
  # segment's queries share theirs, so a marker at (row, ks + 1) holding the largest threshold
  # and the end kd, filled forward along kb, gives every whole block its test.
  inner = ks + 1 < kd
  at = jnp.where(inner, flat(ks + 1), n_rows * n_k)  # out of range: dropped
  marker_thr = jnp.full((r, n_rows * n_k), -1, jnp.int32).at[_rows(at), at].max(
      thr_rank, mode="drop").reshape(r, n_rows, n_k)
  marker_end = jnp.zeros((r, n_rows * n_k), jnp.int32).at[_rows(at), at].max(
      kd, mode="drop").reshape(r, n_rows, n_k)
  kb = jnp.arange(n_k, dtype=jnp.int32)
  source = jax.lax.cummax(jnp.where(marker_thr >= 0, kb, -1), axis=2)
  take = lambda m: jnp.take_along_axis(m, jnp.maximum(source, 0), axis=2)  # noqa: E731
  whole = (source >= 0) & (kb < take(marker_end)) & (block_min[:, None, :] <= take(marker_thr))
  tiles = (tiles.reshape(r, n_rows, n_k) > 0) | whole
  per_q = block_q // g
  tiles = jnp.pad(tiles, ((0, 0), (0, n_q * per_q - n_rows), (0, 0)))
  return jnp.any(tiles.reshape(r, n_q, per_q, n_k), axis=2)


def select_top_w_ranked(bias, *, keep_window: int, selection: str, segment_ids=None,
                        causal: bool = True, block_q: int | None = None,
                        block_k: int | None = None, ranks=None):
  """The thresholds and kept tiles of attention/dynamic_mask.select_top_w for a self-attention
  whose queries and keys are tokens 0..T-1 of contiguous segment runs.

  bias: [B, H_kv, T] float32 (no gradient); segment_ids: [B, T] or None.
  selection: "per_query" (each query's top-w among the keys it sees) | "global" (one top-w over
  all keys of the row, causality and segments applied afterwards).
  Returns thr [B, H_kv, T] (-inf where a query sees fewer than w keys and keeps them all),
  thr_pos [B, H_kv, T] int32 (the threshold key's index; unspecified where thr is -inf) and,
  with block sizes, tiles [B, H_kv, nQ, nK] bool. ranks: key_ranks(bias) where the caller has
  them already (None: ranked here).
  """
  b, h_kv, t = bias.shape
  bias = jax.lax.stop_gradient(bias.astype(jnp.float32))
  bias = jnp.where(bias == 0, 0.0, bias).reshape(b * h_kv, t)  # -0.0 ties with 0.0
  w = min(keep_window, t)
  if ranks is None:
    ranks = key_ranks(bias.reshape(b, h_kv, t))
  rank, order = (x.reshape(b * h_kv, t) for x in ranks)
  lo, hi = visible_ranges(segment_ids, b, t, causal)
  lo, hi = (jnp.repeat(x, h_kv, axis=0) for x in (lo, hi))  # rows are (b, h_kv)
  if selection == "global":
    thr_rank = jnp.full((b * h_kv, t), w - 1, jnp.int32)
    all_kept = jnp.zeros((b * h_kv, t), bool)
  elif selection == "per_query":
    all_kept = hi - lo < w
    k = jnp.where(all_kept, 0, w - 1)
    thr_rank = kth_smallest(wavelet_levels(rank, _rank_bits(t)), lo, hi, k)
    thr_rank = jnp.where(all_kept, t, thr_rank)  # rank t: above every key
  else:
    raise ValueError(f"model.attention.dynamic_mask.selection={selection!r} must be "
                     "'per_query' or 'global'")
  key = jnp.take_along_axis(order, jnp.minimum(thr_rank, t - 1), axis=1)
  thr = jnp.where(all_kept, -jnp.inf, jnp.take_along_axis(bias, key, axis=1))
  tiles = None
  if block_q is not None and block_k is not None:
    tiles = kept_tiles(rank, thr_rank, lo, hi, block_q=block_q, block_k=block_k)
    tiles = tiles.reshape(b, h_kv, *tiles.shape[1:])
  return thr.reshape(b, h_kv, t), key.reshape(b, h_kv, t), tiles
