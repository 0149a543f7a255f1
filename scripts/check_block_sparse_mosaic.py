"""Mosaic GPU block-sparse kernels: check against reference.py, then time beside cuDNN, Triton.

    python scripts/check_block_sparse_mosaic.py --out $OUT            # on an H100/H200
    python scripts/check_block_sparse_mosaic.py --smoke               # CPU: lower for cuda only
    python scripts/check_block_sparse_mosaic.py --bwd split,fused --check 'split:core;fused:all'
    python scripts/check_block_sparse_mosaic.py --part check --bwd split,staged,fused,fused_keys \
      --cases window                                                  # the sliding window

`--bwd` names backward variants (pallas_mosaic_gpu.BACKWARDS) to check and time side by side
in one run, the first being the baseline; `--check` gives each its own cases. A variant may
carry the backward kernels' register split, `<bwd>@<consumer>-<producer>` (e.g.
`split@240-24`, FlashAttention-3's; the default is pallas_mosaic_gpu.REGISTERS).

1. Check (before any timing): forward (o, lse) and every gradient (dq, dk, dv, d kv_bias) of
   the Mosaic GPU path against reference.py in float32 on the same bf16 / f16 inputs, through
   the op's public entry (padding, custom_vjp): head dims 64 and 128, ragged T, empty and full
   rows, causal edges, GQA, segments, the top-w threshold, per-head positions, tiles 64 and 128,
   the sliding window (`--cases window`: under a tile and over several, causal over the band's
   lists and non-causal over random ones; "auto" keeps windowed calls off these kernels until
   they pass, and the run records that impl="pallas_mosaic_gpu" takes one on this device).
   Float32 inputs must be refused with a one-line ValueError naming q.dtype and the fix.
2. Time (median ms) at B=4, H=16, D=128, bf16: cuDNN dense / causal
   (jax.nn.dot_product_attention(implementation="cudnn")), the Triton backend (pallas_gpu) and
   the Mosaic GPU one on the same inputs and lists: all tiles, random 25 % and 10 % of tiles
   per row, the causal list. Forward, and forward+backward returning the forward output too
   (so no kernel is dropped); TFLOP/s on visited tiles; the number of custom calls in each
   row's compiled HLO. A backend whose check failed is not timed (its rows say so).
A table is printed last; details go to <out>/mosaic_check.json and <out>/mosaic_bench.json.

The Mosaic kernels are reached through api.py's Pallas custom_vjp with the platform's kernel
module swapped for pallas_mosaic_gpu (`mosaic_kernels`), which is the one table entry the
dispatcher needs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
import traceback
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from effattn.evaluate.timing import median_ms  # noqa: E402
from effattn.kernels import dispatch  # noqa: E402
from effattn.kernels.block_sparse import api, pallas_mosaic_gpu  # noqa: E402
from effattn.kernels.block_sparse import (block_sparse_attention, causal_block_mask,  # noqa: E402
                                          lists_from_block_mask)

_START = time.time()


def variant(spec: str) -> dict:
  """"<bwd>[@<consumer>-<producer>]" -> pallas_mosaic_gpu.backward's bwd= and registers=."""
  bwd, _, regs = spec.partition("@")
  if bwd not in pallas_mosaic_gpu.BACKWARDS:
    raise SystemExit(f"backward variant {spec!r}: {bwd!r} not in {pallas_mosaic_gpu.BACKWARDS}")
  if not regs:
    return {"bwd": bwd}
  try:
    registers = tuple(int(x) for x in regs.split("-"))
  except ValueError:
    registers = ()
  if len(registers) != 2:
    raise SystemExit(f"backward variant {spec!r}: registers go as @<consumer>-<producer>, "
                     "e.g. split@240-24")
  return {"bwd": bwd, "registers": registers}


