"""Why a run stopped, as exceptions whose message is the one line the user sees.

The entry points (effattn/cli.py) print `error: <message>` for any RunError and exit with its
`exit_code`; EFFATTN_TRACEBACK=1 shows the traceback instead.
"""

from __future__ import annotations

import errno
import signal


class RunError(RuntimeError):
  """A run cannot go on; str(e) is one line naming what and the fix."""

  exit_code = 1


class CheckpointError(RunError):
  """A checkpoint is missing, damaged or does not match the model."""

  exit_code = 2


class WorkdirError(RunError):
  """The workdir cannot be used: a file, not writable, held by another run, a changed config."""

  exit_code = 2


class NonFiniteLossError(RunError, FloatingPointError):
  """The loss, the gradients, the parameters or the optimizer state became NaN or inf."""


class SaveError(RunError):
  """Writing a checkpoint or a report failed (a full disk among others)."""


class Interrupted(RunError):
  """SIGINT or SIGTERM stopped the run after saving; exit status 128 + the signal number."""

  def __init__(self, signum: int, message: str = ""):
    super().__init__(message or f"stopped by {signal.Signals(signum).name}")
    self.signum = signum
    self.exit_code = 128 + signum


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException | None) -> bool:
  """True when `error` or an exception it was raised from is a full disk or quota.

  tensorstore (orbax's writer) raises ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']")
  rather than OSError, so the message is read too.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
      return True
    text = str(error)
    if any(f"os_error_code='{code}'" in text for code in _DISK_FULL) or \
        "No space left on device" in text:
      return True
    error = error.__cause__ or error.__context__
  return False


def short(error: BaseException, limit: int = 160) -> str:
  """`Type: first line` of the innermost useful message of `error` (one line, at most limit).

  tensorstore's messages end in a JSON spec and sometimes print a pybind11 bound method in
  place of their detail; both are cut.
  """
  chain = []
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in reversed(chain):  # the innermost exception usually says what happened
    text = _clean(str(e))
    if text:
      break
  else:
    e, text = chain[0], ""
  line = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return line if len(line) <= limit else line[:limit - 3] + "..."


def _clean(text: str) -> str:
  for marker in (" [tensorstore_spec=", "See full TensorStore details", "<bound method"):
    cut = text.find(marker)
    if cut >= 0:
      text = text[:cut]
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  return lines[0].rstrip(" .:;,") if lines else ""
