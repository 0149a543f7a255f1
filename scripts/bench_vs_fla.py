"""What the op benchmarks against fla share (bench_linear.py, bench_delta_rule.py).

    fla = fla_results(__file__, args.out, args.sizes, reuse=args.fla_results, skip=args.no_fla)
    rows.append(checked(case, lambda: {"o": rel_err(o, o_ref), ...}, tol))
    best, tuning = tune(candidates, sizes, inputs, lambda cfg: fwd_bwd_with(cfg))
    rows.append(ours_row("ours pallas_gpu", t, fwd, fwd_bwd, args, do))

fla's side runs in PyTorch (`fla_row`: triton.testing.do_bench medians), ours in JAX (`timed`:
effattn.evaluate.timing.measure, kernels counted). jax, torch and triton are imported inside
the functions that use them: the fla part runs in a process that never starts JAX.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any, Callable, Sequence


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| in float64 (b the reference)."""
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def checked(case: str, errors: Callable[[], dict], tol: float) -> dict:
  """The row of one correctness case, printed: errors() -> {tensor: relative error} passes when
  the worst is below tol; an exception makes a failed row naming it (the next case still runs)."""
  try:
    errs = errors()
    worst = max(errs.values())
    row = {"case": case, "max_rel_err": worst, "tol": tol, "ok": worst < tol, "errs": errs}
  except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
    row = {"case": case, "ok": False, "error": repr(e)[:500]}
  print(row, flush=True)
  return row


def timed(fn, *args, reps: int = 5) -> dict:
  """{"ms", "kernels", "kernel_names", "compile_s"}: median of `reps` timed loops filling about
  0.25 s."""
  from effattn.evaluate import timing
  return timing.measure(fn, *args, reps=reps, budget_s=0.25)


def ours_row(name: str, t: int, fwd, fwd_bwd, args: Sequence, do) -> dict:
  """One row of ours: fwd(*args) and fwd_bwd(*args, do) timed, with the custom kernels of each
  compiled program; an error row if either fails."""
  try:
    f, fb = timed(fwd, *args), timed(fwd_bwd, *args, do)
    return {"impl": name, "T": t, "fwd_ms": f["ms"], "fwd_bwd_ms": fb["ms"],
            "fwd_kernels": f["kernels"], "fwd_bwd_kernels": fb["kernels"],
            "fwd_bwd_kernel_names": fb["kernel_names"], "compile_s": fb["compile_s"]}
  except Exception as e:  # noqa: BLE001 - a failing row must not hide the others
    return {"impl": name, "T": t, "error": repr(e)[:300]}


def tune(candidates: Sequence, sizes: Sequence[int], inputs: Callable[[int], Sequence],
         fwd_bwd: Callable[[Any], Callable]) -> tuple[Any, dict]:
  """The fastest candidate (block sizes) for fwd+bwd: fwd_bwd(candidate)(*inputs(t)) timed at
  each of `sizes`, the least time over all of them winning (candidates[0] when `sizes` is
  empty). Returns (best, {"T=<t> <candidate>": ms, ..., "best": str(best)}); a candidate that
  fails is timed nan."""
  best, best_ms, tuning = candidates[0], float("inf"), {}
  for t in sizes:
    args = inputs(t)
    for cfg in candidates:
      try:
        ms = timed(fwd_bwd(cfg), *args, reps=3)["ms"]
      except Exception as e:  # noqa: BLE001 - a tile that does not compile is skipped
        ms = float("nan")
        print("tune", cfg, "failed:", repr(e)[:300], flush=True)
      tuning[f"T={t} {cfg}"] = ms
      print("tune", t, cfg, f"{ms:.3f} ms", flush=True)
      if ms < best_ms:
        best, best_ms = cfg, ms
  tuning["best"] = str(best)
  return best, tuning


def refusal(e: BaseException) -> str:
  """The one-line reason a peer's call failed: "refused: <message>"."""
  return f"refused: {type(e).__name__}: {e}"[:300]


def fla_row(name: str, t: int, op: Callable, do, leaves: list, *, warmup: int, rep: int) -> dict:
  """One row of fla (PyTorch): medians of op() without autograd and of op().backward(do) with
  the gradients of `leaves` reset per call (triton.testing.do_bench). Each is tried on its own:
  a backward that fails (fla 0.6.0 refuses Triton 3.4-3.7.0 on Hopper) keeps the forward's time
  and records "fwd_bwd_error": "refused: <reason>"; an error row if the forward fails too."""
  import torch
  import triton
  bench = dict(warmup=warmup, rep=rep, return_mode="median")
  row = {"impl": name, "T": t}
  try:
    with torch.no_grad():
      row["fwd_ms"] = triton.testing.do_bench(op, **bench)
  except Exception as e:  # noqa: BLE001 - a failing peer must not hide our numbers
    row["fwd_error"] = refusal(e)
  try:
    row["fwd_bwd_ms"] = triton.testing.do_bench(lambda: op().backward(do), grad_to_none=leaves,
                                                **bench)
  except Exception as e:  # noqa: BLE001
    row["fwd_bwd_error"] = refusal(e)
  if "fwd_ms" not in row and "fwd_bwd_ms" not in row:
    row["error"] = row["fwd_error"]
  return row


def fla_results(script: str, out: str, sizes: str, *, reuse: str = "", skip: bool = False,
                extra_args: tuple[str, ...] = ()) -> dict:
  """fla's part (fla.json under `out`, {"rows": []} without one): the fla* files of an earlier
  run copied from `reuse`, else `script --part fla *extra_args` run in a subprocess (call this
  before JAX starts: it would take the GPU), unless `skip`."""
  if reuse:
    for name in os.listdir(reuse):
      if name.startswith("fla"):
        shutil.copy(os.path.join(reuse, name), out)
  elif not skip:
    subprocess.run([sys.executable, script, "--part", "fla", "--out", out, "--sizes", sizes,
                    *extra_args], check=False)
  path = os.path.join(out, "fla.json")
  if not os.path.exists(path):
    return {"rows": []}
  with open(path) as f:
    return json.load(f)