@contextlib.contextmanager
def mosaic_kernels(spec: str = "split"):
  """Routes impl='pallas_gpu' to the Mosaic GPU kernels, backward variant `spec` (`variant`),
  while tracing inside this block."""
  if not hasattr(api, "_kernel_module"):
    raise RuntimeError("api._kernel_module is gone: wire pallas_mosaic_gpu into the new "
                       "dispatcher and call it by its impl name here")
  saved = api._kernel_module
  module = types.SimpleNamespace(
      forward=pallas_mosaic_gpu.forward,
      backward=functools.partial(pallas_mosaic_gpu.backward, **variant(spec)))
  api._kernel_module = lambda platform: module if platform == "gpu" else saved(platform)
  try:
    yield
  finally:
    api._kernel_module = saved


def _kernels(backend: str):
  """The trace-time context of a backend: "mosaic" or "mosaic:<bwd>" swap the kernels in."""
  if backend.startswith("mosaic"):
    return mosaic_kernels(*backend.split(":")[1:])
  return contextlib.nullcontext()


def attention(backend: str, *args, **kwargs):
  """backend "mosaic[:<bwd>]", "triton" or "reference"; the op with that path (a trace-time
  switch: call it while tracing)."""
  impl = "reference" if backend == "reference" else "pallas_gpu"
  with _kernels(backend):
    return block_sparse_attention(*args, impl=impl, **kwargs)


# ------------------------------------------------------------------------------------------
# 1. Check

CASES = [
    # name, (B, T, H, H_kv, D, bq, bk), pattern, causal, features, dtype, gates timing
    ("causal-d128-b128", (2, 1024, 4, 4, 128, 128, 128), "causal", True, (), "bfloat16", True),
    ("full-d128-b128", (1, 512, 2, 2, 128, 128, 128), "full", False, (), "bfloat16", True),
    ("random-d128-b128", (2, 768, 2, 2, 128, 128, 128), "random", False, (), "bfloat16", True),
    ("gqa-causal-ragged-d64", (2, 1000, 8, 2, 64, 128, 128), "causal", True, (), "bfloat16",
     False),
    ("mqa-random-b64-bias", (1, 900, 4, 1, 128, 64, 64), "random", True, ("bias",), "bfloat16",
     False),
    ("segments-b64x128-d64", (2, 640, 4, 2, 64, 64, 128), "random", False, ("segments",),
     "bfloat16", False),
    ("threshold-positions-b128x64", (1, 512, 4, 2, 128, 128, 64), "causal", True,
     ("bias", "threshold", "head_positions"), "bfloat16", False),
    ("f16-causal-segments-b64", (1, 320, 2, 1, 64, 64, 64), "causal", True, ("segments",),
     "float16", False),
    # Pieces of threshold-positions-b128x64, to tell which one a failure comes from.
    ("causal-b128x64", (1, 512, 4, 2, 128, 128, 64), "causal", True, (), "bfloat16", False),
    ("positions-b128x64", (1, 512, 4, 2, 128, 128, 64), "causal", True, ("head_positions",),
     "bfloat16", False),
    ("threshold-b128", (1, 512, 4, 2, 128, 128, 128), "causal", True, ("bias", "threshold"),
     "bfloat16", False),
    # A sliding window ("window=N", `--cases window`): over the band's causal lists, or inside
    # random non-causal lists (positions by token index without causality; empty rows).
    ("window200-gqa-ragged-d64", (2, 1000, 8, 2, 64, 128, 128), "causal", True, ("window=200",),
     "bfloat16", False),
    ("window40-mqa-b64-bias", (1, 512, 4, 1, 128, 64, 64), "causal", True,
     ("bias", "window=40"), "bfloat16", False),
    ("window300-random-segments-b128x64", (1, 768, 4, 2, 128, 128, 64), "random", False,
     ("segments", "window=300"), "bfloat16", False),
]
SMOKE_CASES = [
    ("smoke-causal-gqa", (1, 256, 4, 2, 128, 128, 128), "causal", True, (), "bfloat16", True),
    ("smoke-b64-bias-thr", (1, 200, 2, 1, 64, 64, 64), "random", True,
     ("bias", "threshold", "segments"), "bfloat16", False),
    ("smoke-window-segments", (1, 256, 4, 2, 64, 64, 128), "random", False,
     ("segments", "window=100"), "bfloat16", False),
]
REL_TOL = 1e-2  # ||got - ref|| / ||ref|| for bf16 / f16 operands (METHOD: 1e-3 .. 1e-2)


