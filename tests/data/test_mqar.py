"""MQAR generator: answers recomputed from the inputs, Zoology's layout and power law."""

from __future__ import annotations

import numpy as np
import pytest

from effattn.data import load_split, mqar, task_info


def _check_example(inputs, targets, weights, *, vocab_size, num_pairs):
  half = vocab_size // 2
  context = 2 * num_pairs
  keys, values = inputs[0:context:2], inputs[1:context:2]
  assert np.all((keys >= 1) & (keys < half)), keys
  assert np.all((values >= half) & (values < vocab_size)), values
  assert len(set(keys.tolist())) == num_pairs and len(set(values.tolist())) == num_pairs
  answers = np.flatnonzero(weights)
  assert np.all(weights[answers] == 1.0)
  assert len(answers) == num_pairs  # every key is queried exactly once
  assert np.all(answers >= context)
  pair_of = {int(k): int(v) for k, v in zip(keys, values)}
  assert sorted(int(inputs[p]) for p in answers) == sorted(pair_of)
  for p in answers:
    assert targets[p] == pair_of[int(inputs[p])]
  off = np.ones_like(weights, bool)
  off[answers] = False
  assert np.all(targets[off] == 0) and np.all(weights[off] == 0)


@pytest.mark.parametrize("vocab_size,num_pairs,seq_len,random", [
    (64, 4, 32, True), (12, 2, 12, False), (8192, 64, 256, True), (100, 8, 33, True)])
def test_sample_targets_are_the_paired_values(vocab_size, num_pairs, seq_len, random):
  opts = mqar.MqarOptions(vocab_size=vocab_size, num_pairs=num_pairs, random_non_queries=random)
  opts.validate(seq_len)
  batch = mqar.sample(opts, seq_len, np.random.default_rng(0), 50)
  assert batch["inputs"].shape == (50, seq_len) and batch["inputs"].dtype == np.int32
  assert batch["inputs"].min() >= 0 and batch["inputs"].max() < vocab_size
  for i in range(50):
    _check_example(batch["inputs"][i], batch["targets"][i], batch["weights"][i],
                   vocab_size=vocab_size, num_pairs=num_pairs)
  if not random:  # without noise every non-pair, non-query slot is 0
    rest = batch["inputs"].copy()
    rest[:, :2 * num_pairs] = 0
    rest[batch["weights"] > 0] = 0
    assert np.all(rest == 0)


def test_power_law_places_queries_near_the_pairs():
  seq_len, pairs = 256, 4
  space = (seq_len - 2 * pairs) // 2

  def mean_gap(power_a):
    opts = mqar.MqarOptions(vocab_size=1024, num_pairs=pairs, power_a=power_a)
    w = mqar.sample(opts, seq_len, np.random.default_rng(1), 400)["weights"]
    gaps = (np.nonzero(w)[1] - 2 * pairs) // 2
    return gaps.mean()

  # Uniform (alpha=1) over [0, space) without replacement has mean ~ (space - 1) / 2.
  assert abs(mean_gap(1.0) - (space - 1) / 2) < 0.1 * space
  assert mean_gap(0.01) < 0.6 * mean_gap(1.0)


def test_prepared_splits_hold_valid_examples(mqar_cfg):
  for split in ("train", "test"):
    source = load_split(mqar_cfg, split)
    batch = source.get_batch(range(len(source)))
    for i in range(len(source)):
      _check_example(batch["inputs"][i], batch["targets"][i], batch["weights"][i],
                     vocab_size=64, num_pairs=4)
  info = task_info(mqar_cfg)
  assert (info.name, info.kind, info.vocab_size, info.num_classes, info.seq_len, info.pad_id) == (
      "mqar", "lm", 64, None, 32, 0)


def test_zoology_grid_is_valid():
  for seq_len, pairs in [(64, 4), (128, 8), (256, 16), (512, 64), (512, 128)]:
    mqar.MqarOptions(vocab_size=8192, num_pairs=pairs).validate(seq_len)
