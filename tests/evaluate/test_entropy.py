"""The attention-entropy probe: the entropy of known rows, the per-head sums over a batch, and
the task on a tiny model (softmax; layers without weights listed and left out)."""

import jax.numpy as jnp
import numpy as np
import pytest

from effattn.evaluate import entropy
from effattn.testing.configs import fresh_model, tiny_eval


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_uniform_row_has_entropy_log_n_and_one_hot_zero(n):
  row = jnp.zeros(20).at[:n].set(1.0 / n)  # masked keys hold 0
  np.testing.assert_allclose(float(entropy.row_entropy(row)), np.log(n), rtol=1e-6, atol=1e-7)
  one_hot = jnp.zeros(20).at[n - 1].set(1.0)
  assert float(entropy.row_entropy(one_hot)) == 0.0
  assert float(entropy.row_entropy(jnp.zeros(20))) == 0.0


def test_signed_row_reads_as_its_magnitudes():
  row = jnp.array([0.5, -0.25, 0.75, 0.0])  # sums to 1, as MALA's scores do
  p = np.array([0.5, 0.25, 0.75]) / 1.5
  np.testing.assert_allclose(float(entropy.row_entropy(row)), -np.sum(p * np.log(p)), rtol=1e-6)
  np.testing.assert_allclose(float(entropy.negative_mass(row)), 0.25 / 1.5, rtol=1e-6)


def test_layer_sums_count_real_queries_and_normalize_by_the_prefix():
  """Row 0: one segment of 4 then padding; row 1: two segments (3 + 3). Uniform weights over
  each prefix give normalized entropy 1 per query; queries that see one key are left out."""
  seg = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 2, 2, 2]])
  pos = jnp.array([[0, 1, 2, 3, 0, 0], [0, 1, 2, 0, 1, 2]])
  same = (seg[:, :, None] == seg[:, None, :]) & jnp.tril(jnp.ones((6, 6), bool))
  uniform = same / jnp.sum(same, -1, keepdims=True)
  weights = jnp.broadcast_to(uniform[:, None], (2, 3, 6, 6))  # 3 heads
  targets = jnp.zeros((2, 6)).at[0, 3].set(1.0).at[1, 5].set(1.0)
  batch = {"segment_ids": seg, "positions": pos, "weights": targets}
  sums = entropy.layer_sums(weights, batch, causal=True)
  assert float(sums["queries"]) == 3 + 2 + 2  # positions >= 1 of real tokens
  assert float(sums["queries_targets"]) == 2
  np.testing.assert_allclose(sums["entropy_norm"], 7.0, rtol=1e-6)
  want = 3 * np.log(2) + 3 * np.log(3) + np.log(4)
  np.testing.assert_allclose(sums["entropy"], want, rtol=1e-6)
  np.testing.assert_allclose(sums["entropy_targets"], np.log(4) + np.log(3), rtol=1e-6)
  np.testing.assert_allclose(sums["negative_mass"], 0.0)


def test_task_reports_per_layer_and_head(data_dir):
  model, config = fresh_model(tiny_eval(data_dir, "mqar"))
  with config.unlocked():
    config.eval.entropy.update(examples=10, batch_size=4)
  result = entropy.entropy_task(model, config, workdir=None)
  assert result["examples"] == 10
  assert [layer["mechanism"] for layer in result["layers"]] == ["softmax", "softmax"]
  for layer in result["layers"]:
    for key in ("entropy", "entropy_norm", "entropy_targets", "entropy_targets_norm"):
      assert len(layer[key]) == 2  # heads
    assert all(0.0 < h <= 1.0 + 1e-6 for h in layer["entropy_norm"])
  summary = result["summary"]
  assert summary["entropy_norm"] == pytest.approx(
      np.mean([layer["entropy_norm"] for layer in result["layers"]]))
  assert 0.0 < summary["entropy_targets_norm"] <= 1.0 + 1e-6


def test_layers_without_weights_are_listed_and_left_out(data_dir):
  config = tiny_eval(data_dir, "mqar")
  config.model.pattern = "softmax,lightning"
  model, config = fresh_model(config)
  with config.unlocked():
    config.eval.entropy.update(examples=8, batch_size=8)
  result = entropy.entropy_task(model, config, workdir=None)
  softmax, lightning = result["layers"]
  assert softmax["exposed"] and len(softmax["entropy"]) == 2
  assert lightning == {"layer": 1, "mechanism": "lightning", "exposed": False}
  assert result["summary"]["entropy"] == pytest.approx(np.mean(softmax["entropy"]))
  config.model.pattern = "lightning"
  model, config = fresh_model(config)
  result = entropy.entropy_task(model, config, workdir=None)
  assert result["summary"] == dict.fromkeys(result["summary"]) and result["examples"] == 0