def _window(features) -> int | None:
  """The sliding window of a case's features ("window=N"), or None."""
  return next((int(f.split("=")[1]) for f in features if f.startswith("window=")), None)


def _pattern(kind, key, b, h, n_q, n_k, bq, bk, window=None):
  if kind == "random":  # per-head lists with an empty first row and a full last row
    m = jax.random.bernoulli(key, 0.35, (b, h, n_q, n_k))
    return m.at[:, :, 0].set(False).at[:, :, -1].set(True)
  if kind == "causal":  # one list shared by every batch and head (the band, with a window)
    return causal_block_mask(n_q, n_k, bq, bk, window=window)[None, None]
  if kind == "full":
    return jnp.ones((1, 1, n_q, n_k), bool)
  raise ValueError(kind)


def _case_inputs(name, dims, pattern, causal, features, dtype):
  b, t, h, h_kv, d, bq, bk = dims
  dtype = jnp.dtype(dtype)
  keys = jax.random.split(jax.random.key(zlib.crc32(name.encode())), 10)
  q = jax.random.normal(keys[0], (b, t, h, d)).astype(dtype)
  k = jax.random.normal(keys[1], (b, t, h_kv, d)).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, h_kv, d)).astype(dtype)
  window = _window(features)
  idx, cnt = lists_from_block_mask(_pattern(pattern, keys[3], b, h, -(-t // bq), -(-t // bk),
                                            bq, bk, window))
  bias = jax.random.normal(keys[4], (b, h_kv, t)) if "bias" in features else None
  extra = {}
  if "segments" in features:
    seg = (jnp.arange(t) >= t // 3).astype(jnp.int32) + (jnp.arange(t) >= (2 * t) // 3)
    extra.update(q_segment_ids=jnp.broadcast_to(seg, (b, t)),
                 kv_segment_ids=jnp.broadcast_to(seg, (b, t)))
  if "head_positions" in features:
    perm = jax.random.permutation(keys[5], t)
    extra["q_positions"] = jnp.broadcast_to(perm, (b, h, t))
    extra["kv_positions"] = jnp.broadcast_to(perm, (b, h_kv, t))
  if "threshold" in features:
    bias = bias.at[:, :, 3].set(bias[:, :, 5])  # a tie, broken by position
    order = jnp.argsort(-bias, axis=-1, stable=True)[..., t // 2]
    extra["q_threshold"] = jnp.broadcast_to(jnp.take_along_axis(bias, order[..., None], -1),
                                            (b, h_kv, t))
    extra["q_threshold_pos"] = jnp.broadcast_to(order[..., None], (b, h_kv, t))
  kw = dict(block_q=bq, block_k=bk, causal=causal, window=window, **extra)
  do = jax.random.normal(keys[6], q.shape).astype(dtype)
  dlse = jax.random.normal(keys[7], (b, h, t))
  return (q, k, v, bias), idx, cnt, kw, (do, dlse)


def _vjp_fn(backend, idx, cnt, kw):
  def f(q, k, v, bias, do, dlse):
    def g(q, k, v, bias):
      return attention(backend, q, k, v, idx, cnt, kv_bias=bias, **kw)
    (o, lse), vjp = jax.vjp(g, q, k, v, bias)
    dlse = jnp.where(jnp.isfinite(lse), dlse, 0.0)
    return (o, lse), vjp((do.astype(o.dtype), dlse))
  return f


def _rel_err(name, want, got) -> tuple[float, str]:
  want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
  finite = np.isfinite(want)
  if not np.array_equal(finite, np.isfinite(got)):
    wrong = int((finite != np.isfinite(got)).sum())
    return float("inf"), f"{name}: -inf/NaN pattern differs ({wrong} elements)"
  with np.errstate(invalid="ignore"):
    diff = np.where(finite, got - want, 0.0)
  ref = np.where(finite, want, 0.0)
  err = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))
  return err, ""


def _compiled(f, args, platform=None, backend="mosaic"):
  """(compiled or lowered text, seconds): lower (for `platform` only, if given) and compile."""
  start = time.time()
  # Off the GPU (--smoke on CPU), choose paths as on the GPU so that the kernels lower.
  off_gpu = platform and jax.default_backend() != "gpu"
  with _kernels(backend), dispatch.lower_for("gpu") if off_gpu else contextlib.nullcontext():
    traced = jax.jit(f).trace(*args)
    if platform:
      return traced.lower(lowering_platforms=(platform,)).as_text(), time.time() - start
    return traced.lower().compile(), time.time() - start


def _kernel_count(bwd: str) -> int:
  """Mosaic kernels of forward + backward: the fused backward is one kernel, the others two."""
  return 2 if bwd.startswith("fused") else 3


def check_case(case, bwds, lower_only: bool) -> dict:
  """One case against the reference, for each backward variant in `bwds`: {bwd: row}, each
  row {ok, fwd_ok, rel_err, seconds} or {ok: False, error}. The reference runs once."""
  name, dims, pattern, causal, features, dtype, gates = case
  rows = {}
  try:
    args, idx, cnt, kw, cot = _case_inputs(name, dims, pattern, causal, features, dtype)
    want = None
    if not lower_only:
      up = [None if x is None else x.astype(jnp.float32) for x in args]
      want = jax.jit(_vjp_fn("reference", idx, cnt, kw))(*up, *cot)
  except Exception as e:  # noqa: BLE001
    err = "".join(traceback.format_exception_only(e)).strip()[-2000:]
    return {bwd: {"ok": False, "error": f"inputs/reference: {err}"} for bwd in bwds}
  for bwd in bwds:
    row = rows[bwd] = {"case": name, "bwd": bwd, "dims": dims, "pattern": pattern,
                       "causal": causal, "features": features, "dtype": dtype,
                       "gates_timing": gates, "ok": False}
    backend = f"mosaic:{bwd}"
    try:
      f = _vjp_fn(backend, idx, cnt, kw)
      if lower_only:
        text, row["lower_s"] = _compiled(f, (*args, *cot), platform="cuda", backend=backend)
        row["custom_calls"] = text.count("custom_call @mosaic_gpu")
        row["ok"] = row["custom_calls"] == _kernel_count(bwd)
        continue
      row["rel_err"], notes = {}, []

      def compare(names, wants, gots, row=row, notes=notes):
        for gname, w, g in zip(names, wants, gots):
          if w is not None:
            row["rel_err"][gname], note = _rel_err(gname, w, g)
            notes.extend([note] if note else [])
        return all(e <= REL_TOL for e in row["rel_err"].values()) and not notes

      print(f"check {name}:{bwd}: compiling", flush=True)
      try:
        compiled, row["compile_s"] = _compiled(f, (*args, *cot), backend=backend)
      except Exception:  # the backward did not build: still give the forward its verdict
        fwd, row["compile_fwd_s"] = _compiled(lambda *a, f=f: f(*a)[0], (*args, *cot),
                                              backend=backend)
        row["fwd_ok"] = compare(("o", "lse"), want[0], fwd(*args, *cot))
        raise
      start = time.time()
      (o, lse), grads = jax.block_until_ready(compiled(*args, *cot))
      row["run_s"] = time.time() - start
      row["fwd_ok"] = compare(("o", "lse"), want[0], (o, lse))
      row["ok"] = compare(("dq", "dk", "dv", "dbias"), want[1], grads)
      if notes:
        row["notes"] = notes
    except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
      row["error"] = "".join(traceback.format_exception_only(e)).strip()[-2000:]
  return rows


def check_f32_refused() -> dict:
  """Float32 operands must be refused: a ValueError naming q.dtype (the dispatcher's limits
  keep `auto` off these kernels for them; a direct call gets the error)."""
  q = jnp.zeros((1, 128, 1, 64), jnp.float32)
  idx, cnt = lists_from_block_mask(jnp.ones((1, 1, 1, 1), bool))
  try:
    _compiled(lambda q: attention("mosaic", q, q, q, idx, cnt, block_q=128, block_k=128), (q,),
              platform="cuda")
    return {"ok": False, "error": "float32 inputs were accepted"}
  except ValueError as e:
    return {"ok": "q.dtype=float32" in str(e), "message": str(e)}


def check_window_forced() -> dict:
  """On this GPU a windowed call forced to impl="pallas_mosaic_gpu" takes it (the window
  cases above reach the same kernels through the module swap); "auto" is recorded (the Mosaic
  path since the window cases passed on 2026-12-03)."""
  shapes = dict(head_dim=128, dtype="bfloat16", block_q=128, block_k=128, window=200)
  try:
    forced = api.FAMILY.choose("pallas_mosaic_gpu", **shapes).path
  except dispatch.PathError as e:
    return {"ok": False, "error": str(e)}
  return {"ok": forced == "pallas_mosaic_gpu", "auto": api.FAMILY.choose("auto", **shapes).path}


def check(plan, lower_only: bool, path: str) -> dict:
  """Runs plan [(case, bwds)] in order, rewriting `path` after each case (a hang leaves the
  earlier ones). Results are keyed "<case>:<bwd>"."""
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f).get("checks", {})
  for case, bwds in plan:
    name = case[0]
    print(f"check {name}: start ({', '.join(bwds)})", flush=True)
    for bwd, row in check_case(case, bwds, lower_only=lower_only).items():
      results[f"{name}:{bwd}"] = row
      errs = " ".join(f"{k}={v:.1e}" for k, v in row.get("rel_err", {}).items())
      print(f"check {name + ':' + bwd:44s} {'ok' if row['ok'] else 'FAIL'} {errs} "
            f"{row.get('error', '')[-600:]} {row.get('notes', '')}", flush=True)
    with open(path, "w") as f:
      json.dump({"jax": jax.__version__, "checks": results}, f, indent=1, default=str)
  results["f32-refused"] = check_f32_refused()
  print(f"check f32-refused {results['f32-refused']}", flush=True)
  if not lower_only and any(_window(case[4]) for case, _ in plan):
    results["window-forced"] = check_window_forced()
    print(f"check window-forced {results['window-forced']}", flush=True)
  with open(path, "w") as f:
    json.dump({"jax": jax.__version__, "checks": results}, f, indent=1, default=str)
  return results


