"""SIGINT and SIGTERM as a request to save and stop, so an interrupted run keeps its steps.

Clusters preempt jobs with SIGTERM (then SIGKILL after a grace period); Ctrl-C sends SIGINT.
Inside `StopSignals`, the first of either is recorded. Code that must not be cut (a train step
that donates its input state, a checkpoint save) runs under `deferred()` and the loop asks
`check()` between steps; elsewhere (setup, evaluation) the signal raises `Interrupted` at once.
The first signal restores the previous handlers, so a second one stops the process the usual
way (KeyboardInterrupt or termination) without saving.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from effattn.train.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
  """Context manager turning SIGINT / SIGTERM into `Interrupted` at a safe point."""

  def __init__(self):
    self.signum: int | None = None
    self._deferred = 0
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread
      for sig in SIGNALS:
        previous = signal.getsignal(sig)
        if previous is signal.SIG_IGN:  # e.g. SIGINT of a background job: stays ignored
          continue
        self._previous[sig] = previous
        signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    self._restore()

  def _restore(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    self.signum = signum
    self._restore()  # a second signal acts at once
    if not self._deferred:
      raise Interrupted(signum)

  @contextlib.contextmanager
  def deferred(self):
    """A signal arriving inside is raised by the next `check()`, not here."""
    self._deferred += 1
    try:
      yield
    finally:
      self._deferred -= 1

  def check(self) -> None:
    if self.signum is not None:
      raise Interrupted(self.signum)
