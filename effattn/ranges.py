"""Allowed ranges of numeric settings, and the one-line error for a value outside them.

    Range(lo=0, lo_open=True).check("optimizer.learning_rate", 3e-3)   # ok
    Range(0, 1).check("optimizer.b1", 1.5)
    # ConfigError: optimizer.b1=1.5 must be in [0, 1]

Every numeric field of configs/base.py (and every numeric option of a mechanism or a task)
declares one; `effattn.config.validate` checks them all before anything runs, and a test walks
every field with `Range.outside()` to prove each check fires.
"""

from __future__ import annotations

import dataclasses
import math


class ConfigError(ValueError):
  """A config field has a bad value; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Range:
  """lo <= value <= hi (or strict with lo_open / hi_open); None leaves that side open.

  integer: the value must be a whole number; none_ok: None is allowed too ("derive it").
  """

  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  integer: bool = False
  none_ok: bool = False

  def __str__(self) -> str:
    if self.lo is not None and self.hi is not None:
      return (f"in {'(' if self.lo_open else '['}{_num(self.lo)}, "
              f"{_num(self.hi)}{')' if self.hi_open else ']'}")
    if self.lo is not None:
      return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
    if self.hi is not None:
      return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
    return "a finite number"

  def contains(self, value) -> bool:
    if value is None:
      return self.none_ok
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if not math.isfinite(value) or (self.integer and value != int(value)):
      return False
    if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
      return False
    if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
      return False
    return True

  def check(self, field: str, value) -> None:
    """Raises ConfigError naming `field` when `value` is outside the range."""
    if not self.contains(value):
      kind = "a whole number " if self.integer else ""
      none = " or None" if self.none_ok else ""
      raise ConfigError(f"{field}={value!r} must be {kind}{self}{none}; set it inside that range")

  def outside(self):
    """One value this range refuses (for tests that walk every field)."""
    if self.lo is not None:
      return self.lo if self.lo_open else self.lo - 1
    if self.hi is not None:
      return self.hi if self.hi_open else self.hi + 1
    return math.inf


def _num(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else repr(x)


# The ranges most fields need.
POSITIVE = Range(0, lo_open=True)
POSITIVE_INT = Range(1, integer=True)
NON_NEGATIVE = Range(0)
NON_NEGATIVE_INT = Range(0, integer=True)
UNIT = Range(0, 1)  # probabilities, decays, betas
UNIT_OPEN_TOP = Range(0, 1, hi_open=True)  # an EMA decay or Adam beta: 1 would never move