# ------------------------------------------------------------------------------------------
# 2. Time


def _random_pattern(key, b, h, n_q, n_k, density):
  keep = max(1, round(density * n_k))
  ranks = jnp.argsort(jax.random.uniform(key, (b, h, n_q, n_k)), axis=-1).argsort(axis=-1)
  return ranks < keep


def bench(t, args_ok: dict, reps: int, deadline: float, bwds=("split",), triton=True, b=4,
          h=16, d=128, block=128):
  """Rows of one sequence length; each row {name, fwd_ms, fwdbwd_ms, calls, tflops...}.

  Mosaic rows per backward variant in `bwds` ("mosaic:<bwd>-<pattern>"); the forward is the
  same kernel for all of them, so it is timed in the first variant's row only. The lists are
  jit arguments ([B, H, nQ, K] for every pattern), so one compiled executable per (backend,
  causal, mode) serves all patterns.
  """
  rows, cache = [], {}
  keys = jax.random.split(jax.random.key(t), 5)
  q, k, v, do = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in keys[:4])
  n = t // block
  flops_dense = 4.0 * b * h * t * t * d

  def with_grads(f):
    def run(q, k, v, do, *lists):
      (o, lse), vjp = jax.vjp(lambda q, k, v: f(q, k, v, *lists), q, k, v)
      return o, lse, vjp((do, jnp.zeros_like(lse)))
    return run

  def timed(name, f, lists, flops, backend, causal, blk=block, modes=("fwd", "fwdbwd")):
    row = {"name": name, "t": t, "backend": backend, "flops_fwd": flops}
    rows.append(row)
    if time.time() > deadline:
      row["skipped"] = "time budget"
      print(f"bench {name}: skipped (time budget)", flush=True)
      return
    if not args_ok.get(f"{backend}_fwd", args_ok.get(backend, False)):
      row["skipped"] = "failed its check"
      print(f"bench {name}: not timed (failed its check)", flush=True)
      return
    for mode, fn, args, mult in (("fwd", f, (q, k, v, *lists), 1.0),
                                 ("fwdbwd", with_grads(f), (q, k, v, do, *lists), 3.5)):
      if mode not in modes:
        continue
      if mode == "fwdbwd" and not args_ok.get(backend, False):
        row["fwdbwd_error"] = "backward failed its check: not timed"
        continue
      try:
        key = (backend, causal, mode, blk)
        if key not in cache:
          start = time.time()
          with _kernels(backend):
            cache[key] = jax.jit(fn).lower(*args).compile()
          row[f"{mode}_compile_s"] = time.time() - start
        compiled = cache[key]
        row[f"{mode}_ms"] = median_ms(compiled, *args, reps=reps)
        row[f"{mode}_calls"] = compiled.as_text().count("custom_call_target=")
        row[f"{mode}_tflops"] = mult * flops / row[f"{mode}_ms"] / 1e9
      except Exception as e:  # noqa: BLE001
        row[f"{mode}_error"] = "".join(traceback.format_exception_only(e)).strip()[-1500:]
        print(f"bench {name} {mode}: ERROR {row[f'{mode}_error'][-800:]}", flush=True)
    print(f"bench {name}: " + " ".join(f"{k_}={v_:.3f}" if isinstance(v_, float) else
                                       f"{k_}={v_}" for k_, v_ in row.items()
                                       if k_.endswith(("_ms", "_calls", "_tflops", "_s"))),
          flush=True)

  def cudnn(c):
    return lambda q, k, v: (
        jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="cudnn"),
        jnp.zeros((b, h, t), jnp.float32))

  def ours(backend, c, blk=block):
    return lambda q, k, v, idx, cnt: attention(backend, q, k, v, idx, cnt, block_q=blk,
                                               block_k=blk, causal=c)

  # The dense and causal rows first: a run that meets its time budget loses random rows first.
  patterns = [(False, "all", jnp.ones((1, 1, n, n), bool)),
              (True, "causal-list", causal_block_mask(n, n, block, block)[None, None])] + [
                  (False, f"random{int(rho * 100)}", _random_pattern(keys[4], b, h, n, n, rho))
                  for rho in (0.25, 0.10)]
  for causal, pname, pat in patterns:
    if pname in ("all", "causal-list"):
      timed(f"cudnn-{'causal' if causal else 'dense'}", cudnn(causal), (),
            flops_dense / (2 if causal else 1), "cudnn", causal)
    idx, cnt = lists_from_block_mask(jnp.broadcast_to(pat, (b, h, n, n)))
    flops = 4.0 * float(jnp.sum(cnt)) * block * block * d
    for i, bwd in enumerate(bwds):
      timed(f"mosaic:{bwd}-{pname}", ours(f"mosaic:{bwd}", causal), (idx, cnt), flops,
            f"mosaic:{bwd}", causal, modes=("fwd", "fwdbwd") if i == 0 else ("fwdbwd",))
    if triton:
      timed(f"triton-{pname}", ours("triton", causal), (idx, cnt), flops, "triton", causal)
  if not triton:
    return rows
  # Triton at its default tiles (64): its best, as the baseline was measured.
  m = t // 64
  for pname, pat, causal in (("all", jnp.ones((1, 1, m, m), bool), False),
                             ("causal-list", causal_block_mask(m, m, 64, 64)[None, None], True)):
    idx, cnt = lists_from_block_mask(jnp.broadcast_to(pat, (b, h, m, m)))
    flops = 4.0 * float(jnp.sum(cnt)) * 64 * 64 * d
    timed(f"triton64-{pname}", ours("triton", causal, 64), (idx, cnt), flops, "triton", causal,
          64)
  return rows


