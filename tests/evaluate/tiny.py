"""Tiny configs and fresh (untrained) models for the eval-task tests."""

from __future__ import annotations

from configs import base
from effattn.train.loop import build_model, resolve_config


def tiny_config(data_dir: str, task: str = "mqar"):
  config = base.get_config()
  config.model.d_model = 32
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.mlp = "none"
  config.data.data_dir = data_dir
  config.data.name = task
  if task == "mqar":
    config.data.seq_len = 16
    config.data.mqar.update(vocab_size=32, num_pairs=2, train_examples=64, test_examples=24)
  elif task == "passkey":
    config.data.seq_len = 128
    config.data.passkey.update(include_description=False, train_examples=32, test_examples=8)
  config.train.steps = 2
  config.train.batch_size = 8
  config.train.log_every = 1
  config.train.eval_every = 0
  config.train.progress_bar = False
  config.checkpoint.async_save = False
  config.eval.batch_size = 8
  return config


def fresh_model(config):
  config = resolve_config(config)
  return build_model(config), config
