"""Titans' persistent-memory attention (the MAG / MAL branch) on one GPU: check, then timings.

    python scripts/bench_persistent.py --out /tmp/bench_persistent
    python scripts/bench_persistent.py --out /tmp/x --smoke             # CPU self-test

effattn.kernels.softmax.persistent.persistent_attention: each query's causal softmax over the
N_p persistent key/value pairs and the keys of its own segment (within a sliding window when
one is given).
(a) Check, on the device, before any timing: persistent_attention with impl "auto", each
    --impls and "xla" when --paths times it, against persistent.reference run in float32 at
    "highest" matmul precision: o and the gradients of q, k, v, persistent_k and persistent_v
    for a random cotangent, bf16 (pass: < 2e-2) and f32 (< 1e-4; the path's call also at
    "highest", since XLA's default f32 matmul on the GPU is TF32). Error per tensor: max|a - g|
    / max(1, max|a|), a the reference. Cases (B, T, H, D, window, segments): (1, 2048, 4, 128,
    512, one), (2, 1000, 2, 64, 300, packed: two segments + trailing padding id 0) and
    (2, 1000, 2, 64, None, packed). A path whose check fails is not timed (its row says so).
(b) Times, median of --reps after a warm-up call (block_until_ready), forward and
    forward+backward (the output with the gradients, timing.forward_and_grads; each with the
    custom kernels compiled, hlo.count_kernels) at --shapes (default B=2, T=16384), H 8, D 128,
    window 512, N_p 4 (float32, as the module's parameters), bf16:
      auto          persistent_attention impl "auto" (on an H200 with a window: the band through
                    the block-sparse Triton kernels, the persistent pairs in XLA, merged by
                    log-sum-exp);
      xla           impl "xla", the query-chunked form (slow: only when --paths names it);
      cudnn_window  softmax_attention(q, k, v, causal=True, window=W, impl="cudnn"), no
                    persistent pairs: the peer (not checked here: the softmax tests cover it);
      cudnn_causal  the same without the window.
      pallas_gpu, pallas_mosaic_gpu, pallas_mosaic_gpu_t128
                    the band (persistent.banded) forced onto the block-sparse Triton or Mosaic
                    GPU kernels at the band's tile (64), or Mosaic at tile 128 (only when
                    --paths names them; each checked first, Mosaic in bf16 only).
    fwd+bwd takes the gradients of q, k, v, and of persistent_k / persistent_v on the
    persistent paths (what a training step computes).
Writes DIR/bench_persistent.json and prints a table last, with auto / cudnn_window. --smoke
runs everything on CPU at tiny shapes: the Triton kernels interpreted, standing in for a GPU
(dispatch.interpret_kernels("gpu"), so "auto" takes the band path it takes there; D 64, the
kernels' smallest), XLA instead of cuDNN.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from effattn.evaluate import bench_args, device_check  # noqa: E402
from effattn.evaluate.timing import forward_and_grads, measure, table_cell  # noqa: E402
from effattn.kernels import dispatch  # noqa: E402
from effattn.kernels.block_sparse import FAMILY as BLOCK_SPARSE  # noqa: E402
from effattn.kernels.softmax import persistent  # noqa: E402
from effattn.kernels.softmax import softmax_attention  # noqa: E402

SMOKE = {"on": False}
GRADS = ("o", "dq", "dk", "dv", "dpk", "dpv")
# (B, T, H, D, window, packed segments): the check's cases, on the device and in --smoke.
CHECK_CASES = ((1, 2048, 4, 128, 512, False), (2, 1000, 2, 64, 300, True),
               (2, 1000, 2, 64, None, True))
SMOKE_CHECK_CASES = ((1, 64, 2, 64, 20, False), (2, 50, 2, 64, 12, True),
                     (2, 50, 2, 64, None, True))
# The band's kernels forced (path -> the block-sparse impl and the band's tile): auto's choice
# timed beside the others in the same run; the Mosaic GPU kernels at their larger tile too.
BAND_PATHS = {"pallas_gpu": ("pallas_gpu", persistent.BAND_TILE),
              "pallas_mosaic_gpu": ("pallas_mosaic_gpu", persistent.BAND_TILE),
              "pallas_mosaic_gpu_t128": ("pallas_mosaic_gpu", 128)}
PATHS = ("auto", "xla", "cudnn_window", "cudnn_causal") + tuple(BAND_PATHS)
# timed path -> the impl its check covers
PERSISTENT_PATHS = {"auto": "auto", "xla": "xla", **{p: p for p in BAND_PATHS}}


def refusal(impl: str, dtype) -> str:
  """"" when impl takes dtype, else the block-sparse path's own reason (the Mosaic GPU kernels
  are bf16 / f16 only: their f32 check cases are skipped, not failed)."""
  name = BAND_PATHS.get(impl, (impl,))[0]
  path = next((p for p in BLOCK_SPARSE.paths if p.name == name), None)
  shapes = {"dtype": jnp.dtype(dtype).name}
  return "" if path is None else "; ".join(r for r in (lim.check(shapes) for lim in path.limits)
                                           if r)


def stand_in():
  """--smoke: the GPU's Triton kernels, interpreted, for "auto" and "pallas" (traced inside)."""
  return dispatch.interpret_kernels("gpu") if SMOKE["on"] else contextlib.nullcontext()