def _table(rows):
  """Markdown: each row against cuDNN (dense, or causal for the causal list; rho-normalized
  for the random patterns), each Mosaic fwd+bwd against the first (baseline) backward
  variant's on the same pattern, and against Triton on the same lists where it was timed."""
  by = {(r["t"], r["name"]): r for r in rows}
  first = {}  # (t, pattern) -> the first Mosaic row: its forward serves every variant
  for r in rows:
    if r["name"].startswith("mosaic:"):
      first.setdefault((r["t"], r["name"].split("-", 1)[1]), r)
  lines = ["| T | row | fwd ms | fwd+bwd ms | fwd vs cuDNN | fwd+bwd vs cuDNN | fwd+bwd vs "
           "first variant | vs Triton fwd / fwd+bwd | TFLOP/s visited fwd / fwd+bwd | "
           "custom calls fwd / fwd+bwd |", "|---" * 10 + "|"]
  fmt = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
  for r in rows:
    if "skipped" in r:
      lines.append(f"| {r['t']} | {r['name']} | {r['skipped']} |" + " |" * 7)
      continue
    pattern = r["name"].split("-", 1)[1] if r["name"].startswith("mosaic:") else None
    base = first.get((r["t"], pattern), {}) if pattern else {}
    fwd_ms = r.get("fwd_ms", base.get("fwd_ms") if pattern else None)
    ref = by.get((r["t"], "cudnn-causal" if "causal" in r["name"] else "cudnn-dense"), {})
    tri = by.get((r["t"], f"triton-{pattern}"), {}) if pattern else {}
    density = int(r["name"][-2:]) / 100 if r["name"].endswith(("random25", "random10")) else 1
    vs_ref, vs_tri = [], []
    for mode, ms in (("fwd", fwd_ms), ("fwdbwd", r.get("fwdbwd_ms"))):
      ref_ms, tms = ref.get(f"{mode}_ms"), tri.get(f"{mode}_ms")
      if ms is None or ref_ms is None:
        vs_ref.append("")
      else:
        vs_ref.append(f"{ms / ref_ms / density:.2f} rho" if density < 1 else
                      f"{ms / ref_ms:.2f}x")
      vs_tri.append("" if ms is None or tms is None else f"{ms / tms:.2f}x")
    vs_first = ""
    if pattern and r is not base and r.get("fwdbwd_ms") and base.get("fwdbwd_ms"):
      vs_first = f"{r['fwdbwd_ms'] / base['fwdbwd_ms']:.3f}x"
    tflops_fwd = r.get("fwd_tflops", base.get("fwd_tflops") if pattern else None)
    lines.append(
        f"| {r['t']} | {r['name']} | {fmt(fwd_ms)} | {fmt(r.get('fwdbwd_ms'))} | "
        f"{vs_ref[0]} | {vs_ref[1]} | {vs_first} | {vs_tri[0]} / {vs_tri[1]} | "
        f"{fmt(tflops_fwd)} / {fmt(r.get('fwdbwd_tflops'))} | "
        f"{r.get('fwd_calls', base.get('fwd_calls', '?'))} / {r.get('fwdbwd_calls', '?')} |")
  return "\n".join(lines)


