"""ListOps: labels equal an independent evaluator of the expression text."""

from __future__ import annotations

import numpy as np
import pytest

from effattn.data import batch_at, eval_batches, listops, load_split, task_info
from effattn.testing.data import data_config


def evaluate(text: str) -> int:
  """A stack evaluator of the expression text, written apart from the generator."""
  stack: list[list] = [["ROOT", []]]
  for token in text.split():
    if token.startswith("["):
      stack.append([token, []])
    elif token == "]":
      op, args = stack.pop()
      s = sorted(args)
      value = {"[MIN": s[0], "[MAX": s[-1], "[SM": sum(s) % 10,
               "[MED": s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) // 2,
               }[op]
      stack[-1][1].append(value)
    else:
      stack[-1][1].append(int(token))
  assert len(stack) == 1 and len(stack[0][1]) == 1, "unbalanced expression"
  return stack[0][1][0]


def test_evaluator_on_handmade_expressions():
  assert evaluate("[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]") == 5
  assert evaluate("[SM 9 9 [MED 1 2 ] ]") == 9  # median 1.5 rounds down, as in LRA
  assert evaluate("7") == 7


@pytest.mark.parametrize("min_length,max_length,max_depth,max_args",
                         [(500, 2000, 10, 10), (10, 60, 4, 5), (0, 3, 2, 2)])
def test_labels_equal_an_independent_evaluator(min_length, max_length, max_depth, max_args):
  opts = listops.ListOpsOptions(min_length=min_length, max_length=max_length,
                                max_depth=max_depth, max_args=max_args)
  seq_len = max_length - 1
  opts.validate(seq_len)
  batch = listops.sample(opts, seq_len, np.random.default_rng(0), 60)
  lengths = batch["segment_ids"].sum(1)
  assert np.all(lengths > min_length) and np.all(lengths < max_length)
  for i in range(60):
    n = lengths[i]
    assert np.all(batch["inputs"][i, n:] == 0) and np.all(batch["inputs"][i, :n] > 0)
    assert batch["targets"][i] == evaluate(listops.to_text(batch["inputs"][i]))
  if max_length == 2000:  # LRA's setting reaches every class
    assert len(set(batch["targets"].tolist())) >= 8


def test_prepared_classification_batches(tmp_path):
  cfg = data_config("listops", tmp_path, seq_len=64, min_length=10, max_length=60, max_depth=5,
                    train_examples=40, validation_examples=10, test_examples=10)
  info = task_info(cfg)
  assert (info.kind, info.vocab_size, info.num_classes, info.pad_id) == (
      "classification", 16, 10, 0)
  batch = batch_at(load_split(cfg, "train"), 0, 8, seed=0)
  assert batch["targets"].shape == batch["weights"].shape == (8,)
  assert batch["inputs"].shape == batch["segment_ids"].shape == batch["positions"].shape == (8, 64)
  assert np.all(batch["weights"] == 1)
  assert np.array_equal(batch["segment_ids"], (batch["inputs"] > 0).astype(np.int32))
  for i in range(8):
    assert batch["targets"][i] == evaluate(listops.to_text(batch["inputs"][i]))
  last = list(eval_batches(cfg, "validation", 4))[-1]
  assert last["targets"].shape == (4,) and last["weights"].tolist() == [1, 1, 0, 0]


def test_bad_options_name_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"data.listops.max_length=2000 .* data.seq_len=1024"):
    task_info(data_config("listops", tmp_path, seq_len=1024))
  with pytest.raises(ValueError, match=r"data.listops.min_length=600 must be in .* = \[0, 499\)"):
    task_info(data_config("listops", tmp_path, seq_len=2000, min_length=600, max_length=500))
