"""dynamic_mask's chunk-sorted key layout (key_layout="sorted", kernels/block_sparse/
sorted_chunks.py) against the token-order layout: the same attention (output and every gradient)
over ragged lengths, packed and recurring segments, GQA, both selections, on the xla op and the
interpreted Triton kernels; fewer visited tiles; causal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effattn.kernels import dispatch
from effattn.kernels.block_sparse import sorted_chunks
from effattn.testing import assert_close
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import Jitted, build


def _pair(impl, d_model=32, num_heads=4, **opts):
  """The token-order and the sorted layer with the same parameters."""
  def one(layout):
    attn = build("dynamic_mask", impl=impl, num_kv_heads=2, d_model=d_model, num_heads=num_heads,
                 dynamic_mask={"block": 8, "sort_chunk": 16, "key_layout": layout, **opts})
    attn.A[...] = jnp.array([1.5, -2.0])  # a non-trivial bias (A starts at 0 as in the code)
    return attn
  return one("token"), one("sorted")


def _value_and_grads(attn, x, pos, seg):
  graph, params = nnx.split(attn)
  proj = jax.random.normal(jax.random.key(7), x.shape)

  @jax.jit
  def f(params, x):
    y, aux = nnx.merge(graph, params)(x, positions=pos, segment_ids=seg)
    return jnp.sum(y * proj), (y, aux)
  (_, (y, aux)), (dp, dx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
  return y, aux, dx, dp


def _segments(kind, b, t):
  if kind is None:
    return None
  if kind == "packed":  # contiguous runs of ragged lengths, a different cut per row
    cuts = [(t // 3, 2 * t // 3 + 3), (5, t - 9)]
    seg = np.ones((b, t), np.int32)
    for r, (c0, c1) in enumerate(cuts[:b]):
      seg[r, c0:] = 2
      seg[r, c1:] = 3
    return jnp.asarray(seg)
  return jnp.asarray(np.tile([[1, 1, 2], [3, 4, 4]], (1, t // 3 + 1))[:b, :t], jnp.int32)


def _check_same(impl, t, seg_kind, keep_window=6, d_model=32, num_heads=4, **opts):
  token, srt = _pair(impl, d_model, num_heads, keep_window=keep_window, **opts)
  x, pos = random_inputs(length=t, d_model=d_model)
  seg = _segments(seg_kind, 2, t)
  y0, aux0, dx0, dp0 = _value_and_grads(token, x, pos, seg)
  y1, aux1, dx1, dp1 = _value_and_grads(srt, x, pos, seg)
  assert_close("y", y0, y1, reduction=t)
  assert_close("dx", dx0, dx1, reduction=t)
  for (path, g0), g1 in zip(jax.tree_util.tree_leaves_with_path(dp0), jax.tree.leaves(dp1)):
    assert_close(f"d{jax.tree_util.keystr(path)}", g0, g1, reduction=t)
  return aux0, aux1


@pytest.mark.parametrize("t, seg_kind, opts", [
    (64, None, {}),
    (61, "packed", {}),  # ragged: the last tile and chunk are partial
    (48, "recurring", {}),  # a segment id recurs: the dense selection, every past chunk a candidate
    (56, "packed", {"selection": "global"}),
    (24, "recurring", {"select_impl": "dense"}),  # the dense oracle selection, no fallback flag
])
def test_sorted_layout_is_the_same_attention(t, seg_kind, opts):
  _check_same("xla", t, seg_kind, **opts)


def test_sorted_layout_on_the_interpreted_triton_kernels():
  with dispatch.interpret_kernels("gpu"):
    # head_dim 64: the least the kernels take
    _check_same("pallas", 40, "packed", d_model=128, num_heads=2)


def test_sorted_layout_visits_fewer_tiles():
  aux_token, aux_sorted = _check_same("xla", 128, None, keep_window=12)
  assert float(aux_sorted["dma_kept_tile_frac"]) < 0.8 * float(aux_token["dma_kept_tile_frac"])


def test_sorted_layout_is_causal():
  _, srt = _pair("xla", keep_window=6)
  srt = Jitted(srt)  # one compiled forward for both calls
  x, pos = random_inputs(length=48)
  y, _ = srt(x, positions=pos)
  x2 = x.at[:, 30:].set(jax.random.normal(jax.random.key(3), x[:, 30:].shape))
  y2, _ = srt(x2, positions=pos)
  np.testing.assert_allclose(np.asarray(y[:, :30]), np.asarray(y2[:, :30]), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(y[:, 30:]), np.asarray(y2[:, 30:]))


@pytest.mark.parametrize("n_k, sort_chunk, block, want", [
    (256, 1024, 64, 16), (12, 1024, 64, 4), (7, 1024, 64, 1), (256, 100, 64, 1), (8, 64, 8, 8)])
def test_chunk_tiles(n_k, sort_chunk, block, want):
  assert sorted_chunks.chunk_tiles(n_k, sort_chunk, block) == want


def test_bad_key_layout_named():
  with pytest.raises(ValueError, match="key_layout"):
    build("dynamic_mask", dynamic_mask={"key_layout": "shuffled"})


def test_auto_layout_sorts_from_four_windows():
  attn = build("dynamic_mask", dynamic_mask={"keep_window": 8})
  assert [attn.key_layout(t) for t in (16, 31, 32, 64)] == ["token", "token", "sorted", "sorted"]
