"""A run's workdir: checked before use, held by one run at a time, and its saved config.

    <workdir>/.lock         held (fcntl.flock) by the run using the workdir; names its process
    <workdir>/config.json   the resolved config (checkpoint.save_config), written only once
                            the resume check below passed

The lock is an flock: the kernel drops it when its process dies, so a run killed by SIGKILL,
OOM or a lost node never blocks the restart. Only process 0 of a multi-host run takes it and
writes files (other hosts share the workdir).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket

import jax
import ml_collections
from absl import logging

from effattn.train.checkpoint import load_config
from effattn.train.errors import WorkdirError

LOCK = ".lock"

# Fields a resumed run may change: how long it runs, how it logs, evaluates and checkpoints,
# where it reads data and how it is laid out on devices. Anything else changes the model,
# the data or the optimization the checkpoints belong to.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.eval_examples",
                     "train.eval_split", "train.progress_bar", "train.profile_",
                     "checkpoint.", "eval.", "mesh.",
                     "data.data_dir", "model.attention.impl", "model.remat",
                     "model.matmul_precision")


def prepare(workdir: str) -> str:
  """Creates `workdir` if needed and returns its absolute path; refuses a file in its place."""
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory: pass a directory path")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created ({e.strerror}): pass a writable "
                       "path") from e
  return path


class WorkdirLock:
  """Exclusive hold of a workdir for one run (`with WorkdirLock(path):`)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self._fd: int | None = None

  def __enter__(self) -> "WorkdirLock":
    if jax.process_index() != 0:
      return self
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"--workdir={os.path.dirname(self.path)} is not writable "
                         f"({e.strerror}): pass a writable directory") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):  # a filesystem without flock
        os.close(fd)
        logging.warning("cannot lock %s (%s): make sure no other run uses this workdir",
                        self.path, e.strerror)
        return self
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise WorkdirError(f"--workdir={os.path.dirname(self.path)} is in use by {holder} (lock "
                         f"{self.path}): wait for that run, stop it, or pass another "
                         "--workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      # The file stays: deleting it would let a third run lock a new inode while a second
      # one waits on the old.
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_changes(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """`field (saved -> now)` for every field that differs from workdir/config.json and may not.

  Fields present on one side only (a field added or removed by a newer effattn) are not
  compared.
  """
  saved = _flat(load_config(workdir).to_dict())
  now = _flat(json.loads(config.to_json_best_effort()))
  return [f"{k} ({saved[k]!r} -> {now[k]!r})" for k in sorted(saved.keys() & now.keys())
          if saved[k] != now[k] and not k.startswith(RESUMABLE_CHANGES)]
