"""A jax.profiler trace of a window of training steps (`train.profile_steps`).

    <workdir>/profile/plugins/profile/<time>/<host>.xplane.pb   (TensorBoard's profile plugin,
                                                                  or xprof, reads it)

The window is steps profile_start + 1 .. profile_start + profile_steps (1-based, as logged):
the default start skips the compiling first step. Process 0 alone traces (its own devices).
Each step is a `StepTraceAnnotation`, so the viewer splits the trace by step.
"""

from __future__ import annotations

import contextlib
import os

import jax
from absl import logging


class StepProfiler:
  """Starts the trace before the window's first step and stops it after its last one."""

  def __init__(self, workdir: str, *, start: int, steps: int):
    self.directory = os.path.join(workdir, "profile")
    self.first, self.last = start, start + steps  # loop indices: the window is [first, last)
    self.enabled = steps > 0 and jax.process_index() == 0
    self.active = False

  def step(self, step: int) -> contextlib.AbstractContextManager:
    """Around loop step `step` (0-based): starts the trace at the window's first step."""
    if not self.enabled:
      return contextlib.nullcontext()
    if step == self.first and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True
    return jax.profiler.StepTraceAnnotation("train", step_num=step + 1)

  def after(self, done: int, outputs) -> None:
    """After a step: at the window's end, waits for `outputs` (the step's work) and stops."""
    if self.active and done >= self.last:
      jax.block_until_ready(outputs)
      self.stop()
      logging.info("profile of steps %d-%d written to %s", self.first + 1, self.last,
                   self.directory)

  def stop(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
