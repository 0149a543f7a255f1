"""The ranked top-w selection (kernels/block_sparse/top_w.py) equals the dense oracle
(attention/dynamic_mask.select_top_w) exactly: thresholds, threshold keys and kept tiles, on
biases with many ties, ragged lengths, segments and padding, both selections, causal or not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.attention import base
from effattn.attention.dynamic_mask import select_top_w
from effattn.kernels.block_sparse import top_w


def _bias(shape, seed):
  """Row 0 takes four values only (most keys tie with many others), row 1 distinct values."""
  rng = np.random.default_rng(seed)
  tied = rng.choice([-1.0, 0.0, 0.5, 2.0], shape[1:])
  return jnp.asarray(np.stack([tied, rng.normal(size=shape[1:])]), jnp.float32)


def _segments(kind, b, t):
  if kind is None:
    return None
  seg = np.ones((b, t), np.int32)
  if kind == "packed":
    seg[0, t // 3:] = 2
    seg[-1, t // 5:] = 2
    seg[-1, (2 * t) // 3:] = 3
  elif kind == "padded":  # a document, then padding (segment 0) at the end of each row
    seg[0, (3 * t) // 4:] = 0
    seg[-1, t // 2:] = 0
  return jnp.asarray(seg)


def _compare(t, w, selection, causal, seg_kind, block_q, block_k, seed):
  b, h = 2, 2
  bias = _bias((b, h, t), seed)
  seg = _segments(seg_kind, b, t)
  idx = base.sequence_index(b, t)
  dense = jax.jit(lambda bias, seg: select_top_w(
      bias, keep_window=w, selection=selection, q_index=idx, kv_index=idx, q_seg=seg,
      kv_seg=seg, causal=causal, block_q=block_q, block_k=block_k))
  ranked = jax.jit(lambda bias, seg: top_w.select_top_w_ranked(
      bias, keep_window=w, selection=selection, segment_ids=seg, causal=causal,
      block_q=block_q, block_k=block_k))
  (thr_d, pos_d, tiles_d), (thr_r, pos_r, tiles_r) = dense(bias, seg), ranked(bias, seg)
  np.testing.assert_array_equal(np.asarray(thr_r), np.asarray(thr_d), err_msg="thresholds")
  finite = np.isfinite(np.asarray(thr_d))  # -inf: the query keeps all it sees, no threshold key
  np.testing.assert_array_equal(np.asarray(pos_r)[finite], np.asarray(pos_d)[finite],
                                err_msg="threshold keys")
  np.testing.assert_array_equal(np.asarray(tiles_r), np.asarray(tiles_d), err_msg="tiles")
  return finite


CASES = [
    # T, w, selection, causal, segments, block_q, block_k
    (64, 9, "per_query", True, None, 8, 8),          # multiple of the block
    (37, 4, "per_query", True, "packed", 8, 8),      # ragged, three documents in a row
    (37, 70, "per_query", True, "padded", 16, 8),    # w > T: everything kept
    (5, 4, "per_query", True, None, 8, 8),           # shorter than a block
    (45, 6, "per_query", False, "packed", 8, 16),    # bidirectional: one set per segment
    (40, 1, "per_query", True, "padded", 8, 8),      # w = 1
    (37, 9, "global", True, "packed", 8, 8),         # one ranking, causality afterwards
    (5, 9, "global", False, None, 8, 8),
]


@pytest.mark.parametrize("t,w,selection,causal,seg,block_q,block_k", CASES)
def test_ranked_equals_dense(t, w, selection, causal, seg, block_q, block_k):
  finite = _compare(t, w, selection, causal, seg, block_q, block_k, seed=t + w)
  if selection == "per_query" and w < t:
    assert finite.any()  # some query has a real threshold to compare


def test_minus_zero_ties_with_zero():
  """-0.0 and 0.0 are one value (the kernels compare with ==): the ranking breaks their tie by
  position, so every query keeps exactly w keys."""
  t, w = 12, 3
  bias = jnp.asarray(np.where(np.arange(t) % 2, -0.0, 0.0)[None, None], jnp.float32)
  thr, pos, _ = top_w.select_top_w_ranked(bias, keep_window=w, selection="per_query")
  np.testing.assert_array_equal(np.asarray(pos[0, 0, w - 1:]), np.full(t - w + 1, w - 1))


def test_contiguous_runs():
  assert bool(top_w.contiguous_runs(jnp.array([[1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3]])))
  assert not bool(top_w.contiguous_runs(jnp.array([[1, 1, 2, 2, 1, 1]])))


def test_no_quadratic_array():
  """Every intermediate of the ranked selection is far below T * S elements."""
  t = 512
  jaxpr = jax.make_jaxpr(lambda bias, seg: top_w.select_top_w_ranked(
      bias, keep_window=64, selection="per_query", segment_ids=seg, block_q=32, block_k=32))(
          jnp.zeros((1, 1, t)), jnp.ones((1, t), jnp.int32))

  def sizes(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        yield int(np.prod(var.aval.shape))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        yield from sizes(sub)
  assert max(sizes(jaxpr.jaxpr)) <= 16 * t  # O(T log T); the dense form holds T * S


def test_kth_smallest_matches_sorting():
  rng = np.random.default_rng(0)
  values = jnp.asarray(np.stack([rng.permutation(50) for _ in range(3)]), jnp.int32)
  lo = jnp.asarray(rng.integers(0, 25, (3, 40)), jnp.int32)
  hi = lo + jnp.asarray(rng.integers(1, 26, (3, 40)), jnp.int32)
  k = jnp.asarray(rng.integers(0, 1000, (3, 40)), jnp.int32) % (hi - lo)
  got = top_w.kth_smallest(top_w.wavelet_levels(values, 6), lo, hi, k)
  v, lo_, hi_, k_ = (np.asarray(a) for a in (values, lo, hi, k))
  want = [[np.sort(v[r, lo_[r, i]:hi_[r, i]])[k_[r, i]] for i in range(40)] for r in range(3)]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
