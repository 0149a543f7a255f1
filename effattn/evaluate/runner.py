"""eval.py's engine: rebuild the model from the config, restore a checkpoint, run an eval task.

Eval tasks are functions `(model, config, workdir) -> dict` registered in EVAL_TASKS (see
registry.py) and chosen with `config.eval.task`:

    accuracy   loss, accuracy, perplexity over eval.split          -> eval.json
    positions  loss by position at 1x/2x/4x/8x the training length -> eval_positions.json + .png
    passkey    passkey accuracy on a length x depth grid            -> eval_passkey.json + .png
    generate   cached greedy/sampled decoding, tokens/s, checked    -> eval_generate.json

The report is written as JSON; a task that returns a matplotlib Figure under "figure" gets it
saved beside the report as a PNG (path recorded under "plot"). Everything that can be checked
without the model (the task, its options, the report path) is checked before the restore.
The newest checkpoint that verifies is used (a damaged newer one is named in a warning and
left in place); `step=` picks one, refused if damaged.
"""

from __future__ import annotations

import json
import os

import jax
from absl import logging
from flax import nnx

from effattn.evaluate import accuracy  # noqa: F401 -- registers the "accuracy" task
from effattn.evaluate.registry import (EVAL_OPTIONS, EVAL_TASKS, load_builtin_tasks,
                                       task_options)
from effattn.kernels import matmul
from effattn.train import checkpoint as ckpt_lib
from effattn.train.errors import WorkdirError
from effattn.train.loop import build_model, resolve_config
from effattn.train.state import split_model

load_builtin_tasks()  # positions, passkey, generate


def restore_model(config, workdir: str, step: int | None = None):
  """(model with the checkpoint's params and state, step). No optimizer state is read.

  The arrays are restored onto this process's first device, whatever mesh wrote them (orbax
  reads each array's shards into the target sharding): a run trained on 8 devices with
  fsdp and tensor axes evaluates on one."""
  config = resolve_config(config)
  abstract = nnx.eval_shape(lambda: build_model(config))
  graphdef, abs_params, abs_rest = split_model(abstract)
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abs_params, abs_rest = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), (abs_params, abs_rest))
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    step, skipped = checkpointer.choose_step(step, items=ckpt_lib.MODEL_ITEMS)
    for s, why in skipped:
      logging.warning("checkpoint step %d %s; evaluating step %d instead", s, why, step)
    params, rest = checkpointer.restore_model_state(abs_params, abs_rest, step)
  finally:
    checkpointer.close()
  return nnx.merge(graphdef, params, rest), step


def report_path(config, workdir: str, output: str | None) -> str:
  task = config.eval.task
  name = "eval.json" if task == "accuracy" else f"eval_{task}.json"
  return output or os.path.join(os.path.expanduser(workdir), name)


def check_writable(path: str) -> None:
  """Fails now, in one line, if the report could not be written after the evaluation."""
  if jax.process_index() != 0:
    return
  probe = path + ".tmp"
  try:
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"cannot write the report {path} ({e.strerror}): pass --output with a "
                       "writable path") from e


def evaluate_checkpoint(config, workdir: str, *, step: int | None = None,
                        output: str | None = None) -> dict:
  task = config.eval.task
  if task not in EVAL_TASKS:
    raise ValueError(f"eval.task={task!r} is unknown; choose one of {sorted(EVAL_TASKS)}")
  if task in EVAL_OPTIONS:
    task_options(config, task)  # raises naming a bad option
  path = report_path(config, workdir, output)
  check_writable(path)
  with matmul.precision_scope(config.model.matmul_precision):  # the precision it trained at
    model, step = restore_model(config, workdir, step)
    logging.info("evaluating %s at step %d on %s", task, step, jax.default_backend())
    result = {"task": task, "step": step, "split": config.eval.split,
              **EVAL_TASKS[task](model, config, workdir)}
  figure = result.pop("figure", None)
  if jax.process_index() == 0:
    if figure is not None:
      result["plot"] = os.path.splitext(path)[0] + ".png"
      figure.suptitle(f"{os.path.basename(os.path.normpath(workdir))} (step {step})", fontsize=9)
      figure.savefig(result["plot"], dpi=120)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2)
    os.replace(tmp, path)
    print(json.dumps(result))
  return result
