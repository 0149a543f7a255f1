"""Wall-clock timing of jitted functions for the benchmark scripts (never for unit tests)."""

from __future__ import annotations

import statistics
import time

import jax


def median_ms(fn, *args, reps: int) -> float:
  """Median wall time in ms of fn(*args) over `reps` calls after one warm-up (compile) call;
  each call is waited for (block_until_ready), since dispatch is asynchronous."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)
