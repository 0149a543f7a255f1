"""Passkey retrieval: the key is really in the input, only its digits are weighted."""

from __future__ import annotations

import numpy as np
import pytest

from effattn.data import load_split, passkey, task_info, tokenizers
from effattn.testing.data import data_config

TOK = tokenizers.ByteTokenizer()


def _check(inputs, targets, weights, key):
  text = TOK.decode(inputs)
  assert f"The pass key is {key}. Remember it. {key} is the pass key." in text
  assert text.endswith("What is the pass key? The pass key is " + str(key)[:-1])
  answer = np.flatnonzero(weights)
  assert len(answer) == len(str(key)) and np.all(weights[answer] == 1)
  assert TOK.decode(targets[answer]) == str(key)
  assert np.array_equal(targets[:-1], inputs[1:])  # targets are the next tokens


@pytest.mark.parametrize("length", [253, 254, 300, 1000, 4097])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_example_has_the_length_and_the_key(length, depth):
  e = passkey.passkey_example(length, depth, np.random.default_rng(length))
  assert e["inputs"].shape == e["targets"].shape == e["weights"].shape == (length,)
  assert e["inputs"][0] == tokenizers.BOS_ID
  assert 10_000 <= e["passkey"] <= 99_999
  _check(e["inputs"], e["targets"], e["weights"], e["passkey"])


@pytest.mark.parametrize("length", [262, 263, 1000])
def test_word_needle(length):
  """A word of WORDS as the key: any of them fits at the shortest length of the needle."""
  assert passkey.min_length(5, True, "word") == 262  # the longest word, "squirrel"
  for seed in range(8):
    e = passkey.passkey_example(length, 0.5, np.random.default_rng(seed), needle="word")
    assert e["inputs"].shape == (length,) and e["passkey"] in passkey.WORDS
    _check(e["inputs"], e["targets"], e["weights"], e["passkey"])
  batch = passkey.passkey_batch(length, 0.5, 4, seed=1, needle="word")
  assert all(w in passkey.WORDS for w in batch["passkey"])
  for i in range(4):
    _check(batch["inputs"][i], batch["targets"][i], batch["weights"][i], batch["passkey"][i])


def test_depth_moves_the_key_through_the_filler():
  where = []
  for depth in np.linspace(0, 1, 6):
    text = TOK.decode(passkey.passkey_example(2000, depth, np.random.default_rng(0))["inputs"])
    where.append(text.index("The pass key is") / len(text))
  assert where == sorted(where) and where[0] < 0.1 and where[-1] > 0.9


def test_short_lengths_fail_clearly():
  with pytest.raises(ValueError, match=r"passkey length=100 must be >= 253"):
    passkey.passkey_example(100, 0.5, np.random.default_rng(0))
  e = passkey.passkey_example(104, 0.5, np.random.default_rng(0), include_description=False)
  _check(e["inputs"], e["targets"], e["weights"], e["passkey"])


def test_grid_batch_is_deterministic():
  a = passkey.passkey_batch(300, 0.25, 4, seed=0)
  b = passkey.passkey_batch(300, 0.25, 4, seed=0)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert a["inputs"].shape == (4, 300) and np.all(a["segment_ids"] == 1)
  assert not np.array_equal(a["passkey"], passkey.passkey_batch(300, 0.5, 4, seed=0)["passkey"])
  for i in range(4):
    _check(a["inputs"][i], a["targets"][i], a["weights"][i], a["passkey"][i])


def test_prepared_split_with_variable_lengths(tmp_path):
  cfg = data_config("passkey", tmp_path, seq_len=160, train_examples=40, test_examples=20,
                    min_length=110, include_description=False)
  info = task_info(cfg)
  assert (info.vocab_size, info.pad_id, info.kind) == (259, 0, "lm")
  source = load_split(cfg, "train")
  batch = source.get_batch(range(len(source)))
  lengths = batch["segment_ids"].sum(1)
  assert lengths.min() >= 110 and lengths.max() <= 160 and len(set(lengths.tolist())) > 5
  for i, n in enumerate(lengths):
    assert np.all(batch["segment_ids"][i, :n] == 1) and np.all(batch["segment_ids"][i, n:] == 0)
    assert np.all(batch["inputs"][i, n:] == 0) and np.all(batch["weights"][i, n:] == 0)
    key = int(TOK.decode(batch["targets"][i][batch["weights"][i] > 0]))
    _check(batch["inputs"][i, :n], batch["targets"][i, :n], batch["weights"][i, :n], key)


def test_bad_options_name_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"data.seq_len=200 is shorter .*include_description"):
    task_info(data_config("passkey", tmp_path, seq_len=200))
  with pytest.raises(ValueError, match=r"data.passkey.min_length=50 must be 0 or in \[104, "):
    task_info(data_config("passkey", tmp_path, seq_len=200, include_description=False,
                          min_length=50))
  with pytest.raises(ValueError, match=r"data.passkey.needle='uuid' must be one of"):
    task_info(data_config("passkey", tmp_path, seq_len=300, needle="uuid"))
  with pytest.raises(ValueError, match=r"data.passkey.min_length=104 must be 0 or in \[113, "):
    task_info(data_config("passkey", tmp_path, seq_len=200, include_description=False,
                          min_length=104, needle="word"))
  with pytest.raises(ValueError, match=r"data.passkey.min_depth=0.8, max_depth=0.2"):
    task_info(data_config("passkey", tmp_path, seq_len=300, min_depth=0.8, max_depth=0.2))
