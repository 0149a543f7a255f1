"""Every registered task: deterministic builders, disjoint splits, the batch format."""

from __future__ import annotations

import numpy as np
import pytest

from effattn.data import TASKS, batch_at, load_split, registry, task_info
from effattn.testing.data import TINY_MQAR, data_config

# A tiny configuration of every task: (seq_len, options).
TINY = {
    "mqar": (32, TINY_MQAR),
    "passkey": (128, dict(train_examples=30, test_examples=10, include_description=False)),
    "selective_copy": (24, dict(num_tokens=4, num_symbols=8, train_examples=40,
                                test_examples=10)),
    "listops": (40, dict(min_length=5, max_length=40, max_depth=4, train_examples=30,
                         validation_examples=10, test_examples=10)),
    "text": (256, dict(max_files=10, validation_fraction=0.3, test_fraction=0.3)),
}


def test_every_task_has_a_tiny_config_here():
  assert set(TINY) == set(TASKS)


@pytest.mark.parametrize("name", sorted(TINY))
def test_builder_is_deterministic_and_splits_are_disjoint(name, tmp_path):
  seq_len, options = TINY[name]
  a = data_config(name, tmp_path / "a", seq_len=seq_len, **options)
  b = data_config(name, tmp_path / "b", seq_len=seq_len, **options)
  info = task_info(a)
  rows = {}
  load_split(a, "train")  # prepares every split
  for split in _splits(a):
    sa, sb = load_split(a, split), load_split(b, split)
    assert len(sa) == len(sb) > 0
    everything = np.arange(len(sa))
    ba, bb = sa.get_batch(everything), sb.get_batch(everything)
    for k in ba:
      assert np.array_equal(ba[k], bb[k]), (split, k)
    assert ba["inputs"].shape == (len(sa), seq_len)
    assert ba["inputs"].max() < info.vocab_size and ba["inputs"].min() >= 0
    assert ba["targets"].shape == ((len(sa),) if info.kind == "classification" else
                                   (len(sa), seq_len))
    assert ba["weights"].sum() > 0
    rows[split] = {(r.tobytes(), t.tobytes()) for r, t in zip(ba["inputs"], ba["targets"])}
  if name != "text":  # text splits are disjoint by file (test_text.py); files may repeat content
    for s1 in rows:
      for s2 in rows:
        assert s1 == s2 or not rows[s1] & rows[s2], (s1, s2)
  batch = batch_at(load_split(a, "train"), 3, 4, seed=0)
  assert {k: v.dtype.name for k, v in batch.items()} == {
      "inputs": "int32", "targets": "int32", "weights": "float32", "segment_ids": "int32",
      "positions": "int32"}


def _splits(cfg):
  from effattn.data import pipeline

  r = pipeline.resolve(cfg)
  builder = r.task.builder(r.options, seq_len=r.seq_len, seed=r.seed, data_dir=r.data_dir)
  return list(builder.info.splits)


def test_registry_errors_list_the_known_tasks():
  with pytest.raises(ValueError, match=r"data.name='nope' is not a registered task; known: "):
    registry.get("nope")
  for task in TASKS.values():
    assert task.kind in ("lm", "classification")
    task.options()  # every option has a default
