"""Tiny configs for the trainer and evaluation tests: a step costs milliseconds on CPU.

Each function shrinks a config tree of configs/base.py (a fresh `base_config()` unless one is
given) and returns it. configs/ belongs to the repository, not to the installed package: it is
imported when first needed, from the repository root (where tests and scripts run).
"""

from __future__ import annotations

import ml_collections

from effattn.train import loop


def base_config() -> ml_collections.ConfigDict:
  """A fresh configs/base.py tree."""
  try:
    from configs import base  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("effattn.testing needs the repository's configs/ package: run from the "
                      "repository root") from e
  return base.get_config()


def tiny_trainer(data_dir: str, *, d_model: int = 32, config=None,
                 **train) -> ml_collections.ConfigDict:
  """A 2-layer, 2-head MQAR model trained 24 steps with checkpoints every 8 (synchronous);
  `train` overrides config.train fields."""
  config = base_config() if config is None else config
  m = config.model
  m.d_model, m.num_heads, m.mlp = d_model, 2, "none"
  m.attention.impl = "xla"
  config.data.name, config.data.data_dir, config.data.seq_len = "mqar", data_dir, 16
  config.data.mqar.update(vocab_size=32, num_pairs=2, train_examples=512, test_examples=64)
  config.train.update(steps=24, batch_size=16, log_every=4, eval_every=0, progress_bar=False)
  config.checkpoint.every, config.checkpoint.async_save = 8, False
  config.optimizer.warmup_steps = 4
  config.train.update(train)
  return config


def tiny_subprocess_trainer(data_dir: str, config=None) -> ml_collections.ConfigDict:
  """The run of the fault tests' subprocesses (tests/train/tiny.py is its config file): one
  16-wide layer, 8 steps, a checkpoint every 2 steps, async saves."""
  config = tiny_trainer(data_dir, d_model=16, steps=8, config=config)
  config.model.num_layers = 1  # compiles in half the time
  config.train.log_every = 2
  config.checkpoint.every, config.checkpoint.async_save = 2, True
  return config


def tiny_eval(data_dir: str, task: str = "mqar", config=None) -> ml_collections.ConfigDict:
  """A 2-layer model on a tiny MQAR (seq_len 16) or passkey (seq_len 128) task, 2 train steps,
  eval batches of 8."""
  config = base_config() if config is None else config
  m = config.model
  m.d_model, m.num_layers, m.num_heads, m.mlp = 32, 2, 2, "none"
  config.data.data_dir, config.data.name = data_dir, task
  if task == "mqar":
    config.data.seq_len = 16
    config.data.mqar.update(vocab_size=32, num_pairs=2, train_examples=64, test_examples=24)
  elif task == "passkey":
    config.data.seq_len = 128
    config.data.passkey.update(include_description=False, train_examples=32, test_examples=8)
  config.train.update(steps=2, batch_size=8, log_every=1, eval_every=0, progress_bar=False)
  config.checkpoint.async_save = False
  config.eval.batch_size = 8
  return config


def fresh_model(config):
  """(an untrained model, the resolved config): vocab size from the task, validated."""
  config = loop.resolve_config(config)
  return loop.build_model(config), config