def segments(b: int, t: int) -> jax.Array:
  """[B, T] ids: a third in segment 1, the rest in 2 but a tenth of trailing padding (id 0)."""
  return jnp.concatenate([jnp.ones((b, t // 3), jnp.int32),
                          2 * jnp.ones((b, t - t // 3 - t // 10), jnp.int32),
                          jnp.zeros((b, t // 10), jnp.int32)], axis=1)


def inputs(key, b, t, h, d, n_p, dtype):
  """q, k, v, do [B, T, H, D] in dtype; persistent_k, persistent_v [N_p, H, D] float32."""
  ks = jax.random.split(key, 6)
  q, k, v, do = (jax.random.normal(kk, (b, t, h, d), dtype) for kk in ks[:4])
  pk, pv = (jax.random.normal(kk, (n_p, h, d), jnp.float32) for kk in ks[4:])
  return q, k, v, pk, pv, do


def attend(impl, segment_ids=None, window=None):
  """persistent_attention(q, k, v, pk, pv) with impl (interpret=True for a forced Pallas path
  under --smoke); a BAND_PATHS name runs persistent.banded with its kernels and tile."""
  if impl in BAND_PATHS:
    kernels, tile = BAND_PATHS[impl]
    return lambda q, k, v, pk, pv: persistent.banded(
        q, k, v, pk, pv, segment_ids=segment_ids, window=window, impl=kernels, tile=tile,
        interpret=SMOKE["on"])
  interpret = SMOKE["on"] and impl in persistent.BLOCK_SPARSE_IMPLS
  return lambda q, k, v, pk, pv: persistent.persistent_attention(
      q, k, v, pk, pv, segment_ids=segment_ids, window=window, impl=impl, interpret=interpret)


def check(impls, n_p: int, windowed: bool = True) -> list[dict]:
  """Each impl vs persistent.reference on the device: o and the five gradients, on the check
  cases of the form that is timed (with a window or without: the two take different kernels,
  and each case costs its compiles)."""
  rows = []

  @functools.partial(jax.jit, static_argnums=0)
  def vg(f, q, k, v, pk, pv, do):
    o, vjp = jax.vjp(f, q, k, v, pk, pv)
    return (o,) + vjp(do.astype(o.dtype))

  for dtype in (jnp.bfloat16, jnp.float32):
    cases = SMOKE_CHECK_CASES if SMOKE["on"] else CHECK_CASES
    for b, t, h, d, w, packed in [c for c in cases if (c[4] is not None) == windowed]:
      q, k, v, pk, pv, do = inputs(jax.random.key(t + (w or 0)), b, t, h, d, n_p, dtype)
      seg = segments(b, t) if packed else None
      ref = lambda *a, seg=seg, w=w: persistent.reference(*a, segment_ids=seg, window=w)  # noqa
      with jax.default_matmul_precision("highest"):  # no TF32 in the oracle
        want = vg(ref, *(x.astype(jnp.float32) for x in (q, k, v, pk, pv, do)))
      # f32: exact products, as the oracle's (the path's XLA einsums: persistent pairs, merge,
      # chunks, would run in TF32, and the kernels' dots follow jax's setting); bf16 at the
      # user's setting, as it is timed.
      exact = dtype == jnp.float32
      for impl in impls:
        row = {"impl": impl, "dtype": jnp.dtype(dtype).name, "B": b, "T": t, "H": h, "D": d,
               "window": w, "segments": "packed" if packed else "one"}
        if refusal(impl, dtype):
          print("check", {**row, "skipped": refusal(impl, dtype)}, flush=True)
          continue
        try:
          with (jax.default_matmul_precision("float32") if exact else contextlib.nullcontext(),
                stand_in()):
            got = vg(attend(impl, seg, w), q, k, v, pk, pv, do)
        except Exception as e:  # noqa: BLE001  (report it, keep checking)
          rows.append(device_check.failed(row, e))
          print("check", rows[-1], flush=True)
          continue
        errs = device_check.relative_errors(GRADS, want, got)
        rows.append({**row, "max_rel_err": errs, "ok": device_check.passes(errs, dtype)})
        print("check", rows[-1], flush=True)
  return rows


def bench_one(b, t, h, d, window, n_p, reps, paths, failed=()) -> dict:
  """One shape: each path's fwd and fwd+bwd median ms and custom kernels compiled; a path in
  `failed` (its check failed) gets a note instead."""
  q, k, v, pk, pv, do = inputs(jax.random.key(0), b, t, h, d, n_p, jnp.bfloat16)
  peer_impl = "xla" if SMOKE["on"] else "cudnn"
  fns = {
      "auto": (attend("auto", window=window), (0, 1, 2, 3, 4)),
      "xla": (attend("xla", window=window), (0, 1, 2, 3, 4)),
      "cudnn_window": (lambda q, k, v, pk, pv: softmax_attention(
          q, k, v, causal=True, window=window, impl=peer_impl), (0, 1, 2)),
      "cudnn_causal": (lambda q, k, v, pk, pv: softmax_attention(
          q, k, v, causal=True, impl=peer_impl), (0, 1, 2)),
      **{p: (attend(p, window=window), (0, 1, 2, 3, 4)) for p in BAND_PATHS},
  }
  row = {"B": b, "T": t, "H": h, "D": d, "window": window, "num_persistent": n_p}
  for name in paths:
    if name in failed:
      row[f"{name}_skipped"] = "not timed: its check failed"
      print(f"{name}: {row[f'{name}_skipped']}", flush=True)
      continue
    f, argnums = fns[name]
    try:
      with stand_in() if name in PERSISTENT_PATHS else contextlib.nullcontext():
        fwd = measure(f, q, k, v, pk, pv, reps=reps)
        fwd_bwd = measure(forward_and_grads(f, argnums=argnums), q, k, v, pk, pv, do, reps=reps)
      row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = fwd["ms"], fwd_bwd["ms"]
      row[f"{name}_kernels"] = (fwd["kernels"], fwd_bwd["kernels"])
      row[f"{name}_kernel_names"] = (fwd["kernel_names"], fwd_bwd["kernel_names"])
    except Exception as e:  # noqa: BLE001  (report, keep the other paths)
      row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(f"{name} failed: {row[f'{name}_error']}", flush=True)
  print("bench", {k: x for k, x in row.items() if not k.endswith("_kernel_names")}, flush=True)
  return row


def print_table(rows, paths, h, d, n_p):
  print(f"\nH={h} D={d} N_p={n_p} bf16; median ms fwd / fwd+bwd [custom kernels compiled "
        "fwd/fwd+bwd]; auto / cudnn_window fwd and fwd+bwd")
  print(f"{'B':>3} {'T':>6} {'window':>6} " + " ".join(f"{n:>27}" for n in paths)
        + f" {'auto/cudnn_window':>18}")
  for r in rows:
    cells = []
    for n in paths:
      cells.append(table_cell(r, n)
                   or ("check failed: not timed" if f"{n}_skipped" in r else "error"))
    ratio = "-"
    if "auto_fwd_ms" in r and "cudnn_window_fwd_ms" in r:
      ratio = (f"{r['auto_fwd_ms'] / r['cudnn_window_fwd_ms']:.2f} / "
               f"{r['auto_fwdbwd_ms'] / r['cudnn_window_fwdbwd_ms']:.2f}")
    print(f"{r['B']:>3} {r['T']:>6} {str(r['window']):>6} "
          + " ".join(f"{c:>27}" for c in cells) + f" {ratio:>18}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=".", help="directory for bench_persistent.json")
  ap.add_argument("--shapes", default="2x16384", help="B x T pairs")
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--window", type=int, default=512, help="sliding window (0: none)")
  ap.add_argument("--num_persistent", type=int, default=4)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--impls", default="",
                  help="more persistent_attention impls to check besides auto (comma list, "
                       "e.g. xla,pallas_gpu)")
  ap.add_argument("--paths", default="auto,cudnn_window,cudnn_causal",
                  help="paths timed, comma list of " + ", ".join(PATHS))
  ap.add_argument("--smoke", action="store_true", help="CPU self-test: tiny shapes, interpret")
  args = ap.parse_args(argv)
  paths = bench_args.choices(ap, "--paths", args.paths, PATHS)
  SMOKE["on"] = args.smoke
  shapes = bench_args.shapes(args.shapes)
  h, d, n_p, reps = args.heads, args.dim, args.num_persistent, args.reps
  window = args.window or None
  if args.smoke:
    shapes, h, d, window, reps = [(1, 64)], 2, 64, (20 if args.window else None), 2
  # Every persistent path that is timed is checked first.
  impls = ["auto"]
  for impl in [x for x in args.impls.split(",") if x] + [PERSISTENT_PATHS[p] for p in paths
                                                           if p in PERSISTENT_PATHS]:
    if impl not in impls:
      impls.append(impl)
  device = jax.devices()[0].device_kind
  print("device:", device, "jax", jax.__version__, flush=True)
  result = {"device": device, "jax": jax.__version__, "smoke": args.smoke, "impls": impls}
  result["check"] = check(impls, n_p, windowed=window is not None)
  failed = {p for p, impl in PERSISTENT_PATHS.items()
            if any(not c["ok"] for c in result["check"] if c["impl"] == impl)}
  result["rows"] = [bench_one(b, t, h, d, window, n_p, reps, paths, failed) for b, t in shapes]
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "bench_persistent.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nwrote {path}")
  worst = {}
  for c in result["check"]:
    key = f"{c['impl']} {c['dtype']}"
    worst[key] = max(worst.get(key, 0.0), max(c["max_rel_err"].values()))
  ok = all(c["ok"] for c in result["check"])
  print(f"check: {'PASS' if ok else 'FAIL'}; max relative error per (impl, dtype) "
        + ", ".join(f"{k} {x:.1e}" for k, x in worst.items()))
  print_table(result["rows"], paths, h, d, n_p)
  if not ok:
    print("CHECK FAILED")
    sys.exit(1)
  return result


if __name__ == "__main__":
  main()
