"""Command-line values the benchmark scripts share: shape lists and comma lists of choices."""

from __future__ import annotations

import argparse


def shapes(spec: str) -> list[tuple[int, ...]]:
  """'2x16384,1x32768' -> [(2, 16384), (1, 32768)]."""
  return [tuple(int(x) for x in s.split("x")) for s in spec.split(",") if s]


def choices(parser: argparse.ArgumentParser, flag: str, spec: str, allowed) -> tuple[str, ...]:
  """A non-empty comma list of names from `allowed`; else parser.error names the flag and the
  choices (one line, exit 2)."""
  picked = tuple(p for p in spec.split(",") if p)
  if not picked or set(picked) - set(allowed):
    parser.error(f"{flag}={spec!r}: give a comma list of {', '.join(allowed)}")
  return picked