def _select(cases, spec: str):
  """Cases by a spec: 'all', 'core' (those gating the timing), 'features' (the rest),
  'window' (those with a sliding window), or names joined by ',' or '+' (each may be one of
  those groups too)."""
  picked = []
  for part in spec.replace("+", ",").split(","):
    if part == "all":
      chosen = cases
    elif part in ("core", "features"):
      chosen = [c for c in cases if c[-1] == (part == "core")]
    elif part == "window":
      chosen = [c for c in cases if _window(c[4])]
    else:
      chosen = [c for c in cases if c[0] == part]
      if not chosen:
        raise SystemExit(f"--cases/--check: no check case named {part!r}")
    picked += [c for c in chosen if c not in picked]
  return picked


def _plan(cases, spec_cases: str, bwds, spec_check: str | None):
  """[(case, [bwd, ...])] in case order: --check 'bwd:cases;bwd:cases' or --cases x --bwd."""
  wanted = []  # (case, bwd)
  if spec_check:
    for group in spec_check.split(";"):
      bwd, _, names = group.partition(":")
      variant(bwd)
      wanted += [(c, bwd) for c in _select(cases, names or "all")]
  else:
    wanted = [(c, bwd) for c in _select(cases, spec_cases) for bwd in bwds]
  return [(c, [bwd for c2, bwd in wanted if c2 is c]) for c in cases
          if any(c2 is c for c2, _ in wanted)]


