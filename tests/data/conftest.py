"""Fixtures of the data tests: tiny configs prepared into temporary data dirs."""

from __future__ import annotations

import dataclasses

import ml_collections
import pytest

from effattn.data import registry


def make_cfg(name: str, data_dir, *, seq_len: int, seed: int = 0, **options):
  """A `config.data` like configs/base.py builds: common fields + one sub-config per task."""
  cfg = ml_collections.ConfigDict({"name": name, "data_dir": str(data_dir), "seq_len": seq_len,
                                   "seed": seed})
  for task_name, task in registry.TASKS.items():
    cfg[task_name] = ml_collections.ConfigDict(dataclasses.asdict(task.options()))
  cfg["text" if name.startswith("tfds:") else name].update(options)
  return cfg


TINY_MQAR = dict(vocab_size=64, num_pairs=4, train_examples=300, test_examples=60)


@pytest.fixture(scope="session")
def mqar_cfg(tmp_path_factory):
  """A tiny MQAR config whose data is prepared once for the session."""
  return make_cfg("mqar", tmp_path_factory.mktemp("mqar_data"), seq_len=32, **TINY_MQAR)
