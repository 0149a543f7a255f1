"""Selective copying: the answer is the data tokens of the noisy region, in order."""

from __future__ import annotations

import numpy as np
import pytest

from effattn.data import load_split, selective_copy as sc, task_info
from effattn.testing.data import data_config


def _check(inputs, targets, weights, num_tokens):
  t = len(inputs)
  region = t - num_tokens
  data = inputs[:region][inputs[:region] != sc.NOISE_ID]
  assert len(data) == num_tokens and np.all(data >= sc.FIRST_SYMBOL)
  assert inputs[region] == sc.SEP_ID
  assert np.array_equal(targets[region:], data)  # copied in order
  assert np.array_equal(inputs[region + 1:], data[:-1])  # teacher forcing
  assert np.all(weights[region:] == 1) and np.all(weights[:region] == 0)
  assert np.all(targets[:region] == 0)


@pytest.mark.parametrize("seq_len,num_tokens,num_symbols", [(12, 3, 4), (64, 16, 16), (33, 1, 2)])
def test_sample_copies_the_scattered_tokens_in_order(seq_len, num_tokens, num_symbols):
  opts = sc.SelectiveCopyOptions(num_tokens=num_tokens, num_symbols=num_symbols)
  opts.validate(seq_len)
  batch = sc.sample(opts, seq_len, np.random.default_rng(0), 200)
  assert batch["inputs"].max() < num_symbols + sc.FIRST_SYMBOL
  for i in range(200):
    _check(batch["inputs"][i], batch["targets"][i], batch["weights"][i], num_tokens)
  # The gaps really vary: the data positions differ between examples.
  where = [tuple(np.flatnonzero(batch["inputs"][i, :seq_len - num_tokens] != sc.NOISE_ID))
           for i in range(200)]
  assert len(set(where)) > 1


def test_prepared_split(tmp_path):
  cfg = data_config("selective_copy", tmp_path, seq_len=24, num_tokens=4, num_symbols=8,
                    train_examples=50, test_examples=20)
  assert task_info(cfg).vocab_size == 11
  source = load_split(cfg, "test")
  batch = source.get_batch(range(len(source)))
  for i in range(len(source)):
    _check(batch["inputs"][i], batch["targets"][i], batch["weights"][i], 4)


def test_bad_options_name_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"data.selective_copy.num_tokens=16 needs data.seq_len >= "
                                       r"2 \* num_tokens = 32"):
    task_info(data_config("selective_copy", tmp_path, seq_len=31))
  with pytest.raises(ValueError, match=r"data.selective_copy.num_symbols=0 must be >= 1"):
    task_info(data_config("selective_copy", tmp_path, seq_len=64, num_symbols=0))