def _timing_gates(checks: dict, bwds) -> dict:
  """backend -> may it be timed: a Mosaic variant needs at least one gating check, all passed
  (mosaic:<bwd>_fwd: all their forwards passed)."""
  ok = {"triton": True, "cudnn": True}
  for bwd in bwds:
    gates = [c for c in checks.values() if c.get("gates_timing") and c.get("bwd") == bwd]
    ok[f"mosaic:{bwd}"] = bool(gates) and all(c["ok"] for c in gates)
    ok[f"mosaic:{bwd}_fwd"] = bool(gates) and all(c.get("fwd_ok", c["ok"]) for c in gates)
  return ok


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes; on CPU only lower the kernels for cuda")
  parser.add_argument("--part", choices=("all", "check", "bench"), default="all",
                      help="check / bench in separate processes (a hung kernel then costs one "
                      "part); bench reads the check's JSON to decide what it may time")
  parser.add_argument("--cases", default="all",
                      help="comma-separated check case names, or 'core' (those gating the "
                      "timing), 'features' (the rest), 'window' (sliding-window cases) or "
                      "'all'")
  parser.add_argument("--bwd", default="split",
                      help="comma-separated backward variants to check and time "
                      f"({', '.join(pallas_mosaic_gpu.BACKWARDS)}); the first is the baseline "
                      "the others are compared with")
  parser.add_argument("--check", default=None,
                      help="per-variant check plan instead of --cases x --bwd, e.g. "
                      "'fused:core+mqa-random-b64-bias;staged:core'")
  parser.add_argument("--no-triton", action="store_true", help="time no Triton rows")
  parser.add_argument("--t", type=int, nargs="*", default=[16384],
                      help="sequence lengths to time")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--budget-s", type=float, default=380.0,
                      help="stop starting new timing rows after this many seconds")
  parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  args = parser.parse_args()
  bwds = args.bwd.split(",")
  for bwd in bwds:
    variant(bwd)
  on_gpu = jax.default_backend() == "gpu"
  print(f"jax {jax.__version__} backend {jax.default_backend()} devices {jax.devices()}",
        flush=True)
  os.makedirs(args.out, exist_ok=True)
  check_path = os.path.join(args.out, "mosaic_check.json")
  report = {"jax": jax.__version__, "device": str(jax.devices()[0]), "checks": {}, "rows": []}
  if args.part in ("all", "check"):
    plan = _plan(SMOKE_CASES if args.smoke else CASES, args.cases, bwds, args.check)
    report["checks"] = check(plan, lower_only=not on_gpu, path=check_path)
  elif os.path.exists(check_path):
    with open(check_path) as f:
      report["checks"] = json.load(f)["checks"]
  checks = report["checks"]
  if on_gpu and not args.smoke and args.part in ("all", "bench"):
    ok = _timing_gates(checks, bwds)
    print(f"timing gates: {ok}", flush=True)
    deadline = _START + args.budget_s
    for t in args.t:
      try:
        report["rows"] += bench(t, ok, args.reps, deadline, bwds=bwds,
                                triton=not args.no_triton)
      except Exception as e:  # noqa: BLE001
        print(f"bench T={t}: ERROR {e}", flush=True)
      with open(os.path.join(args.out, "mosaic_bench.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
  failed = [n for n, c in checks.items() if not c["ok"]]
  print(f"\nchecks: {len(checks) - len(failed)} ok, {len(failed)} failed {failed}")
  if report["rows"]:
    print(_table(report["rows"]))
  print(f"wrote {args.out}/mosaic_*.json; {time.time() - _START:.0f} s")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
