"""Shared behaviour of the entry points (train.py, eval.py, scripts/)."""

from __future__ import annotations

import logging as pylogging
import os
import sys
from typing import Any, Callable

from absl import logging

from effattn.config import ConfigError
from effattn.train.checkpoint import CheckpointError

# Errors that describe bad input: shown as one line, not a traceback.
USER_ERRORS = (ConfigError, CheckpointError, ValueError, FileNotFoundError)


class _OwnInfoOnly(pylogging.Filter):
  """Keeps effattn's INFO lines and every library's warnings (orbax logs a lot at INFO)."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or f"{os.sep}effattn{os.sep}" in record.pathname


def setup_logging() -> None:
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())


def run_main(fn: Callable[[], Any]) -> Any:
  """Runs fn; a user error prints `error: <message>` and exits 2 (EFFATTN_TRACEBACK=1 raises)."""
  setup_logging()
  try:
    return fn()
  except USER_ERRORS as e:
    if os.environ.get("EFFATTN_TRACEBACK"):
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def default_config_from_workdir(argv: list[str]) -> list[str]:
  """Adds `--config=configs/saved.py:<workdir>` when no --config is given."""
  if any(a == "--config" or a.startswith("--config=") for a in argv):
    return argv
  workdir = None
  for i, a in enumerate(argv):
    if a.startswith("--workdir="):
      workdir = a.split("=", 1)[1]
    elif a == "--workdir" and i + 1 < len(argv):
      workdir = argv[i + 1]
  if workdir is None:
    return argv
  if not os.path.exists(os.path.join(os.path.expanduser(workdir), "config.json")):
    print(f"error: {workdir}/config.json not found: --workdir must be a directory written by "
          "train.py (or pass --config)", file=sys.stderr)
    sys.exit(2)
  saved = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                       "saved.py")
  return [argv[0], f"--config={saved}:{workdir}", *argv[1:]]
