"""Which path (a Pallas kernel, XLA, cuDNN, the reference) an op takes, logged once per choice.

Every op's dispatcher calls `log_path_once(op, path, why)`, so a run's log says once per
distinct (op, path, reason) what actually ran, without repeating it at every trace.
"""

from __future__ import annotations

from absl import logging

_LOGGED: set[tuple[str, str, str]] = set()


def log_path_once(op: str, path: str, why: str = "") -> None:
  key = (op, path, why)
  if key not in _LOGGED:
    _LOGGED.add(key)
    logging.info("effattn %s: using %s path%s", op, path, f" ({why})" if why else "")
