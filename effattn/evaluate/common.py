"""Pieces the eval tasks share: per-token losses, data at another length, labels for plots."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effattn import data as data_lib
from effattn.model import pattern
from effattn.train.step import forward


@functools.cache
def _token_loss_fn(graphdef):
  # One compiled function per model structure (the GraphDef is hashable); jit retraces per shape.
  def fn(params, rest, batch):
    logits, _, _ = forward(graphdef, params, rest, batch, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    correct = jnp.argmax(logits, -1) == batch["targets"]
    return ce.astype(jnp.float32), correct

  return jax.jit(fn)


def token_losses(graphdef, params, rest, batch) -> tuple[np.ndarray, np.ndarray]:
  """Cross entropy float32 [B, T] and argmax-correct bool [B, T] of every target token."""
  model_batch = {k: batch[k] for k in ("inputs", "targets", "segment_ids", "positions")}
  ce, correct = jax.device_get(_token_loss_fn(graphdef)(params, rest, model_batch))
  return np.asarray(ce), np.asarray(correct)


def data_at_length(data_cfg, seq_len: int) -> dict:
  """`data_cfg` (config.data) as a plain dict with data.seq_len = seq_len.

  At a length other than the configured one the task's train split is cut to one example (where
  the task has `train_examples`): evaluation reads only held-out splits, and the builders draw
  those first, so they do not depend on the train split's size.
  """
  cfg = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  if seq_len != cfg["seq_len"]:
    cfg["seq_len"] = int(seq_len)
    task = cfg["name"]
    if isinstance(cfg.get(task), dict) and "train_examples" in cfg[task]:
      cfg[task] = {**cfg[task], "train_examples": 1}
  return cfg


def rows_per_batch(tokens_per_batch: int, seq_len: int) -> int:
  """Rows of seq_len tokens in a batch of about tokens_per_batch tokens (at least 1)."""
  return max(1, tokens_per_batch // seq_len)


def require_lm(config, task: str) -> None:
  info = data_lib.task_info(config.data)
  if info.kind != "lm" or config.model.head != "lm":
    raise ValueError(f"eval.task={task!r} needs a language model (model.head='lm'), but "
                     f"data.name={config.data.name!r} is a {info.kind} task: use "
                     f"eval.task=accuracy")


def run_label(config) -> str:
  """e.g. 'softmax (window 32)' or '3*lightning,softmax': names a run's mechanisms in plot
  titles."""
  att = config.model.attention
  extras = []
  if att.get("window"):
    extras.append(f"window {att.window}")
  if att.get("num_kv_heads") and att.num_kv_heads != config.model.num_heads:
    extras.append(f"{att.num_kv_heads} kv heads")
  return pattern.describe(config.model) + (f" ({', '.join(extras)})" if extras else "")
