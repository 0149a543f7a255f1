"""block_sparse api: list helpers, argument validation, and proof that the kernels ran."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels.block_sparse import (FAMILY, BlockSizes, block_mask_from_lists,
                                          block_sparse_attention, causal_block_mask,
                                          lists_from_block_mask)
from effattn.kernels.block_sparse.common import transpose_lists
from effattn.testing import kernels
from effattn.testing.meshes import host_mesh


def test_lists_round_trip_and_padding():
  mask = jnp.array([[[[1, 0, 1], [0, 0, 0], [1, 1, 1]]]], bool)
  idx, cnt = lists_from_block_mask(mask)
  assert idx.shape[-1] == 4  # padded to a power of two
  np.testing.assert_array_equal(np.asarray(cnt), [[[2, 0, 3]]])
  np.testing.assert_array_equal(np.asarray(idx[0, 0, 0]), [0, 2, 2, 2])  # repeats last valid
  np.testing.assert_array_equal(np.asarray(block_mask_from_lists(idx, cnt, 3)), np.asarray(mask))
  t_idx, t_cnt = transpose_lists(idx, cnt, 3)
  np.testing.assert_array_equal(np.asarray(block_mask_from_lists(t_idx, t_cnt, 3)),
                                np.asarray(mask).swapaxes(-1, -2))


def test_causal_block_mask_with_window():
  m = np.asarray(causal_block_mask(4, 4, 16, 16, window=20))
  np.testing.assert_array_equal(m, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]])


@pytest.mark.parametrize("impl,names", [
    ("pallas_gpu", {"block_sparse_fwd", "block_sparse_dq", "block_sparse_dkv"}),
    ("pallas_tpu", {"block_sparse_tpu_fwd", "block_sparse_tpu_dq", "block_sparse_tpu_dkv"}),
])
def test_kernels_really_run(impl, names):
  q = jnp.ones((1, 32, 2, 64))
  idx, cnt = lists_from_block_mask(jnp.ones((1, 2, 2, 2), bool))

  def loss(q):
    o, _ = block_sparse_attention(q, q[:, :, :1], q[:, :, :1], idx, cnt, block_q=16,
                                  block_k=16, impl=impl, interpret=True)
    return jnp.vdot(o, o)

  kernels.assert_kernels_ran(names, jax.grad(loss), q)


def _args(t=32, h=2, d=64):
  q = jnp.zeros((1, t, h, d))
  idx, cnt = lists_from_block_mask(jnp.ones((1, h, t // 16, t // 16), bool))
  return q, idx, cnt


@pytest.mark.parametrize("kwargs,match", [
    ({"impl": "flash"}, "impl"),
    ({"block_q": 24}, "block_q"),
    ({"q_segment_ids": jnp.zeros((1, 32), jnp.int32)}, "segment_ids"),
    ({"q_threshold": jnp.zeros((1, 32))}, "q_threshold"),
    ({"kv_bias": jnp.zeros((1, 3, 32))}, "kv_bias"),
    ({"window": 0}, "window=0 must be a positive int"),
])
def test_validation_names_the_argument(kwargs, match):
  q, idx, cnt = _args()
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(q, q, q, idx, cnt, block_q=kwargs.pop("block_q", 16), block_k=16,
                           **kwargs)


def test_pallas_rejects_head_dim():
  q, idx, cnt = _args(d=32)
  with pytest.raises(ValueError, match="head_dim"):
    block_sparse_attention(q, q, q, idx, cnt, block_q=16, block_k=16, impl="pallas",
                           interpret=True)


def test_wrong_list_shape():
  q, idx, cnt = _args()
  with pytest.raises(ValueError, match="kv_indices"):
    block_sparse_attention(q, q, q, idx[:, :, :1], cnt[:, :, :1], block_q=16, block_k=16)


def test_block_sizes_power_of_two():
  with pytest.raises(ValueError, match="block_k"):
    BlockSizes(64, 48)


def test_a_window_reaches_mosaic_gpu_on_hopper(monkeypatch):
  """The Mosaic GPU kernels' window passed its GPU check (2026-12-03): on Hopper "auto" and
  "pallas" give a windowed bf16 call at 128-row tiles to them; at 64-row tiles (row pairs
  streamed as their union: a band ran slower than on Triton) a windowed call stays on Triton,
  and float32 does; the ring (T split over mesh.sequence) refuses a window."""
  q, idx, cnt = _args()
  with jax.set_mesh(host_mesh(sequence=2)):
    with pytest.raises(ValueError, match="window=8 has no ring path"):
      block_sparse_attention(q, q, q, idx, cnt, block_q=16, block_k=16, window=8)
  from effattn.kernels.block_sparse import api
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(api, "_hopper", lambda: "")
  for impl in ("auto", "pallas"):
    for block_q, window, want in ((64, None, "pallas_mosaic_gpu"), (64, 8, "pallas_gpu"),
                                  (128, 8, "pallas_mosaic_gpu"), (128, None, "pallas_mosaic_gpu")):
      got = FAMILY.choose(impl, head_dim=64, block_q=block_q, block_k=64, dtype="bfloat16",
                          window=window).path
      assert got == want, (impl, block_q, window)
    shapes = dict(head_dim=64, block_q=128, block_k=64)
    assert FAMILY.choose(impl, **shapes, dtype="float32", window=8).path == "pallas_gpu"
