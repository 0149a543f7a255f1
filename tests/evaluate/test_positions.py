"""Loss by position bucket at the training length and beyond, on a tiny untrained model."""

import ml_collections
import numpy as np
import pytest

from effattn.evaluate import positions
from effattn.evaluate.accuracy import evaluate_split
from effattn.testing.configs import fresh_model, tiny_eval
from effattn.train.state import split_model


def test_bucket_sums_by_hand():
  values = np.array([[1.0, 2.0, 3.0, 4.0]])
  weights = np.array([[1.0, 0.0, 1.0, 2.0]])
  pos = np.array([[0, 1, 2, 3]])
  sums, w = positions.bucket_sums(values, weights, pos, length=4, num_buckets=2)
  np.testing.assert_allclose(sums, [1.0, 3.0 + 8.0])
  np.testing.assert_allclose(w, [1.0, 3.0])


def test_positions_task_matches_split_loss_and_extrapolates(data_dir):
  config = tiny_eval(data_dir)
  with config.unlocked():
    config.eval.positions = ml_collections.ConfigDict(
        {"multiples": (1, 2), "num_buckets": 4, "max_examples": 0, "tokens_per_batch": 0})
  model, config = fresh_model(config)
  result = positions.positions_task(model, config, workdir=None)

  assert [e["length"] for e in result["lengths"]] == [16, 32]
  at_train, doubled = result["lengths"]
  # The overall loss at the training length is the trainer's eval loss of the same split.
  graphdef, params, rest = split_model(model)
  reference = evaluate_split(graphdef, params, rest, config.data, "test", batch_size=8)
  assert at_train["loss"] == pytest.approx(reference["loss"], rel=1e-5)
  assert at_train["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-6)
  for entry in result["lengths"]:
    buckets = entry["buckets"]
    assert len(buckets) == 4 and buckets[-1]["end"] == entry["length"]
    assert sum(b["weight"] for b in buckets) == pytest.approx(entry["tokens"])
    weighted = sum(b["loss"] * b["weight"] for b in buckets if b["loss"] is not None)
    assert weighted / entry["tokens"] == pytest.approx(entry["loss"], rel=1e-6)
  assert at_train["loss_beyond_train_length"] is None
  assert doubled["loss_beyond_train_length"] is not None  # MQAR queries reach past 16
  assert result["figure"].axes  # drawn, saved by the runner


def test_positions_rejects_classifiers_and_bad_options(data_dir):
  config = tiny_eval(data_dir)
  with config.unlocked():
    config.eval.positions = ml_collections.ConfigDict({"multiples": (0, 2)})
  model, config = fresh_model(config)
  with pytest.raises(ValueError, match="eval.positions.multiples"):
    positions.positions_task(model, config, workdir=None)
  config.eval.positions = ml_collections.ConfigDict({"bucket": 3})
  with pytest.raises(ValueError, match="eval.positions.bucket is not an option"):
    positions.positions_task(model, config, workdir=None)
  config.eval.positions = ml_collections.ConfigDict({"multiples": (1,)})
  config.data.name, config.data.seq_len = "listops", 2048  # only its task info is read
  with pytest.raises(ValueError, match="needs a language model"):
    positions.positions_task(model, config, workdir=None)
