"""The passkey length x depth grid: bookkeeping with an oracle, the real model path, the PNG."""

import json

import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import base
from effattn.data import passkey as passkey_data
from effattn.evaluate import common
from effattn.evaluate import passkey as passkey_eval
from effattn.evaluate.runner import evaluate_checkpoint
from effattn.testing.configs import fresh_model, tiny_eval
from effattn.train import checkpoint as ckpt_lib
from effattn.train import loop

GRID = {"lengths": (128, 192), "depths": (0.0, 0.5, 1.0), "examples": 4, "seed": 7,
        "tokens_per_batch": 256}


def _with_grid(config):
  with config.unlocked():
    config.eval.passkey = ml_collections.ConfigDict(GRID)
  return config


def test_grid_accuracy_with_a_depth_blind_oracle(data_dir, monkeypatch):
  """An oracle that knows the key except when it sits at depth 0.5: the grid must say so."""
  def oracle(graphdef, params, rest, batch):
    del graphdef, params, rest
    correct = np.ones(batch["targets"].shape, bool)
    for i, tokens in enumerate(batch["inputs"]):
      text = bytes(int(t) - 3 for t in tokens if t >= 3).decode()
      # Filler characters before and after the key line (lines are joined with newlines).
      before = text.index("The pass key is") - 1
      after = text.index("What is the pass key?") - text.index("is the pass key.") - 18
      if 0.3 < before / (before + after) < 0.7:  # the key is in the middle
        correct[i, -2] = False  # one wrong digit
    return np.zeros(correct.shape, np.float32), correct

  monkeypatch.setattr(common, "token_losses", oracle)
  model, config = fresh_model(_with_grid(tiny_eval(data_dir, "passkey")))
  result = passkey_eval.passkey_task(model, config, workdir=None)
  assert result["lengths"] == [128, 192] and result["depths"] == [0.0, 0.5, 1.0]
  np.testing.assert_allclose(result["accuracy"], [[1, 1], [0, 0], [1, 1]])
  np.testing.assert_allclose(result["digit_accuracy"], [[1, 1], [0.8, 0.8], [1, 1]])


def test_passkey_eval_from_checkpoint_writes_json_and_heat_map(data_dir, tmp_path):
  config = tiny_eval(data_dir, "passkey")
  loop.train_and_evaluate(config, str(tmp_path))
  saved = ckpt_lib.merge_into(base.get_config(), ckpt_lib.load_config(str(tmp_path)))
  with saved.unlocked():
    saved.eval.task = "passkey"
  report = evaluate_checkpoint(_with_grid(saved), str(tmp_path))
  assert report["step"] == 2
  acc = np.asarray(report["accuracy"])
  assert acc.shape == (3, 2) and np.all((acc >= 0) & (acc <= 1))
  assert report["plot"] == str(tmp_path / "eval_passkey.png")
  with open(report["plot"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert json.load(open(tmp_path / "eval_passkey.json"))["lengths"] == [128, 192]
  assert "figure" not in report


def test_passkey_needs_a_byte_model(data_dir):
  model, config = fresh_model(tiny_eval(data_dir, "mqar"))
  with pytest.raises(ValueError, match="needs a language model on byte tokens"):
    passkey_eval.passkey_task(model, config, workdir=None)


def test_default_lengths_are_multiples_of_the_training_length():
  opts = passkey_eval.PasskeyEvalOptions()
  assert passkey_eval.grid_lengths(opts, train_len=128, shortest=104) == [128, 256, 512]
  assert passkey_eval.grid_lengths(opts, train_len=64, shortest=104) == [104, 128, 256]
  with pytest.raises(ValueError, match="shorter than the shortest passkey prompt"):
    passkey_eval.grid_lengths(passkey_eval.PasskeyEvalOptions(lengths=(50,)), 128, 104)


def test_word_needle_grid(data_dir, monkeypatch):
  """The grid draws the run's needle: every key is a word, weighted over its letters."""
  keys = []

  def oracle(graphdef, params, rest, batch):
    del graphdef, params, rest
    for tokens, weights in zip(batch["targets"], batch["weights"]):
      keys.append(bytes(int(t) - 3 for t in tokens[weights > 0]).decode())
    return np.zeros(batch["targets"].shape, np.float32), np.ones(batch["targets"].shape, bool)

  monkeypatch.setattr(common, "token_losses", oracle)
  config = tiny_eval(data_dir, "passkey")
  config.data.passkey.needle = "word"
  model, config = fresh_model(_with_grid(config))
  result = passkey_eval.passkey_task(model, config, workdir=None)
  assert result["needle"] == "word" and result["summary"]["passkey"] == 1.0
  assert len(keys) == 2 * 3 * 4 and all(k in passkey_data.WORDS for k in keys)


def test_vary_rebuilds_the_model_per_value(data_dir, monkeypatch):
  """eval.passkey.vary: one grid per value, each from the same parameters with the field set."""
  seen = []

  def cell(graphdef, params, rest, batch, rows):
    del rows
    k = nnx.merge(graphdef, params, rest).blocks[0].attn.opts.forward_top_k
    seen.append(k)
    n = batch["inputs"].shape[0]
    return np.full(n, k == 1), np.full(n, 1.0 if k == 1 else 0.5)

  monkeypatch.setattr(passkey_eval, "evaluate_cell", cell)
  config = _with_grid(tiny_eval(data_dir, "passkey"))
  config.model.attention.name = "landmark"
  config.model.attention.landmark.block_len = 16
  config.eval.passkey.update(vary="model.attention.landmark.forward_top_k", values=(1, 2))
  model, config = fresh_model(config)
  result = passkey_eval.passkey_task(model, config, workdir=None)
  assert seen == [0] * 6 + [1] * 6 + [2] * 6  # the run's own grid, then one per value
  assert [g["value"] for g in result["varied"]] == [1, 2]
  assert [g["mean_accuracy"] for g in result["varied"]] == [1.0, 0.0]
  assert result["summary"]["passkey_beyond@forward_top_k=1"] == 1.0
  assert result["summary"]["passkey_128"] == 0.0 and "passkey_192" in result["summary"]
  with config.unlocked():
    config.eval.passkey.update(vary="model.d_model", values=(64,))
  with pytest.raises(ValueError, match="changes the model's parameters"):
    passkey_eval.passkey_task(model, config, workdir=None)
  with pytest.raises(ValueError, match="give both"):
    passkey_eval.PasskeyEvalOptions(vary="model.attention.window").validate()
