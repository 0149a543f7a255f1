"""Tiny data configs for the data tests (importing this pulls in no trainer, TFDS or TF)."""

from __future__ import annotations

import dataclasses

import ml_collections

from effattn.data import registry as data_registry

# A tiny MQAR task (data.mqar options) that prepares in well under a second.
TINY_MQAR = dict(vocab_size=64, num_pairs=4, train_examples=300, test_examples=60)


def data_config(name: str, data_dir, *, seq_len: int, seed: int = 0,
                **options) -> ml_collections.ConfigDict:
  """A `config.data` like configs/base.py builds (common fields + one section per task), with
  `options` set in task `name`'s section ("text" for "tfds:..." names)."""
  cfg = ml_collections.ConfigDict({"name": name, "data_dir": str(data_dir), "seq_len": seq_len,
                                   "seed": seed})
  for task_name, task in data_registry.TASKS.items():
    cfg[task_name] = ml_collections.ConfigDict(dataclasses.asdict(task.options()))
  cfg["text" if name.startswith("tfds:") else name].update(options)
  return cfg
