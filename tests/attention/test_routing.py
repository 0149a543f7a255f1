"""routing, its own oracles: C = 1 is causal softmax, the k-means update formula, centroids move
only in training, the cluster block mask, and the kernel path against the formula with many
clusters and ragged tiles. The common oracles are in test_mechanisms.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from effattn.attention import base, routing
from effattn.kernels.softmax import reference_attention
from effattn.testing import assert_close
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import build


def test_kernel_path_equals_formula_with_many_clusters():
  x, pos = random_inputs(length=70)
  opts = {"num_clusters": 5, "block": 16}
  want, _ = build("routing", impl="reference", routing=opts)(x, positions=pos)
  got, _ = build("routing", impl="xla", routing=opts)(x, positions=pos)
  assert_close("y", want, got, reduction=70)


def _causal_shared_qk(attn, x, pos):
  _, _, _, ur, v = attn.project(x, pos)
  idx = base.sequence_index(x.shape[0], x.shape[1])
  o = reference_attention(ur, ur, v, base.attention_mask(idx, idx, causal=True))
  return o


@pytest.mark.parametrize("membership", ["nearest", "balanced"])
def test_one_cluster_is_causal_softmax(membership):
  attn = build("routing", impl="xla", routing={
      "num_clusters": 1, "routing_heads": 4, "membership": membership})
  x, pos = random_inputs(length=20)
  y, _ = attn(x, positions=pos)
  o = _causal_shared_qk(attn, x, pos)
  if membership == "balanced":  # every token chosen once; the code divides by count + 1e-2
    o = o / (1 + 1e-2)
  want = attn.o_proj(base.merge_heads(o))
  assert_close("y", want, y, reduction=20)


def test_ema_update_formula():
  ema_sum = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])  # [H=1, C=2, D=2]
  ema_count = jnp.array([[1.0, 1.0]])
  u = jnp.array([[[[2.0, 0.0]], [[4.0, 2.0]], [[0.0, 3.0]]]])  # [B=1, T=3, H=1, D=2]
  assign = jnp.array([[[0], [0], [1]]])
  weight = jnp.array([[1.0, 1.0, 0.0]])  # the last token is padding
  new_sum, new_count = routing.ema_update(ema_sum, ema_count, u, assign, weight, decay=0.9)
  np.testing.assert_allclose(np.asarray(new_count), [[0.9 + 0.1 * 2, 0.9]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new_sum), [[[0.9 + 0.1 * 6, 0.1 * 2], [0.0, 0.9]]],
                             rtol=1e-6)
  mu = routing.ema_centroids(new_sum, new_count, eps=1e-5)
  n = 1.1 + 0.9
  smoothed = (np.array([1.1, 0.9]) + 1e-5) / (n + 2e-5) * n
  np.testing.assert_allclose(np.asarray(mu), np.asarray(new_sum) / smoothed[None, :, None],
                             rtol=1e-6)


def test_centroids_move_only_when_training():
  attn = build("routing", impl="xla")
  x, pos = random_inputs()
  before = np.asarray(attn.centroids())
  attn(x, positions=pos, train=False)
  np.testing.assert_array_equal(np.asarray(attn.centroids()), before)
  _, aux = attn(x, positions=pos, train=True)
  assert not np.allclose(np.asarray(attn.centroids()), before)
  assert float(aux["loss_commitment"]) > 0
  assert isinstance(attn.ema_sum, base.AttentionState)


def test_cluster_block_mask_visits_only_shared_clusters():
  sorted_clusters = jnp.array([[[0, 0, 0, 0, 1, 1, 2, 2]]])  # tiles of 2: [0 0][0 0][1 1][2 2]
  got = np.asarray(routing.cluster_block_mask(sorted_clusters, 2, causal=True))[0, 0]
  np.testing.assert_array_equal(got, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_bad_options_named():
  with pytest.raises(ValueError, match="membership"):
    build("routing", routing={"membership": "random"})
  with pytest.raises(ValueError, match="routing_heads"):
    build("routing", routing={"routing_heads": 9})
  with pytest.raises(ValueError, match="num_kv_heads"):
    build("routing", num_kv_heads=2)
