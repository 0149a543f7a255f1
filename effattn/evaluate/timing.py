"""Wall-clock timing of jitted functions for the benchmark scripts (never for unit tests).

    fb = forward_and_grads(f, argnums=(0, 1, 2))          # fb(q, k, v, do) -> (o, (dq, dk, dv))
    row = measure(fb, q, k, v, cotangent_like(f, q, k, v), reps=10)
    row["ms"], row["kernels"], row["compile_s"]

A fwd+bwd timing returns the forward output with the gradients (`forward_and_grads`), as a
training step uses both: timing the gradients alone lets XLA drop a forward kernel whose output
the backward does not need (linear_scan's backward reads only q, k, v: 3 kernels compiled
instead of 4, and a speed-up over fla that timed its forward overstated 1.4x). `measure` counts
the custom kernels in the compiled program (effattn/kernels/hlo.py) beside the time, so a
dropped or fallen-back kernel shows in every row.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from effattn.kernels import hlo


def median_ms(fn, *args, reps: int, budget_s: float | None = None) -> float:
  """Median wall time in ms of fn(*args) over `reps` samples after one warm-up (compile) call;
  each sample is waited for (block_until_ready), since dispatch is asynchronous.

  budget_s: spread about this many seconds over the samples, each then timing k back-to-back
  calls (k from the warm-up) and reporting the mean, which hides the dispatch gap of calls far
  shorter than a millisecond."""
  jax.block_until_ready(fn(*args))
  calls = 1
  if budget_s:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - start
    calls = max(1, int(budget_s / reps / max(once, 1e-6)))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / calls)
  return statistics.median(times)


def carried_ms(step, carry, *, reps: int) -> tuple[list[float], object]:
  """Wall times in ms of `reps` calls carry = step(carry) after one warm-up call, each waited
  for; for steps that donate their carry (decode caches, train states). Returns (times, carry)."""
  carry = jax.block_until_ready(step(carry))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    carry = jax.block_until_ready(step(carry))
    times.append((time.perf_counter() - start) * 1e3)
  return times, carry


def forward_and_grads(f, argnums=0):
  """fb(*args, cotangent) -> (f(*args), gradients of argnums for that output cotangent).

  argnums: an int (one gradient) or a tuple (a tuple of gradients). cotangent: a pytree like
  f's output (`cotangent_like`); for a scalar loss, 1.0 gives the plain gradient."""
  nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)

  def fb(*args_and_cotangent):
    *args, cotangent = args_and_cotangent

    def of_diff(*diff):
      full = list(args)
      for i, x in zip(nums, diff):
        full[i] = x
      return f(*full)

    out, vjp = jax.vjp(of_diff, *(args[i] for i in nums))
    cotangent = jax.tree.map(lambda c, o: jnp.asarray(c, o.dtype), cotangent, out)
    grads = vjp(cotangent)
    return out, grads[0] if isinstance(argnums, int) else grads

  return fb


def cotangent_like(f, *args, seed: int = 0):
  """Random normal cotangents shaped like f(*args)'s output leaves (from eval_shape)."""
  shapes = jax.eval_shape(f, *args)
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
  return jax.tree.unflatten(tree, [jax.random.normal(key, s.shape, s.dtype)
                                   for key, s in zip(keys, leaves)])


def compile_counted(fn, *args, donate_argnums=()) -> tuple[object, list[str], float]:
  """(compiled jax.jit(fn) for args, names of the custom kernels in its HLO, compile seconds)."""
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
  seconds = time.perf_counter() - start
  return compiled, hlo.kernel_names(compiled.as_text()), seconds


def measure(fn, *args, reps: int, budget_s: float | None = None) -> dict:
  """Compiles jax.jit(fn) for args once, then {"ms": median_ms of the compiled program,
  "kernels": how many custom kernels its HLO holds, "kernel_names": theirs, "compile_s"}."""
  compiled, names, compile_s = compile_counted(fn, *args)
  return {"ms": median_ms(compiled, *args, reps=reps, budget_s=budget_s), "kernels": len(names),
          "kernel_names": names, "compile_s": compile_s}


def footprint_bytes(compiled) -> dict | None:
  """The compiled program's memory: {"total": arguments + outputs + temporaries - aliased,
  "temp": temporaries}, or None where the backend does not report it."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 -- not every backend reports it
    return None
  if m is None:
    return None
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return {"total": int(total), "temp": int(m.temp_size_in_bytes)}


def device_peak_bytes() -> int | None:
  """Peak bytes in use on the first device since the process started (a running maximum), or
  None where the backend keeps no allocator statistics (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def table_cell(row: dict, name: str) -> str | None:
  """'fwd / fwd+bwd [kernels fwd/fwd+bwd]' of path `name` in a bench row holding
  `{name}_fwd_ms`, `{name}_fwdbwd_ms` and `{name}_kernels`; None when it was not timed."""
  if f"{name}_fwd_ms" not in row:
    return None
  kernels = row[f"{name}_kernels"]
  return (f"{row[f'{name}_fwd_ms']:>8.2f} / {row[f'{name}_fwdbwd_ms']:>8.2f}"
          f" [{kernels[0]}/{kernels[1]}]")
