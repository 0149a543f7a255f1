"""Orbax checkpoints of the train state, sealed with checksums, and the run's config beside them.

Layout of a workdir:
    config.json          the resolved config of the run (eval.py rebuilds the model from it)
    checkpoints/<step>/  params, rest (non-gradient state), opt_state; orbax writes each step
                         to a temporary folder and renames it when complete, then
                         effattn_manifest.json (manifest.py) records the sha256 of every file
    checkpoints_damaged/<step>/  steps that failed verification, moved aside by a resuming run
    metrics.jsonl, events.out.tfevents.*  metrics

What orbax does (async writes, keep-N, atomic commit, resharding on restore) is used as is; this
module adds the seal (a step counts as saved only once sealed), verification on restore with
fallback to the newest step that verifies, and one-line errors.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from effattn.train import manifest
from effattn.train.errors import CheckpointError, SaveError, is_disk_full, short

ITEMS = ("params", "opt_state", "model_state")
MODEL_ITEMS = ("params", "model_state")  # what evaluation reads
DAMAGED = "checkpoints_damaged"


def _items(state) -> dict:
  # `rest` is empty for most mechanisms and orbax refuses empty items, so it travels with `step`.
  return {"params": state.params, "opt_state": state.opt_state,
          "model_state": {"step": state.step, "rest": state.rest}}


class Checkpointer:
  """Periodic, keep-N, atomic, sealed checkpoints of TrainState fields under workdir/checkpoints.

  Saves run in the background (orbax async) and are sealed in the background once orbax has
  committed them (`poll`, called by the loop, starts the seal); `wait` finishes both and
  raises a failed save's error as one line.
  """

  def __init__(self, workdir: str, *, every: int = 1, keep: int = 3, async_save: bool = False,
               read_only: bool = False):
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    self.directory = epath.Path(self.workdir) / "checkpoints"
    self.every = every
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save,
        # A run killed mid-save leaves a temporary folder; it is never a restorable step.
        cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self._committing: list[int] = []  # handed to orbax, not yet known to be committed
    self._sealing: list[tuple[int, concurrent.futures.Future]] = []
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="effattn-seal")

  def step_dir(self, step: int) -> str:
    return os.path.join(str(self.directory), str(step))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def last_saved(self) -> int | None:
    """The newest sealed step: complete, flushed to disk and checksummed."""
    sealed = [s for s in self.all_steps() if manifest.is_sealed(self.step_dir(s))]
    return max(sealed) if sealed else None

  # Saving.

  def maybe_save(self, step: int, state, *, force: bool = False) -> bool:
    if not force and step % self.every:
      return False
    if step in self.all_steps():
      return False
    # orbax waits for the previous save anyway; its seal goes on beside this one.
    self._collect_commits()
    self._collect_seals(block=False)
    args = ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in _items(state).items()})
    try:
      saved = self.manager.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many types
      raise self._failed(step, e) from e
    if saved:
      self._committing.append(step)
      self.poll()
    return saved

  def _saving(self) -> bool:
    return bool(getattr(self.manager, "is_saving_in_progress", lambda: True)())

  def poll(self) -> None:
    """Starts sealing the steps orbax has committed; raises the error of a failed save or seal."""
    if self._committing and not self._saving():
      self._collect_commits()
    self._collect_seals(block=False)

  def _collect_commits(self) -> None:
    if not self._committing:
      return
    steps, self._committing = self._committing, []
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._failed(steps[-1], e) from e
    for step in steps:
      if not os.path.isdir(self.step_dir(step)):
        raise self._failed(step, FileNotFoundError(f"{self.step_dir(step)} was not committed"))
      self._sealing.append((step, self._pool.submit(self._seal, step)))

  def _seal(self, step: int) -> None:
    if jax.process_index() != 0:  # process 0 writes the manifest of every process's files
      return
    try:
      stats = manifest.seal(self.step_dir(step))
    except FileNotFoundError:
      if not os.path.isdir(self.step_dir(step)):
        return  # keep-N removed it (keep=1): a newer step superseded it while it was sealed
      raise
    logging.info("checkpoint step %d saved in %s (%d files, %.2f MB; sealed with sha256 in "
                 "%.3f s)", step, self.directory, stats["files"], stats["bytes"] / 1e6,
                 stats["seconds"])

  def _collect_seals(self, *, block: bool) -> None:
    pending = []
    for step, future in self._sealing:
      if block or future.done():
        try:
          future.result()
        except Exception as e:  # noqa: BLE001
          self._sealing = [p for p in self._sealing if p[0] != step and not p[1].done()]
          raise self._failed(step, e, doing="sealing") from e
      else:
        pending.append((step, future))
    self._sealing = pending

  def wait(self) -> None:
    """Finishes every pending save and seal; raises SaveError (one line) if one failed."""
    self._collect_commits()
    self._collect_seals(block=True)

  def abandon(self) -> BaseException | None:
    """`wait` for a run that is stopping on another error: returns a save error, never raises.

    A save that failed leaves only orbax's temporary folder, removed when the next run starts.
    """
    try:
      self.wait()
      return None
    except Exception as e:  # noqa: BLE001
      return e

  def _failed(self, step: int, error: BaseException, doing: str = "saving") -> SaveError:
    concurrent.futures.wait([f for _, f in self._sealing])  # so "last saved" is up to date
    last = self.last_saved()
    kept = f"last saved checkpoint: step {last}" if last is not None else "no checkpoint saved"
    if is_disk_full(error):
      return SaveError(f"no space left on device {doing} checkpoint step {step} in "
                       f"{self.directory} ({kept}): free space, then run the same command to "
                       "resume")
    return SaveError(f"{doing} checkpoint step {step} in {self.directory} failed "
                     f"({short(error)}); {kept}")

  # Restoring.

  def choose_step(self, step: int | None = None, items: tuple[str, ...] = ITEMS
                  ) -> tuple[int, list[tuple[int, str]]]:
    """(step to restore, [(newer step, why it was passed over)]).

    With `step`, that step (refused if damaged); else the newest step whose files of `items`
    verify. A step without a manifest (older effattn, or a run cut between commit and seal) is
    used only when no step verifies, with a warning.
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}; train first or check --workdir")
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available: "
                              f"{steps}")
      candidates = [step]
    else:
      candidates = steps[::-1]
    skipped: list[tuple[int, str]] = []
    for s in candidates:
      why = manifest.problem(self.step_dir(s), items)
      if why is None:
        return s, skipped
      skipped.append((s, why))
    if step is not None and manifest.is_sealed(self.step_dir(step)):
      raise CheckpointError(f"checkpoint step {step} in {self.directory} {skipped[0][1]}: it is "
                            f"damaged; choose another of {steps}")
    unsealed = [s for s, _ in skipped if not manifest.is_sealed(self.step_dir(s))]
    if unsealed:
      logging.warning("checkpoint step %d in %s has no checksum manifest; restoring it "
                      "unverified", unsealed[0], self.directory)
      return unsealed[0], [(s, why) for s, why in skipped if s > unsealed[0]]
    problems = "; ".join(f"step {s} {why}" for s, why in skipped)
    raise CheckpointError(f"no checkpoint in {self.directory} passes verification ({problems}): "
                          "the files were changed after they were written; restore them from a "
                          "copy or retrain")

  def set_aside(self, steps: list[int]) -> str:
    """Moves damaged steps to workdir/checkpoints_damaged (nothing is deleted); returns it."""
    target = os.path.join(self.workdir, DAMAGED)
    if jax.process_index() == 0 and steps:
      os.makedirs(target, exist_ok=True)
      for step in steps:
        dest, n = os.path.join(target, str(step)), 1
        while os.path.exists(dest):
          dest, n = os.path.join(target, f"{step}.{n}"), n + 1
        shutil.move(self.step_dir(step), dest)
      self.manager.reload()
    return target

  def restore(self, abstract_state, step: int):
    """Full train state at `step`, shaped and sharded like `abstract_state`."""
    items = {k: ocp.args.StandardRestore(v) for k, v in _items(abstract_state).items()}
    restored = self._restore(step, items)
    return abstract_state.replace(params=restored["params"], opt_state=restored["opt_state"],
                                  step=restored["model_state"]["step"],
                                  rest=restored["model_state"]["rest"])

  def restore_model_state(self, abstract_params, abstract_rest, step: int):
    """(params, rest): what evaluation needs, without the optimizer state."""
    model_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "rest": abstract_rest}
    restored = self._restore(step, {"params": ocp.args.StandardRestore(abstract_params),
                                    "model_state": ocp.args.StandardRestore(model_state)})
    return restored["params"], restored["model_state"]["rest"]

  def _restore(self, step: int, items: dict[str, Any]):
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 -- orbax raises many types; the user needs one line
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} does not fit the model built from the "
          f"config ({short(e)}); run with the config it was written with (its config.json)"
      ) from e

  def close(self, *, quiet: bool = False) -> None:
    """Closes orbax's manager; quiet=True (a run stopping on an error) ignores its errors."""
    try:
      self.manager.close()
    except Exception:  # noqa: BLE001 -- a failed save's error, already reported
      if not quiet:
        raise
    finally:
      self._pool.shutdown(wait=True)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes workdir/config.json atomically (temp file + rename); only process 0 writes."""
  if jax.process_index() != 0:
    return
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
