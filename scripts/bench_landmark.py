"""Landmark grouped-softmax kernel on one GPU: correctness check, then timings.

    python scripts/bench_landmark.py --out /tmp/bench_landmark

(a) Check: the Triton kernel (effattn/kernels/grouped_softmax/pallas_gpu.py) against the
    dense grouped_softmax_attention (float32, highest matmul precision) at small shapes, forward
    and gradients of q, k, v and the landmark keys, bf16 and f32, one segment and packed
    segments + padding, and the lax.cond fallback; prints the max error relative to the largest
    reference value (pass: < 2e-2 bf16, < 1e-4 f32).
(b) Times (median of --reps after a warm-up call, block_until_ready), forward and
    forward+backward (the output with the gradients, timing.forward_and_grads; each with the
    custom kernels compiled), at B=8/T=1024 and B=2/T=4096 (H=8, D=128, bf16, block_len 50, one
    segment): the kernel path (relayout + kernels + lax.cond, what the module runs), the
    kernels alone (layout precomputed), the chunked XLA path (query_chunk 256, the module's
    fallback) and cuDNN causal softmax attention (jax.nn.dot_product_attention) as the peer.
(c) --tune: a small Triton (num_warps x num_stages) sweep of the kernel at the largest shape.
(d) --kv_splits 1,2,4,8: the dK/dV backward split over S programs per key tile (pallas_gpu.py's
    kv_splits; 0 = its auto_kv_splits). Each S > 1 is checked first like (a) (bf16 and f32, the
    largest D, one segment, packed segments + padding, q_groups 1 and 2); an S whose check
    fails is not timed. Then at every --shapes entry the kernels alone and the kernel path,
    forward and forward+backward, per S, with the custom kernels of each compiled program.
--check_scope splits checks the default kernel on (d)'s smaller set of cases instead of (a)'s
(a fifth of the compile time); --paths picks (b)'s paths.
(e) --paths ...,pallas_mosaic_gpu,pallas_mosaic_gpu_core: the Mosaic GPU forward
    (grouped_softmax/pallas_mosaic_gpu.py, Hopper only, with bwd="triton") through the op
    and alone, as "kernel" / "kernel_core" are for Triton. Named, it is checked first like (a)
    (MOSAIC_CHECK_CASES at D 64 and 128, bf16; float32 rows are skipped: it takes bf16 only),
    even with --no_check, and timed only if every case that ran passed; where it cannot run
    (CPU, another GPU) its rows say why instead.
(f) --paths ...,pallas_mosaic_gpu_bwd,pallas_mosaic_gpu_bwd_core: the same Mosaic forward with
    its own Mosaic backward (the op's default bwd="mosaic": pallas_mosaic_gpu.py's dQ and dK/dV
    kernels, what impl="auto" runs on Hopper), checked first and timed under the same rules as (e) (its check rows carry
    "bwd": "mosaic"; check_mosaic_bwd in the JSON).
(g) --bwd_parts: at every shape the backward's dQ and dK/dV kernels each timed alone on the
    forward's group-tiled residuals (a jit returning only dq, or only dk and dv, so XLA drops
    the other kernel: its custom-kernel count, 1, shows that), Triton's and, once the Mosaic
    backward's check (f) passed, Mosaic's ("bwd_parts" in the JSON).
Writes DIR/bench_landmark.json and prints a table last. --smoke runs everything on CPU at tiny
shapes (Pallas interpret mode, XLA instead of cuDNN) to test this script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from effattn.attention.landmark import block_groups  # noqa: E402
from effattn.kernels import dispatch  # noqa: E402
from effattn.kernels.grouped_softmax import api as grouped  # noqa: E402
from effattn.kernels.grouped_softmax import pallas_gpu  # noqa: E402
from effattn.kernels.grouped_softmax import grouped_softmax_attention  # noqa: E402
from effattn.evaluate import bench_args, device_check  # noqa: E402
from effattn.evaluate.timing import forward_and_grads, measure, table_cell  # noqa: E402

SMOKE = {"on": False}


def layout(kind: str, b: int, t: int, block_len: int):
  """gid, seg [B, T]: one segment, or two packed segments + padding (segment 0, position 0)."""
  if kind == "one":
    pos, seg = jnp.broadcast_to(jnp.arange(t), (b, t)), None
  else:
    a, c = t // 3, t - t // 7
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    seg[:, :a], seg[:, a:c] = 1, 2
    pos[:, :a], pos[:, a:c] = np.arange(a), np.arange(c - a)
    pos, seg = jnp.asarray(pos), jnp.asarray(seg)
  gid = block_groups(pos, seg, block_len)
  return gid, (jnp.ones((b, t), jnp.int32) if seg is None else seg)


def kernel_kwargs(block_len: int, tile: int, impl: str = "pallas_gpu", **tuning):
  kw = dict(block_len=block_len, tile=tile, impl=impl, **tuning)
  if SMOKE["on"]:
    kw.update(interpret=True, num_warps=None, num_stages=None)
  return kw


CHECK_CASES = (("one", None, 1), ("packed", None, 1), ("packed", 2, 1), ("one", None, 2),
               ("packed", None, 2))  # layout, max_groups (2: the fallback), q_groups
SPLIT_CHECK_CASES = (("one", None, 1), ("packed", None, 1), ("packed", None, 2))
# The Mosaic forward at both head dims: one segment, packed segments + padding (segments start
# on odd and even groups), and q_groups 2 (the Triton backward's tiles behind it).
MOSAIC = "pallas_mosaic_gpu"
MOSAIC_CHECK_CASES = SPLIT_CHECK_CASES
# The Mosaic forward with the Mosaic backward (bwd="mosaic"): a bench label, not an impl.
MOSAIC_BWD = MOSAIC + "_bwd"


def why_not_here(impl: str, dtype, d: int, block_len: int, tile: int) -> str:
  """"" when the forced path `impl` runs these inputs on this machine, else the dispatcher's
  one-line reason (CPU, a GPU that is not Hopper, float32, a head dim or tile it lacks)."""
  try:
    grouped.FAMILY.choose(impl, head_dim=d, dtype=jnp.dtype(dtype).name, block_len=block_len,
                          tile=tile)
  except dispatch.PathError as e:
    return str(e)
  return ""


def check(shape, block_len, tile, kv_splits: int | None = None,
          impl: str = "pallas_gpu") -> list[dict]:
  """Kernel vs the dense reference, forward and gradients. kv_splits: the dK/dV split to check
  (None: the default kernel, every case and D; else the largest D and SPLIT_CHECK_CASES).
  impl=MOSAIC: the Mosaic forward (with the Triton backward) on MOSAIC_CHECK_CASES at every D;
  a case it cannot run here (float32 everywhere; all of them off Hopper) is a skipped row."""
  b, t, h = shape
  rows = []
  dims = (16,) if SMOKE["on"] else (64, 128)
  cases = CHECK_CASES
  if kv_splits is not None:
    dims, cases = dims[-1:], SPLIT_CHECK_CASES
  bwd = {}
  if impl in (MOSAIC, MOSAIC_BWD):  # the op's impl is MOSAIC either way; the label names the
    cases = MOSAIC_CHECK_CASES      # backward (the op's default, "mosaic", or "triton")
    impl, bwd = MOSAIC, {"bwd": "mosaic" if impl == MOSAIC_BWD else "triton"}
  for dtype in (jnp.bfloat16, jnp.float32):
    for d in dims:
      for kind, max_groups, q_groups in cases:
        row = {"dtype": jnp.dtype(dtype).name, "D": d, "layout": kind,
               "fallback": max_groups is not None, "q_groups": q_groups}
        if impl != "pallas_gpu":
          row = {"impl": impl, **bwd, **row}
          why = why_not_here(impl, dtype, d, block_len, tile)
          if why:  # not run, not failed
            rows.append({**row, "skipped": why, "max_rel_err": {}, "ok": True})
            print("check", rows[-1], flush=True)
            continue
        if kv_splits is not None:
          row["kv_splits"] = kv_splits
        ks = jax.random.split(jax.random.key(d + t), 5)
        q, k, v, kl, do = (jax.random.normal(kk, (b, t, h, d)).astype(dtype) for kk in ks)
        gid, seg = layout(kind, b, t, block_len)

        def ref(q, k, v, kl, gid=gid, seg=seg, d=d):
          return grouped_softmax_attention(q, k, v, kl, gid, seg, scale=d ** -0.5)[0]

        def ker(q, k, v, kl, gid, seg, max_groups=max_groups, q_groups=q_groups):
          return grouped.grouped_softmax(q, k, v, kl, gid, seg, max_groups=max_groups,
                                         **kernel_kwargs(block_len, tile, impl=impl,
                                                         q_groups=q_groups, kv_splits=kv_splits,
                                                         **bwd))

        def vg(f, args, do, *layout_args):
          # gid and seg are arguments, not constants: XLA would constant-fold the relayout.
          o, vjp = jax.vjp(lambda *a: f(*a, *layout_args), *args)
          return (o,) + vjp(do)

        with jax.default_matmul_precision("highest"):  # no TF32 in the oracle
          want = jax.jit(vg, static_argnums=0)(
              ref, [x.astype(jnp.float32) for x in (q, k, v, kl)], do.astype(jnp.float32))
        # f32: exact products, as the oracle's (the fallback's XLA einsums would run in TF32 on
        # the GPU, and the kernels' dots follow jax's setting); bf16 at the user's, as timed.
        exact = dtype == jnp.float32
        try:
          with jax.default_matmul_precision("float32") if exact else contextlib.nullcontext():
            got = jax.jit(vg, static_argnums=0)(ker, (q, k, v, kl), do, gid, seg)
        except Exception as e:  # noqa: BLE001  (report it, keep checking and timing)
          if isinstance(e, ValueError) and "shared memory" in str(e):  # refused up front: no fault
            rows.append({**row, "refused": str(e), "max_rel_err": {}, "ok": True})
            print("check", rows[-1], flush=True)
            continue
          rows.append(device_check.failed(row, e))
          print("check", rows[-1], flush=True)
          continue
        errs = device_check.relative_errors(("o", "dq", "dk", "dv", "dk_land"), want, got)
        rows.append({**row, "max_rel_err": errs, "ok": device_check.passes(errs, dtype)})
        print("check", rows[-1], flush=True)
  return rows


PATHS = ("kernel", "kernel_core", "chunked_xla", "cudnn_causal")  # the default --paths
# Timed only when --paths names them, after their check (check(impl=MOSAIC), check(impl=
# MOSAIC_BWD)).
MOSAIC_PATHS = (MOSAIC, MOSAIC + "_core")
MOSAIC_BWD_PATHS = (MOSAIC_BWD, MOSAIC_BWD + "_core")
ALL_PATHS = PATHS + MOSAIC_PATHS + MOSAIC_BWD_PATHS


def mosaic_verdict(rows: list[dict], key: str = "check_mosaic") -> str:
  """"" when the Mosaic check ran some case and every case that ran passed, else why its
  timing is skipped."""
  ran = [r for r in rows if "skipped" not in r]
  if not ran:
    return "not run here: " + (rows[0]["skipped"] if rows else "no check cases")
  if not all(r["ok"] for r in ran):
    return f"its check failed ({key})"
  return ""


def bench_bwd_parts(b, t, h, d, block_len, tile, reps, mosaic_skip: str = "") -> dict:
  """--bwd_parts: the backward's dQ and dK/dV kernels each timed alone (jit of the backward with
  only dq, or only dk and dv, returned: XLA drops the other kernel, and the count of custom
  kernels shows it did), on the group-tiled residuals of the forward, for the Triton kernels
  and, unless mosaic_skip says why not, the Mosaic ones. {"B", "T", "<kernels>_<part>_ms",
  "<kernels>_<part>_kernels"} with kernels "triton" | "mosaic" and part "dq" | "dkv"."""
  ks = jax.random.split(jax.random.key(t + 1), 5)
  q, k, v, kl, do = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in ks)
  gid, seg = layout("one", b, t, block_len)
  row = {"B": b, "T": t}
  interpret = SMOKE["on"]
  kinds = {"triton": "gpu"}
  if mosaic_skip:
    row["mosaic_skipped"] = mosaic_skip
  else:
    kinds["mosaic"] = "mosaic_gpu"
  for name, platform in kinds.items():
    per_cta = 2 if platform == "mosaic_gpu" else 1  # the Mosaic CTA holds two groups
    groups = -(-grouped.default_max_groups(t, block_len) // per_cta) * per_cta
    lay = grouped.relayout(gid, seg, max_groups=groups, tile=tile)
    tuning = (("bwd", "mosaic"),) if platform == "mosaic_gpu" else ()
    st = grouped._Static(tile=tile, scale=d ** -0.5, interpret=interpret,  # noqa: SLF001
                         tuning=tuning, platform=platform)
    qg, kg, vg = grouped.group_tiles(q, k, v, kl, lay, tile)
    dog = grouped.group_tiles(do, do, do, kl, lay, tile)[0]  # zero on invalid slots
    meta = (lay["glen"], lay["gfirst"], lay["glast"])
    _, res = jax.jit(grouped._kernel_fwd, static_argnums=6)(qg, kg, vg, *meta, st)  # noqa: SLF001
    for part, pick in (("dq", lambda g: g[0]), ("dkv", lambda g: g[1:3])):
      fn = lambda res, dog, pick=pick, st=st: pick(grouped._kernel_bwd(st, res, dog))  # noqa: E731,SLF001
      try:
        got = measure(fn, res, dog, reps=reps)
        row[f"{name}_{part}_ms"], row[f"{name}_{part}_kernels"] = got["ms"], got["kernels"]
      except Exception as e:  # noqa: BLE001  (report, keep the other parts)
        row[f"{name}_{part}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"{name} {part} failed: {row[f'{name}_{part}_error']}", flush=True)
  print("bwd_parts", row, flush=True)
  return row


def print_bwd_parts(rows: list[dict], h: int, d: int, block_len: int) -> None:
  print(f"\nbackward kernels alone (H={h} D={d} bf16 block_len={block_len}; median ms "
        "[custom kernels compiled]):")
  for r in rows:
    cells = []
    for name in ("triton", "mosaic"):
      for part in ("dq", "dkv"):
        if f"{name}_{part}_ms" in r:
          cells.append(f"{name} {part} {r[f'{name}_{part}_ms']:.2f} "
                       f"[{r[f'{name}_{part}_kernels']}]")
    if "mosaic_skipped" in r:
      cells.append(f"mosaic not timed: {r['mosaic_skipped']}")
    print(f"  B {r['B']} T {r['T']}: " + "; ".join(cells))


def bench_one(b, t, h, d, block_len, tile, reps, tuning=(), paths=PATHS,
              skip: dict | None = None) -> dict:
  """Times of `paths` at one shape; skip {path: reason}: a path not timed, its reason in the
  row as `{path}_skipped`."""
  ks = jax.random.split(jax.random.key(t), 5)
  q, k, v, kl, do = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in ks)
  gid, seg = layout("one", b, t, block_len)
  kw = kernel_kwargs(block_len, tile, **dict(tuning))
  kernel = lambda q, k, v, kl, gid, seg, lay: grouped.grouped_softmax(  # noqa: E731
      q, k, v, kl, gid, seg, **kw)
  # The kernels without relayout / lax.cond (the layout precomputed).
  q_groups = dict(tuning).get("q_groups") or 1  # the layout's tiles: a multiple of it
  max_groups = -(-grouped.default_max_groups(t, block_len) // q_groups) * q_groups
  lay = grouped.relayout(gid, seg, max_groups=max_groups, tile=tile)
  assert bool(lay["ok"])
  st = grouped._Static(tile=tile, scale=d ** -0.5, interpret=bool(kw.get("interpret")),  # noqa
                       tuning=tuple((n, x) for n, x in tuning if x is not None))
  core = lambda q, k, v, kl, gid, seg, lay: grouped.kernel_attention(  # noqa: E731
      q, k, v, kl, lay, st)
  # The Mosaic forward with the Triton backward, through the op and alone: its layout has an
  # even number of groups (two per CTA), as the op rounds it.
  mosaic_kw = kernel_kwargs(block_len, tile, impl=MOSAIC, bwd="triton", **dict(tuning))
  mosaic = lambda q, k, v, kl, gid, seg, lay: grouped.grouped_softmax(  # noqa: E731
      q, k, v, kl, gid, seg, **mosaic_kw)
  lay_mosaic = lay
  if any(p in paths for p in MOSAIC_PATHS + MOSAIC_BWD_PATHS):
    per_cta = math.lcm(q_groups, 2)
    lay_mosaic = grouped.relayout(
        gid, seg, max_groups=-(-grouped.default_max_groups(t, block_len) // per_cta) * per_cta,
        tile=tile)
  st_mosaic = grouped._Static(tile=tile, scale=d ** -0.5, interpret=False,  # noqa: SLF001
                              tuning=st.tuning + (("bwd", "triton"),), platform="mosaic_gpu")
  mosaic_core = lambda q, k, v, kl, gid, seg, lay: grouped.kernel_attention(  # noqa: E731
      q, k, v, kl, lay, st_mosaic)
  # The same forward with the Mosaic backward.
  mosaic_bwd_kw = dict(mosaic_kw, bwd="mosaic")  # the op's default, named
  mosaic_bwd = lambda q, k, v, kl, gid, seg, lay: grouped.grouped_softmax(  # noqa: E731
      q, k, v, kl, gid, seg, **mosaic_bwd_kw)
  st_mosaic_bwd = grouped._Static(tile=tile, scale=d ** -0.5, interpret=False,  # noqa: SLF001
                                  tuning=st.tuning + (("bwd", "mosaic"),), platform="mosaic_gpu")
  mosaic_bwd_core = lambda q, k, v, kl, gid, seg, lay: grouped.kernel_attention(  # noqa: E731
      q, k, v, kl, lay, st_mosaic_bwd)
  chunked = lambda q, k, v, kl, gid, seg, lay: grouped.grouped_softmax(  # noqa: E731
      q, k, v, kl, gid, seg, impl="xla", chunk=256)
  peer_impl = "xla" if SMOKE["on"] else "cudnn"
  cudnn = lambda q, k, v, kl, gid, seg, lay: jax.nn.dot_product_attention(  # noqa: E731
      q, k, v, is_causal=True, implementation=peer_impl)
  row = {"B": b, "T": t, "H": h, "D": d, "block_len": block_len, "tile": tile,
         "tuning": dict(tuning)}
  for name, f, lay_f in (("kernel", kernel, lay), ("kernel_core", core, lay),
                         ("chunked_xla", chunked, lay), ("cudnn_causal", cudnn, lay),
                         (MOSAIC, mosaic, lay_mosaic), (MOSAIC + "_core", mosaic_core, lay_mosaic),
                         (MOSAIC_BWD, mosaic_bwd, lay_mosaic),
                         (MOSAIC_BWD + "_core", mosaic_bwd_core, lay_mosaic)):
    if name not in paths:
      continue
    if (skip or {}).get(name):
      row[f"{name}_skipped"] = skip[name]
      print(f"{name} not timed: {skip[name]}", flush=True)
      continue
    # The layout is an argument, not a constant: XLA would constant-fold the relayout.
    fb = forward_and_grads(f, argnums=(0, 1, 2, 3))
    try:
      fwd = measure(f, q, k, v, kl, gid, seg, lay_f, reps=reps)
      fwd_bwd = measure(fb, q, k, v, kl, gid, seg, lay_f, do, reps=reps)
      row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = fwd["ms"], fwd_bwd["ms"]
      row[f"{name}_kernels"] = (fwd["kernels"], fwd_bwd["kernels"])
    except Exception as e:  # noqa: BLE001  (report, keep the other rows)
      row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(f"{name} failed: {row[f'{name}_error']}", flush=True)
  print("bench", row, flush=True)
  return row


def bench_splits(spec: str, shapes, h, d, block_len, tile, reps, check_shape, result,
                 check_first: bool = True) -> list[dict]:
  """--kv_splits: each S > 1 (and 0) checked at check_shape (into result["check_kv_splits"]),
  then the kernels alone and the kernel path timed per shape and S; an S that failed its check
  gets a row naming it, no times (1 is the default kernel, which (a) checks)."""
  splits = [int(x) for x in spec.split(",") if x.strip()]
  if not splits:
    return []
  ok = {}
  if check_first:
    result["check_kv_splits"] = []
    for s in splits:
      if s == 1:
        ok[s] = all(c["ok"] for c in result.get("check", [])) if "check" in result else True
        continue
      rows = check(check_shape, block_len, tile, kv_splits=s)
      result["check_kv_splits"] += rows
      ok[s] = all(c["ok"] for c in rows)
  rows = []
  for b, t in shapes:
    n_groups = grouped.default_max_groups(t, block_len)
    for s in splits:
      head = {"B": b, "T": t, "kv_splits": s,
              "programs_per_key_tile": s or pallas_gpu.auto_kv_splits(n_groups, b, h)}
      if not ok.get(s, True):
        rows.append({**head, "skipped": "its check failed (check_kv_splits)"})
        print("kv_splits", rows[-1], flush=True)
        continue
      row = bench_one(b, t, h, d, block_len, tile, reps, tuning=(("kv_splits", s),),
                      paths=("kernel", "kernel_core"))
      rows.append({**head, **{k: v for k, v in row.items() if k.startswith("kernel")}})
      print("kv_splits", rows[-1], flush=True)
  return rows


def print_splits(rows, h, d, block_len):
  """The --kv_splits table: ms fwd / fwd+bwd [custom kernels compiled fwd / fwd+bwd]."""
  print(f"\nkv_splits (H={h} D={d} bf16 block_len={block_len}): median ms fwd / fwd+bwd "
        "[kernels compiled fwd/fwd+bwd]; fwd+bwd of the kernels alone vs kv_splits 1")
  print(f"{'B':>3} {'T':>6} {'S':>3} {'(S run)':>7} {'kernel_core':>28} {'kernel':>28} "
        f"{'vs S=1':>7}")
  base = {(r["B"], r["T"]): r.get("kernel_core_fwdbwd_ms") for r in rows if r["kv_splits"] == 1}
  for r in rows:
    cells = []
    for n in ("kernel_core", "kernel"):
      cells.append(table_cell(r, n) or ("skipped: check failed" if "skipped" in r else "error"))
    b1, mine = base.get((r["B"], r["T"])), r.get("kernel_core_fwdbwd_ms")
    vs = f"{b1 / mine:.2f}x" if b1 and mine else "-"
    print(f"{r['B']:>3} {r['T']:>6} {r['kv_splits']:>3} {r['programs_per_key_tile']:>7} "
          f"{cells[0]:>28} {cells[1]:>28} {vs:>7}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=".", help="directory for bench_landmark.json")
  ap.add_argument("--shapes", default="8x1024,2x4096", help="B x T pairs")
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--block_len", type=int, default=50)
  ap.add_argument("--tile", type=int, default=64)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--no_check", action="store_true",
                  help="skip the correctness checks of (a) and (d) (a named pallas_mosaic_gpu "
                       "path is checked all the same before it is timed)")
  ap.add_argument("--tune", default="4x2x1,8x2x1,4x3x1,8x2x2,8x3x2,4x2x2",
                  help="num_warps x num_stages x q_groups candidates at the largest shape ('' "
                       "to skip)")
  ap.add_argument("--kv_splits", default="1,2,4,8",
                  help="dK/dV programs per key tile to check and time at every shape (0: "
                       "pallas_gpu.auto_kv_splits; '' to skip)")
  ap.add_argument("--check_scope", default="all", choices=("all", "splits"),
                  help="all: (a) and each --kv_splits S > 1; splits: every kernel, the default "
                       "(S = 1) included, on (d)'s cases only (the largest D, three layouts)")
  ap.add_argument("--paths", default=",".join(PATHS),
                  help="paths timed in (b), comma list of " + ", ".join(ALL_PATHS)
                       + f" (default {','.join(PATHS)})")
  ap.add_argument("--bwd_parts", action="store_true",
                  help="also time the backward's dQ and dK/dV kernels each alone at every shape "
                       "(Triton, and Mosaic after its backward's check passes)")
  ap.add_argument("--smoke", action="store_true", help="CPU self-test: tiny shapes, interpret")
  args = ap.parse_args(argv)
  paths = bench_args.choices(ap, "--paths", args.paths, ALL_PATHS)
  SMOKE["on"] = args.smoke
  shapes = bench_args.shapes(args.shapes)
  h, d, block_len, tile, reps = args.heads, args.dim, args.block_len, args.tile, args.reps
  check_shape, tune, kv_splits = (2, 300, 2), args.tune, args.kv_splits
  if args.smoke:
    shapes, h, d, block_len, tile, reps = [(1, 40)], 2, 16, 8, 16, 1
    check_shape, tune = (2, 40, 2), "4x2x2" if args.tune else ""
    kv_splits = "1,3" if kv_splits else ""  # 3: uneven (and empty) shares
  device = jax.devices()[0].device_kind
  print("device:", device, "jax", jax.__version__, flush=True)
  result = {"device": device, "jax": jax.__version__, "smoke": args.smoke}
  if not args.no_check:  # "splits": the default kernel on (d)'s smaller set of cases
    result["check"] = check(check_shape, block_len, tile,
                            kv_splits=None if args.check_scope == "all" else 1)
  skip = {}
  if any(p in paths for p in MOSAIC_PATHS):  # checked first, whatever --no_check says
    result["check_mosaic"] = check(check_shape, block_len, tile, impl=MOSAIC)
    # Timed only if it passed; and --dim / --tile, which the check does not cover, may be
    # ones it refuses.
    verdict = (mosaic_verdict(result["check_mosaic"])
               or why_not_here(MOSAIC, jnp.bfloat16, d, block_len, tile))
    skip = {p: verdict for p in MOSAIC_PATHS}
  if args.bwd_parts or any(p in paths for p in MOSAIC_BWD_PATHS):  # the Mosaic backward too
    result["check_mosaic_bwd"] = check(check_shape, block_len, tile, impl=MOSAIC_BWD)
    verdict = (mosaic_verdict(result["check_mosaic_bwd"], "check_mosaic_bwd")
               or why_not_here(MOSAIC, jnp.bfloat16, d, block_len, tile))
    skip.update({p: verdict for p in MOSAIC_BWD_PATHS})
  result["rows"] = [bench_one(b, t, h, d, block_len, tile, reps, paths=paths, skip=skip)
                    for b, t in shapes]
  result["bwd_parts"] = [bench_bwd_parts(b, t, h, d, block_len, tile, reps,
                                         mosaic_skip=skip.get(MOSAIC_BWD, ""))
                         for b, t in shapes] if args.bwd_parts else []
  result["kv_splits"] = bench_splits(kv_splits, shapes, h, d, block_len, tile, reps,
                                     check_shape, result, check_first=not args.no_check)
  result["tune"] = []
  if tune:
    b, t = max(shapes, key=lambda s: s[1])
    for c in tune.split(","):
      w, s, r = (int(x) for x in (c + "x1").split("x")[:3])
      row = bench_one(b, t, h, d, block_len, tile, reps,
                      tuning=(("num_warps", w), ("num_stages", s), ("q_groups", r)))
      result["tune"].append({k: row.get(k) for k in ("B", "T", "tuning", "kernel_core_fwd_ms",
                                                     "kernel_core_fwdbwd_ms")})
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "bench_landmark.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nwrote {path}")
  if "check" in result:
    worst = {}
    for c in result["check"]:
      key = c["dtype"]
      worst[key] = max(worst.get(key, 0.0), max(c["max_rel_err"].values(), default=0.0))
    ok = all(c["ok"] for c in result["check"])
    print(f"check: {'PASS' if ok else 'FAIL'}; max relative error per dtype {worst}")
  for key_, label in (("check_mosaic", MOSAIC), ("check_mosaic_bwd", MOSAIC_BWD)):
    rows = result.get(key_)
    if not rows:
      continue
    worst = {}
    for c in rows:
      if "skipped" not in c:
        key = (c["dtype"], c["D"])
        worst[key] = max(worst.get(key, 0.0), max(c["max_rel_err"].values(), default=0.0))
    verdict = mosaic_verdict(rows, key_)
    print(f"check {label}: {'PASS' if not verdict else verdict}; "
          f"{sum('skipped' not in c for c in rows)} cases ran, "
          f"{sum('skipped' in c for c in rows)} skipped; max relative error per (dtype, D) {worst}")
  if result.get("check_kv_splits"):
    worst = {}
    for c in result["check_kv_splits"]:
      key = (c["kv_splits"], c["dtype"])
      worst[key] = max(worst.get(key, 0.0), max(c["max_rel_err"].values(), default=0.0))
    ok = all(c["ok"] for c in result["check_kv_splits"])
    print(f"check kv_splits: {'PASS' if ok else 'FAIL'}; max relative error per (S, dtype) "
          f"{worst}")
  if result["tune"]:
    print("tune (kernels alone, ms fwd / fwd+bwd):")
    for r in result["tune"]:
      print(f"  {r['tuning']}: {r['kernel_core_fwd_ms']} / {r['kernel_core_fwdbwd_ms']}")
  names = PATHS + tuple(p for p in MOSAIC_PATHS + MOSAIC_BWD_PATHS if p in paths)
  print(f"\nH={h} D={d} bf16 block_len={block_len}; median ms, fwd / fwd+bwd; kernels compiled "
        f"(fwd / fwd+bwd) per path: "
        + ", ".join(f"{n} {r.get(n + '_kernels')}" for r in result["rows"][:1] for n in names))
  print(f"{'B':>3} {'T':>6} " + " ".join(f"{n:>25}" for n in names)
        + f" {'chunked/kernel':>15} {'kernel/cudnn':>13}")
  for r in result["rows"]:
    cells = []
    for n in names:
      cells.append(table_cell(r, n) or f"{'error' if f'{n}_error' in r else 'not timed':>25}")

    def ratio(a, b, r=r, part="fwdbwd"):
      ka, kb = f"{a}_{part}_ms", f"{b}_{part}_ms"
      return f"{r[ka] / r[kb]:.2f}" if ka in r and kb in r else "-"
    print(f"{r['B']:>3} {r['T']:>6} " + " ".join(f"{c:>25}" for c in cells)
          + f" {ratio('chunked_xla', 'kernel'):>15} {ratio('kernel', 'cudnn_causal'):>13}")
    for p in MOSAIC_PATHS + MOSAIC_BWD_PATHS:
      if f"{p}_skipped" in r:
        print(f"    {p} not timed: {r[f'{p}_skipped']}")
    if MOSAIC + "_core_fwd_ms" in r:  # the forward is the Mosaic kernel's, the backward Triton's
      print(f"    Triton / Mosaic kernels alone: fwd "
            f"{ratio('kernel_core', MOSAIC + '_core', part='fwd')}x, fwd+bwd "
            f"{ratio('kernel_core', MOSAIC + '_core')}x")
    if MOSAIC_BWD + "_core_fwd_ms" in r:  # Mosaic forward and backward
      print(f"    Triton / Mosaic fwd+bwd kernels alone: "
            f"{ratio('kernel_core', MOSAIC_BWD + '_core')}x")
  if result["bwd_parts"]:
    print_bwd_parts(result["bwd_parts"], h, d, block_len)
  if result["kv_splits"]:
    print_splits(result["kv_splits"], h, d, block_len)
  failed = [c for c in result.get("check", []) + result.get("check_kv_splits", [])
            + result.get("check_mosaic", []) + result.get("check_mosaic_bwd", [])
            if not c["ok"]]
  if failed:
    print("CHECK FAILED")
    sys.exit(1)
  return result


if __name__ == "__main__":
  main()
