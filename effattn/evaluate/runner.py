"""eval.py's engine: rebuild the model from the config, restore a checkpoint, run an eval task.

Eval tasks are functions `(model, config, workdir) -> dict` registered in EVAL_TASKS and chosen
with `config.eval.task`; the report is written as JSON.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
from absl import logging
from flax import nnx

from effattn.evaluate.accuracy import evaluate_split
from effattn.train import checkpoint as ckpt_lib
from effattn.train.loop import build_model, resolve_config
from effattn.train.state import split_model


def accuracy_task(model, config, workdir) -> dict:
  """Loss, accuracy and perplexity over config.eval.split (the trainer's eval metric)."""
  del workdir
  graphdef, params, rest = split_model(model)
  return evaluate_split(graphdef, params, rest, config.data, config.eval.split,
                        batch_size=config.eval.batch_size, max_examples=config.eval.max_examples)


EVAL_TASKS: dict[str, Callable] = {"accuracy": accuracy_task}


def register_eval_task(name: str):
  def wrap(fn):
    EVAL_TASKS[name] = fn
    return fn
  return wrap


def restore_model(config, workdir: str, step: int | None = None):
  """(model with the checkpoint's params and state, step). No optimizer state is read."""
  config = resolve_config(config)
  abstract = nnx.eval_shape(lambda: build_model(config))
  graphdef, abs_params, abs_rest = split_model(abstract)
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    params, rest, step = checkpointer.restore_model_state(abs_params, abs_rest, step)
  finally:
    checkpointer.close()
  return nnx.merge(graphdef, params, rest), step


def evaluate_checkpoint(config, workdir: str, *, step: int | None = None,
                        output: str | None = None) -> dict:
  task = config.eval.task
  if task not in EVAL_TASKS:
    raise ValueError(f"eval.task={task!r} is unknown; choose one of {sorted(EVAL_TASKS)}")
  model, step = restore_model(config, workdir, step)
  logging.info("evaluating %s at step %d on %s", task, step, jax.default_backend())
  result = {"task": task, "step": step, "split": config.eval.split,
            **EVAL_TASKS[task](model, config, workdir)}
  name = "eval.json" if task == "accuracy" else f"eval_{task}.json"
  path = output or os.path.join(os.path.expanduser(workdir), name)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, path)
  print(json.dumps(result))
  return result
