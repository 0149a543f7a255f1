"""dynamic_mask (DMA), the spec's own oracles: the naive top-w formula, w >= T is causal softmax
plus the bias, the kept-set size, tile skipping. The common oracles (causality, decode, segments,
gradients of every parameter, paths and kernels against the reference) are in
test_mechanisms.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effattn.attention import base
from effattn.attention.dynamic_mask import select_top_w
from effattn.kernels.softmax import reference_attention
from effattn.kernels.block_sparse.common import element_mask
from effattn.testing import assert_close
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import Jitted, build


def _build(impl="xla", keep_window=5, **opts):
  attn = build("dynamic_mask", impl=impl, num_kv_heads=2,
               dynamic_mask={"keep_window": keep_window, "block": 8, **opts})
  attn.A[...] = jnp.array([1.5, -2.0])  # a non-trivial bias (A starts at 0 as in the code)
  return attn


@nnx.jit
def _project(attn, x, pos):
  return attn.project(x, pos)


def naive_dma(q, k, v, bias, w):
  """Per query: visible keys ranked by bias (ties: earlier first), top-w kept, softmax + bias."""
  q, k, v, bias = (np.asarray(a, np.float64) for a in (q, k, v, bias))
  b, t, h, d = q.shape
  group = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      kh = hi // group
      for i in range(t):
        order = sorted(range(i + 1), key=lambda j: (-bias[bi, kh, j], j))[:w]
        s = np.array([q[bi, i, hi] @ k[bi, j, kh] / np.sqrt(d) + bias[bi, kh, j] for j in order])
        p = np.exp(s - s.max())
        out[bi, i, hi] = (p / p.sum()) @ v[bi, order, kh]
  return out


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_matches_naive_top_w(impl):
  attn = _build(impl, keep_window=4)
  x, pos = random_inputs(length=14)
  q, k, v, bias = _project(attn, x, pos)
  y, _ = Jitted(attn)(x, positions=pos)
  want = attn.o_proj(base.merge_heads(jnp.asarray(naive_dma(q, k, v, bias, 4), jnp.float32)))
  assert_close("y", want, y, reduction=14)


def test_window_covering_everything_is_causal_softmax_plus_bias():
  attn = _build("xla", keep_window=64)
  x, pos = random_inputs(length=20)
  q, k, v, bias = _project(attn, x, pos)
  idx = base.sequence_index(2, 20)
  o = reference_attention(q, k, v, base.attention_mask(idx, idx, causal=True),
                          bias=jnp.repeat(bias, 2, axis=1)[:, :, None, :])
  y, _ = Jitted(attn)(x, positions=pos)
  assert_close("y", attn.o_proj(base.merge_heads(o)), y, reduction=20)


@pytest.mark.parametrize("tied", [False, True])
def test_kept_set_has_min_w_t_keys(tied):
  t, w = 30, 7
  bias = jnp.zeros((1, 2, t)) if tied else jax.random.normal(jax.random.key(0), (1, 2, t))
  idx = base.sequence_index(1, t)
  thr, thr_pos, _ = select_top_w(bias, keep_window=w, selection="per_query", q_index=idx,
                                 kv_index=idx)
  keep = element_mask(causal=True, q_pos=idx[:, None], kv_pos=idx[:, None], kv_bias=bias,
                      q_thr=thr, q_thr_pos=thr_pos)
  np.testing.assert_array_equal(np.asarray(keep.sum(-1)),
                                np.broadcast_to(np.minimum(w, np.arange(1, t + 1)), (1, 2, t)))


def test_global_selection_ranks_once():
  t, w = 16, 5
  bias = jax.random.normal(jax.random.key(1), (1, 1, t))
  idx = base.sequence_index(1, t)
  thr, _, _ = select_top_w(bias, keep_window=w, selection="global", q_index=idx, kv_index=idx)
  np.testing.assert_array_equal(np.asarray(thr[0, 0]), np.sort(np.asarray(bias[0, 0]))[-w])


def test_tiles_are_skipped_and_kernel_path_agrees():
  x, pos = random_inputs(length=64)
  got, aux = Jitted(_build("xla", keep_window=8))(x, positions=pos)
  want, _ = Jitted(_build("reference", keep_window=8))(x, positions=pos)
  assert float(aux["dma_kept_tile_frac"]) < 0.75
  assert_close("y", want, got, reduction=64)


def test_bad_options_named():
  with pytest.raises(ValueError, match="selection"):
    build("dynamic_mask", dynamic_mask={"selection": "random"})
  with pytest.raises(ValueError, match="keep_window"):
    build("dynamic_mask", dynamic_mask={"keep_window": 0})


def test_ranked_selection_equals_dense_in_the_layer():
  """select_impl ranked (default) and dense (the oracle) give one output; a segment id that
  recurs after another takes the dense form, and aux says so."""
  x, pos = random_inputs(length=24)
  contiguous = jnp.asarray(np.repeat([[1, 2, 0], [1, 1, 1]], 8, axis=1), jnp.int32)
  recurring = jnp.asarray(np.tile([[1, 2], [3, 3]], (1, 12)), jnp.int32)
  ranked, dense = _build("xla", keep_window=4), _build("xla", keep_window=4, select_impl="dense")
  for seg, fallback in ((None, 0.0), (contiguous, 0.0), (recurring, 1.0)):
    got, aux = Jitted(ranked)(x, positions=pos, segment_ids=seg)
    want, aux_d = Jitted(dense)(x, positions=pos, segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert float(aux["dma_kept_tile_frac"]) == float(aux_d["dma_kept_tile_frac"])
    assert float(aux["dma_select_fallback"]) == fallback


def test_bad_select_impl_named():
  x, pos = random_inputs(length=8)
  with pytest.raises(ValueError, match="select_impl"):
    _build("xla", select_impl="fast")(x, positions=pos)
