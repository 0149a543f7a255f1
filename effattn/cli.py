"""Shared behaviour of the entry points (train.py, eval.py, scripts/): one line per failure.

A bad flag, a bad config field, a refused workdir or checkpoint, a NaN, a full disk, a signal:
each ends the process with one line on stderr and a status (2: bad input, 1: the run failed,
128 + N: stopped by signal N). EFFATTN_TRACEBACK=1 shows full tracebacks instead.
"""

from __future__ import annotations

import logging as pylogging
import os
import re
import sys
import threading
from typing import Any, Callable

from absl import flags, logging

from effattn.config import ConfigError
from effattn.train.errors import CheckpointError, Interrupted, RunError, is_disk_full, short

# Errors that describe bad input: shown as one line, not a traceback.
USER_ERRORS = (ConfigError, CheckpointError, ValueError, FileNotFoundError)


_quiet = threading.Event()  # a full disk seen, or the run's failure already reported


def _tracebacks() -> bool:
  return bool(os.environ.get("EFFATTN_TRACEBACK"))


class _OwnInfoOnly(pylogging.Filter):
  """Keeps effattn's INFO lines and every library's warnings (orbax logs a lot at INFO).

  A library's record is cut to its first line, without traceback: a failure that matters
  reaches the entry point and is reported there once (orbax logs each failed save thread).
  """

  def filter(self, record: pylogging.LogRecord) -> bool:
    if f"{os.sep}effattn{os.sep}" in record.pathname:
      return True
    if record.levelno < pylogging.WARNING:
      return False
    if _tracebacks():
      return True
    if _quiet.is_set():
      return False
    if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
      return False  # a failed save; the trainer raises it as one line
    record.msg, record.args = record.getMessage().split("\n", 1)[0][:300], None
    record.exc_info = record.exc_text = None
    return True


def setup_logging() -> None:
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())


def _background_failure(where: str, error: BaseException) -> None:
  """A crash outside the main thread (a writer thread, an atexit hook) in one line at most.

  A full disk, and whatever breaks after one or while the process exits after its report, is
  left to the main thread's report.
  """
  if is_disk_full(error):
    _quiet.set()
  if not _quiet.is_set():
    print(f"warning: {where} failed: {short(error)}", file=sys.stderr)


def _thread_failed(args) -> None:
  if _tracebacks():
    threading.__excepthook__(args)
  else:
    _background_failure(args.thread.name if args.thread is not None else "a thread",
                        args.exc_value)


def _unraisable(args) -> None:
  if _tracebacks():
    sys.__unraisablehook__(args)
  elif "Event loop is closed" not in str(args.exc_value):  # orbax's shutdown after a failed save
    _background_failure(args.err_msg or "cleanup", args.exc_value)


def _one_line(error: BaseException) -> tuple[str, int] | None:
  """(line, exit status) for errors reported without traceback, else None."""
  if isinstance(error, Interrupted):
    return str(error), error.exit_code
  if isinstance(error, KeyboardInterrupt):  # eval.py, or a second Ctrl-C while train.py saves
    return "stopped by SIGINT; nothing more was saved", 130
  if isinstance(error, RunError):
    return f"error: {error}", error.exit_code
  if isinstance(error, USER_ERRORS):
    return f"error: {error}", 2
  if is_disk_full(error):
    return f"error: no space left on device ({short(error)}): free space and run again", 1
  return None


def run_main(fn: Callable[[], Any]) -> Any:
  """Runs fn; a known failure prints one line and exits (EFFATTN_TRACEBACK=1 raises)."""
  setup_logging()
  _quiet.clear()
  threading.excepthook = _thread_failed
  sys.unraisablehook = _unraisable
  try:
    return fn()
  except BaseException as e:
    reported = None if _tracebacks() else _one_line(e)
    if reported is None:
      raise
    line, status = reported
    _quiet.set()  # threads and atexit hooks failing on the way out add nothing
    print(line.replace("\n", " "), file=sys.stderr)
    sys.exit(status)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing with one-line errors: pass as `app.run(main, flags_parser=...)`.

  Config files are loaded here (ml_collections loads them lazily), so a missing file or a
  misspelled `--config.<field>` (with ml_collections' suggestion) fails before anything runs.
  """
  try:
    rest = flag_values(argv)
    for name in ("config",):
      if name in flag_values and flag_values[name].value is not None:
        flag_values[name].value.keys()  # raises the load error of a missing or broken file
    return rest
  except Exception as e:  # noqa: BLE001 -- whatever parsing raised, the user gets one line
    if _tracebacks():
      raise
    print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
    sys.exit(2)


def _flag_error(error: Exception, argv: list[str]) -> str:
  text = str(error).strip()
  if isinstance(error, flags.Error):
    return f"{text.splitlines()[0]} (see --helpfull)"
  if isinstance(error, (KeyError, AttributeError)):
    # ml_collections: KeyError("'d_modle'\nDid you mean \"d_model\" instead of \"d_modle\"?")
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    key = suggestion.group(2) if suggestion else text.split("\\n")[0].strip("'\"\\ ")
    given = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.")
                  and key in a.split("=", 1)[0].split(".")[1:]), f"--config.<...>.{key}")
    hint = f'; did you mean "{suggestion.group(1)}"?' if suggestion else ""
    return f"{given}: no such config field{hint}"
  if isinstance(error, OSError):
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
      path = argv[argv.index("--config") + 1]
    reason = text.splitlines()[-1].strip()
    return f"--config={path}: cannot load the config file ({reason})"
  return f"bad command line: {short(error)}"


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
