"""Orbax checkpoints of the train state, and the run's config saved beside them.

Layout of a workdir:
    config.json          the resolved config of the run (eval.py rebuilds the model from it)
    checkpoints/<step>/  params, rest (non-gradient state), opt_state; orbax writes each step
                         to a temporary folder and renames it when complete, so a step folder
                         is either whole or absent
    metrics.jsonl, events.out.tfevents.*  metrics
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ("params", "opt_state", "model_state")


def _items(state) -> dict:
  # `rest` is empty for most mechanisms and orbax refuses empty items, so it travels with `step`.
  return {"params": state.params, "opt_state": state.opt_state,
          "model_state": {"step": state.step, "rest": state.rest}}


class CheckpointError(RuntimeError):
  """A checkpoint is missing or unreadable."""


class Checkpointer:
  """Periodic, keep-N, atomic checkpoints of TrainState fields under `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, every: int = 1, keep: int = 3, async_save: bool = False,
               read_only: bool = False):
    self.directory = epath.Path(workdir).expanduser().resolve() / "checkpoints"
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save,
        # A run killed mid-save leaves a temporary folder; it is never a restorable step.
        cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def maybe_save(self, step: int, state, *, force: bool = False) -> bool:
    if not force and step % self.every:
      return False
    if step in self.all_steps():
      return False
    args = ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in _items(state).items()})
    return self.manager.save(step, args=args, force=True)

  def _step_or_latest(self, step: int | None) -> int:
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}; train first or check --workdir")
    if step is None:
      return max(steps)
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                            f"available: {sorted(steps)}")
    return step

  def restore(self, abstract_state, step: int | None = None):
    """Full train state at `step` (latest if None), shaped and sharded like `abstract_state`."""
    step = self._step_or_latest(step)
    items = {k: ocp.args.StandardRestore(v) for k, v in _items(abstract_state).items()}
    restored = self._restore(step, items)
    state = abstract_state.replace(params=restored["params"], opt_state=restored["opt_state"],
                                   step=restored["model_state"]["step"],
                                   rest=restored["model_state"]["rest"])
    return state, step

  def restore_model_state(self, abstract_params, abstract_rest, step: int | None = None):
    """(params, rest, step): what evaluation needs, without the optimizer state."""
    step = self._step_or_latest(step)
    model_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "rest": abstract_rest}
    restored = self._restore(step, {"params": ocp.args.StandardRestore(abstract_params),
                                    "model_state": ocp.args.StandardRestore(model_state)})
    return restored["params"], restored["model_state"]["rest"], step

  def _restore(self, step: int, items: dict[str, Any]):
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types; the user needs the path and the choices
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} is unreadable or does not match the "
          f"model ({type(e).__name__}: {str(e).splitlines()[0][:200]}); delete that step folder "
          f"or pass --step with one of {self.all_steps()}") from e

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes workdir/config.json atomically (temp file + rename)."""
  path = os.path.join(os.path.expanduser(workdir), "config.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.expanduser(workdir), "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{path} not found: --workdir must be a directory written by train.py")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is corrupt ({e}); restore it or retrain") from e


def merge_into(base: ml_collections.ConfigDict, saved: ml_collections.ConfigDict):
  """Copies saved values over `base` recursively (keeps base's field types and unknown-key lock).

  Fields that exist only in `saved` (from an older code version) are ignored.
  """
  with base.unlocked():
    for key, value in saved.items():
      if key not in base:
        continue
      if isinstance(base[key], ml_collections.ConfigDict) and hasattr(value, "items"):
        merge_into(base[key], value)
      else:
        base[key] = value
  return base
