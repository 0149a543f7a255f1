"""Tiny MQAR configs for the trainer tests: a step costs milliseconds on CPU."""

from __future__ import annotations

from configs import base


def tiny_config(data_dir: str, *, d_model: int = 32, **train):
  config = base.get_config()
  config.model.d_model = d_model
  config.model.num_heads = 2
  config.model.mlp = "none"
  config.model.attention.impl = "xla"
  config.data.name = "mqar"
  config.data.data_dir = data_dir
  config.data.seq_len = 16
  config.data.mqar.vocab_size = 32
  config.data.mqar.num_pairs = 2
  config.data.mqar.train_examples = 512
  config.data.mqar.test_examples = 64
  config.train.steps = 24
  config.train.batch_size = 16
  config.train.log_every = 4
  config.train.eval_every = 0
  config.train.progress_bar = False
  config.checkpoint.every = 8
  config.checkpoint.async_save = False
  config.optimizer.warmup_steps = 4
  for k, v in train.items():
    config.train[k] = v
  return config


def get_config(data_dir: str):
  """For subprocess runs: `train.py --config=tests/train/tiny.py:<data_dir> --config.x=...`."""
  config = tiny_config(data_dir, d_model=16, steps=8)
  config.model.num_layers = 1  # compiles in half the time
  config.train.log_every = 2
  config.checkpoint.every = 2
  config.checkpoint.async_save = True
  return config
