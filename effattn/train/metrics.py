"""Metric writers: TensorBoard event files (tensorboardX, no TensorFlow) and metrics.jsonl."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


class MetricWriter:
  """Writes scalars to TensorBoard and one JSON object per step to metrics.jsonl.

  Only process 0 writes, so multi-host runs produce one set of files.
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(os.path.expanduser(workdir), "metrics.jsonl")
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # imported here: optional for library users
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      self._tb = SummaryWriter(os.path.expanduser(workdir))

  def write(self, step: int, scalars: dict[str, float], *, prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {f"{prefix}{k}": float(np.asarray(v)) for k, v in scalars.items()}
    for k, v in row.items():
      self._tb.add_scalar(k, v, step)
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, "time": time.time(), **row}) + "\n")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self, *, quiet: bool = False) -> None:
    """Flushes and closes; quiet=True ignores a failing close (a run already stopping)."""
    if self._tb is None:
      return
    tb, self._tb = self._tb, None
    try:
      tb.close()
    except Exception:  # noqa: BLE001
      if not quiet:
        raise


def read_metrics(workdir: str) -> list[dict]:
  """All rows of workdir/metrics.jsonl (a resumed run appends; later rows win per step)."""
  path = os.path.join(os.path.expanduser(workdir), "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
