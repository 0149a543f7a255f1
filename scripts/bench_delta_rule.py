"""Gated delta rule on one GPU: numerics against fla and our reference, then fwd+bwd beside fla.

    python scripts/bench_delta_rule.py --out DIR                    # everything
    python scripts/bench_delta_rule.py --out DIR --tune-sizes ''    # no block-size sweep
    python scripts/bench_delta_rule.py --out DIR --fla-results OLD  # reuse fla's part
    python scripts/bench_delta_rule.py --out DIR --no-fla --skip-check  # our timings only
    python scripts/bench_delta_rule.py --out DIR --smoke            # CPU self-test (interpret)
    python scripts/bench_delta_rule.py --out DIR --backward split   # one backward only
    python scripts/bench_delta_rule.py --out DIR --form ungated     # log gates 0, fla's
                                                                    # chunk_delta_rule as peer
    python scripts/bench_delta_rule.py --out DIR --kernel-sizes 32768 --tune-kernels
                                        # each kernel timed alone, then a per-kernel sweep

Parts, in order (results.json and table.md under --out, written after every row):
1. fla (flash-linear-attention 0.6.0, carried as wheels) in a subprocess, before JAX takes the
   GPU: chunk_gated_delta_rule on the check inputs (bf16 q, k, v and b, float32 log gates and
   initial state, T = 1000: not a multiple of the chunk; random cotangents on o AND the final
   state), outputs and gradients saved in fla_check.npz; then fwd and fwd+bwd medians
   (triton.testing.do_bench) at --sizes. fla autotunes on first use. Where fla's backward
   refuses (fla 0.6.0 with Triton 3.4-3.7.0 on Hopper: chunk_bwd_dqkwg, fla issue #640), the
   forward's outputs and times are kept and the backward's reason recorded (fla_check.npz
   "bwd_error", a row's "fwd_bwd_error": "refused: ..."); the gradient comparisons stay empty.
2. JAX, for each of --backward (pallas_gpu.BlockSizes.backward: "split", the default, and
   "fused"): (a) our Pallas path against our reference (the token recurrence, float32) on
   the GPU, forward, final state and all six gradients, f32 and bf16, with segments and initial
   state; (b) on the check inputs, per tensor, ours vs the reference, fla vs the reference and
   ours vs fla (relative Frobenius errors); (c) a block-size sweep of fwd+bwd at --tune-sizes
   (each candidate's outputs compared with the checked default's before it is timed);
   (d) fwd and fwd+bwd of ours beside fla at --sizes, each row with the custom kernels of its
   compiled program (6 on the fused path: 3 forward, 3 backward; 7 split; one forward kernel
   more, delta_rule_wu, with BlockSizes(wy_form="split")). A backward whose
   check (a) fails is not timed.
3. --kernel-sizes: the per-kernel breakdown. pallas_gpu.forward and .backward are called as the
   api calls them, eagerly, with their `pl` replaced by a recorder (_Recorder): every
   pallas_call is compiled as a program of its own and run on its real inputs (the forward's
   saved intermediates feed the backward's kernels), then each is timed alone; the table gives
   kernel, grid, ms, share of the op's fwd+bwd, MiB in+out and GB/s, with the custom-kernel
   count of the op's program beside the recorded kernels'. --tune-kernels then sweeps
   kernel_candidates() (overrides of the default BlockSizes): each candidate's outputs are
   compared with the default's (TUNE_TOL) and only the kernels it changes are timed; the
   union of the winners is tried too, and the best one's fwd+bwd is timed end to end (a row
   "... kernel-tuned").
Shapes: B=8, H=16, Dk=Dv=128, bf16; unit-norm q and k, log gates logsigmoid(N(0, 1)) (a mean
decay of about 0.5 per token), b = sigmoid(N(0, 1)). `--form ungated` sets every log gate to 0
(a = 1: the plain delta rule, the same recurrence without decay) and takes fla's
chunk_delta_rule as the peer, whose backward runs where the gated one refuses (its
chunk_bwd_dqkwg gets no gate): our kernels are the same code either way, so this is their
like-for-like fwd+bwd ratio on this image; dg has no fla counterpart there. fwd+bwd returns
the forward output with the gradients of q, k, v, the gates and b (timing.forward_and_grads),
as fla's backward timing includes its forward.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(SCRIPTS))
sys.path.insert(0, SCRIPTS)

from bench_vs_fla import (checked, fla_results, fla_row, ours_row, refusal,  # noqa: E402
                          rel_err)

BACKWARDS = ("fused", "split")  # pallas_gpu.BlockSizes.backward

B, H, D = 8, 16, 128
CHECK = dict(b=2, t=1000, h=4, d=128)  # fla-vs-ours numeric check (--smoke: tiny)
CHECK_NAMES = ("o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0")
# --smoke (CPU): tiny shapes, the Pallas kernels in interpret mode, no fla.
SMOKE = {"on": False}
FORMS = ("gated", "ungated")  # --form: log gates as below, or all 0 (fla's chunk_delta_rule)
FORM = {"gated": True}
BASE = {}  # --block-sizes: overrides of pallas_gpu.BlockSizes() behind every "default" below


def interpret() -> dict:
  return {"interpret": True} if SMOKE["on"] else {}


def make_inputs(seed: int, b: int, t: int, h: int, d: int):
  """float32 numpy: q, k (unit rows), v, log gates, b in (0, 1), initial state, do, dht."""
  import numpy as np
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  q, k, v = unit(normal(b, t, h, d)), unit(normal(b, t, h, d)), normal(b, t, h, d)
  g = -np.log1p(np.exp(-normal(b, t, h)))                    # logsigmoid
  if not FORM["gated"]:
    g = np.zeros_like(g)                                      # a = 1: no decay
  beta = 1 / (1 + np.exp(-normal(b, t, h)))
  return q, k, v, g, beta, 0.1 * normal(b, h, d, d), normal(b, t, h, d), normal(b, h, d, d)


def check_inputs():
  c = CHECK
  return make_inputs(0, c["b"], c["t"], c["h"], c["d"])


# ----------------------------------------------------------------------------------------- fla
def fla_part(out: str, sizes: list[int]) -> None:
  import numpy as np
  import torch
  import triton

  gated = FORM["gated"]
  if gated:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_op
  else:  # the same chunked kernels with no gate (their backward has no Triton-version guard)
    from fla.ops.delta_rule import chunk_delta_rule as fla_op
  fla_name = "fla " + fla_op.__name__
  results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
             "triton": triton.__version__, "form": "gated" if gated else "ungated", "rows": []}
  cuda = lambda x, dt: torch.from_numpy(x).cuda().to(dt)  # noqa: E731
  bf16, f32 = torch.bfloat16, torch.float32

  def tensors_in(q, k, v, g, beta):  # fla's arguments: (q, k, v, [g,] b), each requiring grad
    args = [cuda(q, bf16), cuda(k, bf16), cuda(v, bf16)] + ([cuda(g, f32)] if gated else [])
    args.append(cuda(beta, bf16))
    for x in args:
      x.requires_grad_()
    return args

  q, k, v, g, beta, h0, do, dht = check_inputs()
  args = tensors_in(q, k, v, g, beta)
  h0 = cuda(h0, f32).requires_grad_()
  run = lambda: fla_op(  # noqa: E731
      *args, scale=CHECK["d"] ** -0.5, initial_state=h0, output_final_state=True)
  names = [n for n in CHECK_NAMES if gated or n != "dg"]
  saved = {}
  try:
    o, ht = run()
    torch.autograd.backward([o, ht], [cuda(do, bf16), cuda(dht, f32)])
    tensors = [o, ht] + [a.grad for a in args + [h0]]
  except Exception as e:  # noqa: BLE001 - keep the forward where the backward refuses
    saved["bwd_error"] = np.array(refusal(e))
    print("fla backward", saved["bwd_error"], flush=True)
    with torch.no_grad():
      tensors = list(run())
  saved.update({name: x.detach().float().cpu().numpy() for name, x in zip(names, tensors)})
  results["check_bwd_error"] = str(saved.get("bwd_error", ""))
  # One file (the device returns at most 8 files from $OUT).
  np.savez(os.path.join(out, "fla_check.npz"), **saved)
  print("fla check saved", sorted(saved), flush=True)

  for t in sizes:
    q, k, v, g, beta, _, do, _ = make_inputs(1, B, t, H, D)
    args = tensors_in(q, k, v, g, beta)
    do = cuda(do, bf16)
    op = lambda: fla_op(*args, scale=D ** -0.5)[0]  # noqa: E731
    results["rows"].append(fla_row(fla_name, t, op, do, args, warmup=10, rep=100))
    print(results["rows"][-1], flush=True)
    del args, do
    torch.cuda.empty_cache()
  with open(os.path.join(out, "fla.json"), "w") as f:
    json.dump(results, f, indent=1)


# ----------------------------------------------------------------------------------------- jax
def fwd_and_grads(impl, q, k, v, g, beta, h0, do, dht, *, segment_ids=None, block_sizes=None):
  """(o, final state, dq, dk, dv, dg, dbeta, dh0) of one path, jitted, cotangents on o and the
  final state."""
  import jax
  import jax.numpy as jnp
  from effattn.kernels.delta_rule import delta_rule, reference

  def f(q, k, v, g, beta, h0):
    if impl == "reference":
      return reference.recurrent(q, k, v, g, beta, initial_state=h0, segment_ids=segment_ids)
    return delta_rule(q, k, v, g, beta, initial_state=h0, segment_ids=segment_ids, impl=impl,
                      block_sizes=block_sizes, **interpret())

  @jax.jit
  def run(args, cts):
    out, vjp = jax.vjp(f, *args)
    return tuple(out) + tuple(vjp(cts))
  # The reference and float32 inputs at exact products (no TF32, whatever jax's setting); ours
  # on bf16 inputs at the user's setting, as it is timed.
  exact = impl == "reference" or q.dtype == jnp.float32
  with jax.default_matmul_precision("float32") if exact else contextlib.nullcontext():
    return run((q, k, v, g, beta, h0), (do, dht))


def block_sizes_for(backward: str, base=None):
  import dataclasses
  from effattn.kernels.delta_rule import pallas_gpu
  return dataclasses.replace(base or pallas_gpu.BlockSizes(**BASE), backward=backward)


def parse_block_sizes(text: str) -> dict:
  """--block-sizes "keep_w=True,num_stages_parallel=2,unrolled=bwd_dqk+bwd_prep" -> BlockSizes
  overrides (ints, True / False / None, "+"-joined names for a tuple field, else strings),
  checked by BlockSizes itself."""
  import dataclasses
  from effattn.kernels.delta_rule import pallas_gpu
  fields = {f.name: f.default for f in dataclasses.fields(pallas_gpu.BlockSizes)}
  words = {"True": True, "False": False, "None": None}
  over = {}
  for item in (i for i in text.split(",") if i):
    name, _, value = item.partition("=")
    if name not in fields or not value:
      raise ValueError(f"--block-sizes {item!r}: write field=value with a field of "
                       f"pallas_gpu.BlockSizes ({', '.join(sorted(fields))})")
    if isinstance(fields[name], tuple):
      over[name] = tuple(v for v in value.split("+") if v)
    else:
      over[name] = words[value] if value in words else int(value) if value.isdigit() else value
  pallas_gpu.BlockSizes(**over)  # one clear line from its own checks
  return over


def correctness(backward: str = "fused") -> list[dict]:
  """Our Pallas path (with this backward) against the reference (float32 recurrence) on this
  device."""
  import jax.numpy as jnp
  import numpy as np
  rows = []
  cases = [("float32", True), ("bfloat16", False)]  # dtype, segments
  b, t, h, d = (1, 40, 1, 16) if SMOKE["on"] else (2, 300, 2, 128)
  tol = {"float32": 2e-4, "bfloat16": 3e-2}

  def errors(dtype, segments):
    q, k, v, g, beta, h0, do, dht = make_inputs(2, b, t, h, d)
    seg = None
    if segments:
      ids = np.ones((b, t), np.int32)
      ids[:, t // 3:] = 2
      ids[:, t - 5:] = 0
      seg = jnp.asarray(ids)
    low = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    q, k, v, do = (low(x) for x in (q, k, v, do))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    ours = fwd_and_grads("pallas_gpu", q, k, v, f32(g), f32(beta), f32(h0), do, f32(dht),
                         segment_ids=seg, block_sizes=block_sizes_for(backward))
    ref = fwd_and_grads("reference", f32(q), f32(k), f32(v), f32(g), f32(beta), f32(h0),
                        f32(do), f32(dht), segment_ids=seg)
    return {n: rel_err(a, r) for n, a, r in zip(CHECK_NAMES, ours, ref)}

  for dtype, segments in cases[:1] if SMOKE["on"] else cases:
    name = f"backward={backward} {dtype} B={b} T={t} H={h} D={d} segments={segments} state=True"
    rows.append(checked(name, lambda: errors(dtype, segments), tol[dtype]))
  return rows


def compare_with_fla(out: str, backward: str = "fused") -> dict:
  """Ours (Pallas, bf16, this backward) and fla against the float32 reference on the same check
  inputs. Tensors fla did not produce (its backward refused) compare ours with the reference
  only, with fla's reason ("fla": "refused: ...")."""
  import jax.numpy as jnp
  import numpy as np
  path = os.path.join(out, "fla_check.npz")
  if not os.path.exists(path):
    return {"error": "fla outputs missing (fla part failed or --no-fla)"}
  fla = dict(np.load(path))
  missing = str(fla.pop("bwd_error", "")) or "fla did not save it"
  q, k, v, g, beta, h0, do, dht = check_inputs()
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  q, k, v, do, beta = (bf(x) for x in (q, k, v, do, beta))   # the values fla saw
  ours = fwd_and_grads("pallas_gpu", q, k, v, f32(g), f32(beta), f32(h0), do, f32(dht),
                       block_sizes=block_sizes_for(backward))
  ref = fwd_and_grads("reference", f32(q), f32(k), f32(v), f32(g), f32(beta), f32(h0), f32(do),
                      f32(dht))
  res = {}
  for name, a, r in zip(CHECK_NAMES, ours, ref):
    if name not in fla:
      res[name] = {"ours_vs_ref": rel_err(a, r), "fla_vs_ref": None, "ours_vs_fla": None,
                   "fla": missing}
      continue
    theirs = fla[name]
    res[name] = {"ours_vs_ref": rel_err(a, r), "fla_vs_ref": rel_err(theirs, r),
                 "ours_vs_fla": rel_err(a, theirs)}
  # Ours is as exact as fla when no tensor sits further from the float32 reference than twice
  # fla's distance (or 1e-2, bf16's scale); tensors fla lacks are held to 1e-2 alone.
  res["ok"] = all(e["ours_vs_ref"] <= max(2 * (e["fla_vs_ref"] or 0.0), 1e-2)
                  for e in res.values() if isinstance(e, dict))
  return res


def bench_inputs(t: int):
  import jax.numpy as jnp
  q, k, v, g, beta, _, do, _ = make_inputs(1, B, t, H, D)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  beta = jnp.asarray(bf(beta), jnp.float32)  # fla's b is bf16: the same values
  return [bf(q), bf(k), bf(v), jnp.asarray(g), beta], bf(do)


def ours(block_sizes=None):
  """(forward, fwd+bwd) of our Pallas path: f(q, k, v, g, b) -> o, fb(..., do) -> (o, grads)."""
  from effattn.evaluate.timing import forward_and_grads
  from effattn.kernels.delta_rule import delta_rule

  def f(q, k, v, g, beta):
    return delta_rule(q, k, v, g, beta, impl="pallas_gpu", block_sizes=block_sizes,
                      **interpret())[0]
  return f, forward_and_grads(f, argnums=(0, 1, 2, 3, 4))


def candidates(backward: str = "fused"):
  from effattn.kernels.delta_rule import pallas_gpu
  default = pallas_gpu.BlockSizes(**BASE)
  if SMOKE["on"]:
    cands = [default]
  else:
    # block_v 32: twice the walk's programs (512 at B 8, H 16), each step thinner; 3 stages:
    # deeper pipelining of the walk's chunk loads (its loop is latency-bound).
    cands = [default, pallas_gpu.BlockSizes(block_v=64, num_warps=8),
             pallas_gpu.BlockSizes(block_v=128, num_warps=8, num_warps_wy=4),
             pallas_gpu.BlockSizes(block_v=32), pallas_gpu.BlockSizes(num_stages=3)]
    if backward == "split":
      cands += [pallas_gpu.BlockSizes(num_warps_bwd=8), pallas_gpu.BlockSizes(block_k=128)]
  return [block_sizes_for(backward, c) for c in cands]


TUNE_TOL = 1e-2  # a tuning candidate's outputs against the checked default's (bf16 scale)
MIN_GAIN = 0.01  # the per-kernel sweep's winner must beat the default's kernel sum by 1%


def device_rel_err(a, b) -> float:
  """||a - b|| / ||b|| computed on the device in float32 (the sweeps compare GiB-sized tensors;
  rel_err's host float64 copy would take seconds each)."""
  import jax.numpy as jnp
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm((a - b).ravel()) / jnp.maximum(jnp.linalg.norm(b.ravel()), 1e-30))


def worst_err(outs, refs) -> float:
  import jax
  return max(device_rel_err(a, b) for a, b in zip(jax.tree.leaves(outs), jax.tree.leaves(refs)))


def tune_block_sizes(sizes: list[int], backward: str = "fused") -> tuple[object, dict]:
  """The fastest BlockSizes (with this backward) for fwd+bwd over `sizes`, the least time over
  all of them winning (the default when `sizes` is empty). The default (candidates()[0]) passed
  correctness() on this device; every other candidate is compiled once, its outputs (o and the
  five gradients) compared with the default's on the same inputs (TUNE_TOL) and timed only if
  they agree; one that fails to compile or differs is timed nan. Returns (best, {"T=<t> <cfg>":
  ms, ..., "best": str(best)})."""
  from effattn.evaluate import timing
  cands = candidates(backward)
  best, best_ms, tuning = cands[0], float("inf"), {}
  for t in sizes:
    args, do = bench_inputs(t)
    ref = None
    for i, cfg in enumerate(cands):
      try:
        compiled, _, _ = timing.compile_counted(ours(cfg)[1], *args, do)
        out = compiled(*args, do)
        if i == 0:
          ref = out
        elif ref is None:
          raise ValueError("the default did not run: nothing checked to compare with")
        elif (err := worst_err(out, ref)) >= TUNE_TOL:
          raise ValueError(f"outputs differ from the checked default's by {err:.2e}")
        del out
        ms = timing.median_ms(compiled, *args, do, reps=3, budget_s=0.25)
      except Exception as e:  # noqa: BLE001 - a tile that does not compile or check is skipped
        ms = float("nan")
        print("tune", cfg, "failed:", refusal(e), flush=True)
      tuning[f"T={t} {cfg}"] = ms
      print("tune", t, cfg, f"{ms:.3f} ms", flush=True)
      if ms < best_ms:
        best, best_ms = cfg, ms
    del args, do, ref
  tuning["best"] = str(best)
  return best, tuning


def bench_ours(sizes, block_sizes, on_row=lambda rows: None, name="ours pallas_gpu",
               rows=None) -> list[dict]:
  rows = [] if rows is None else rows
  for t in sizes:
    args, do = bench_inputs(t)
    rows.append(ours_row(name, t, *ours(block_sizes), args, do))
    print(rows[-1], flush=True)
    on_row(rows)
    del args, do
  return rows


# ---------------------------------------------------------------------- per-kernel breakdown
# delta_rule_wu: wy_form="split" only.
FWD_KERNELS = ("delta_rule_wy", "delta_rule_wu", "delta_rule_fwd", "delta_rule_out")
OP_OUTPUTS = ("o", "ht", "dq", "dk", "dv", "dbeta", "dgcum", "dh0")


def _signature(kernel, kw: dict, args) -> str:
  """What makes two pallas_calls the same compiled kernel: the kernel body and its static
  arguments, grid, block shapes, compiler parameters, argument shapes and output shapes and
  dtypes (BlockSizes.dk_partial changes only an output's dtype)."""
  import jax
  body = getattr(kernel, "func", kernel)
  specs = lambda x: repr([getattr(b, "block_shape", b) for b in  # noqa: E731
                          (x if isinstance(x, (list, tuple)) else [x])])
  return repr((kw.get("name"), getattr(body, "__name__", repr(body)),
               sorted((k, repr(v)) for k, v in getattr(kernel, "keywords", {}).items()),
               tuple(kw.get("grid", ())), specs(kw.get("in_specs", [])),
               specs(kw.get("out_specs", [])), repr(kw.get("compiler_params")),
               bool(kw.get("interpret")), [(tuple(a.shape), str(a.dtype)) for a in args],
               [(tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(kw.get("out_shape"))]))


class _Recorder:
  """Stands in for pallas_gpu's `pl` while the real forward and backward run eagerly: each
  pallas_call is compiled alone (a program of one kernel; `cache` keeps one executable per
  signature) and run on its concrete inputs, which are kept, so it can be timed alone after."""

  def __init__(self, pl, cache: dict):
    self._pl, self._cache, self.calls = pl, cache, []

  def __getattr__(self, name):
    return getattr(self._pl, name)

  def pallas_call(self, kernel, **kw):
    import jax
    from effattn.evaluate import timing
    call = self._pl.pallas_call(kernel, **kw)

    def run(*args):
      sig = _signature(kernel, kw, args)
      if sig not in self._cache:
        self._cache[sig] = timing.compile_counted(call, *args)
      compiled, names, _ = self._cache[sig]
      out = compiled(*args)
      nbytes = lambda tree: sum(int(x.nbytes) for x in jax.tree.leaves(tree))  # noqa: E731
      self.calls.append(dict(name=kw.get("name", "?"), grid=tuple(kw.get("grid", ())), sig=sig,
                             compiled=compiled, custom_kernels=len(names), args=args,
                             bytes=nbytes(args) + nbytes(out)))
      return out
    return run


def record_op(block_sizes, t: int, cache: dict):
  """(the pallas_calls of one fwd+bwd of our op in order, each with its inputs; the op's outputs
  by OP_OUTPUTS) at the bench shape: pallas_gpu.forward and .backward called as the api calls
  them (api.py: padded inputs from common.prepare, dtype = q's, scale Dk^-1/2, cotangent on o,
  zeros on the final state as the fwd+bwd timing has), each kernel compiled alone."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from effattn.kernels.delta_rule import api, common, pallas_gpu
  chunk = api.DEFAULT_CHUNK
  if t % chunk:
    raise ValueError(f"--kernel-sizes {t} must be a multiple of the chunk {chunk}")
  (q, k, v, g, beta), do = bench_inputs(t)
  x = jax.jit(common.prepare, static_argnames="chunk")(q, k, v, g, beta, None, chunk=chunk)
  kw = dict(chunk=chunk, scale=D ** -0.5, dtype=np.dtype(q.dtype), block_sizes=block_sizes,
            interpret=SMOKE["on"])
  recorder = _Recorder(pallas_gpu.pl, cache)
  pallas_gpu.pl = recorder
  try:
    o, final, residuals = pallas_gpu.forward(x, jnp.zeros((B, H, D, D), jnp.float32), **kw,
                                             out_dtype=np.dtype(q.dtype))
    grads = pallas_gpu.backward(x, residuals, do, jnp.zeros_like(final), **kw)
  finally:
    pallas_gpu.pl = recorder._pl
  return recorder.calls, dict(zip(OP_OUTPUTS, (o, final) + tuple(grads)))


def time_calls(calls: list[dict], only=None) -> None:
  """Adds "ms" (median of the kernel's program alone) to each call (those named in `only`, when
  given) and drops its inputs."""
  from effattn.evaluate import timing
  for c in calls:
    if only is None or c["name"] in only:
      c["ms"] = timing.median_ms(c["compiled"], *c["args"], reps=5, budget_s=0.25)
    c.pop("args"), c.pop("compiled")


def breakdown_rows(calls: list[dict], fwd_bwd_ms: float | None) -> list[dict]:
  return [{"kernel": c["name"], "grid": "x".join(map(str, c["grid"])), "ms": c["ms"],
           "share": c["ms"] / fwd_bwd_ms if fwd_bwd_ms else None,
           "mib": c["bytes"] / 2 ** 20, "gbps": c["bytes"] / c["ms"] / 1e6,
           "custom_kernels": c["custom_kernels"]} for c in calls]


def kernel_breakdown(t: int, backward: str, op: dict | None, block_sizes, cache: dict):
  """Each of our forward and backward kernels timed alone at the bench shape (B, H, D) and T,
  with `block_sizes` (the checked default), beside the op's own fwd / fwd+bwd at the same T:
  `op` (a row of bench_ours with these block sizes) or, when None, timed here. Returns
  ({"T", "backward", "rows": per kernel, totals}, the op's outputs, {kernel: (signature, ms)}
  for the sweep)."""
  calls, outs = record_op(block_sizes, t, cache)
  time_calls(calls)
  if op is None or "fwd_bwd_ms" not in op:
    args, do = bench_inputs(t)
    op = ours_row(f"ours pallas_gpu {backward} (breakdown)", t, *ours(block_sizes), args, do)
    print(op, flush=True)
    del args, do
  fb_ms = op.get("fwd_bwd_ms")
  table = breakdown_rows(calls, fb_ms)
  fwd = sum(r["ms"] for r in table if r["kernel"] in FWD_KERNELS)
  total = sum(r["ms"] for r in table)
  res = {"T": t, "backward": backward, "block_sizes": str(block_sizes), "rows": table,
         "kernels": len(table), "fwd_kernels_ms": fwd, "bwd_kernels_ms": total - fwd,
         "kernels_ms": total, "op_fwd_ms": op.get("fwd_ms"), "op_fwd_bwd_ms": fb_ms,
         "op_fwd_bwd_custom_kernels": op.get("fwd_bwd_kernels"),
         "custom_kernels_alone": sum(r["custom_kernels"] for r in table),
         "rest_ms": fb_ms - total if fb_ms else None, "op_error": op.get("error")}
  print(breakdown_markdown(res), flush=True)
  return res, outs, {c["name"]: (c["sig"], c["ms"]) for c in calls}


def breakdown_markdown(res: dict) -> str:
  pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
  ms = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
  lines = [f"Per-kernel breakdown, backward={res['backward']}, B={B} T={res['T']} H={H} "
           f"Dk=Dv={D}, {res['block_sizes']}: each kernel's program alone (median ms; MiB = "
           "its inputs + outputs counted once, GB/s = that over the time).", "",
           "| kernel | grid | ms | share of fwd+bwd | MiB in+out | GB/s |",
           "|---|---|---|---|---|---|"]
  for r in res["rows"]:
    lines.append(f"| {r['kernel']} | {r['grid']} | {r['ms']:.3f} | {pct(r['share'])} | "
                 f"{r['mib']:.4g} | {r['gbps']:.4g} |")
  counted, alone = res["op_fwd_bwd_custom_kernels"], res["custom_kernels_alone"]
  lines += ["", f"{res['kernels']} pallas_calls recorded, their programs holding {alone} custom "
            f"kernels in all; forward kernels {ms(res['fwd_kernels_ms'])} ms (op fwd "
            f"{ms(res['op_fwd_ms'])}), backward kernels {ms(res['bwd_kernels_ms'])}, all "
            f"{ms(res['kernels_ms'])} of the op's fwd+bwd {ms(res['op_fwd_bwd_ms'])} ms "
            f"[{counted} custom kernels compiled]; the rest (XLA ops between kernels, launch "
            f"gaps) {ms(res['rest_ms'])} ms."]
  if counted is not None and counted != alone:
    lines.append(f"NOTE: the op's fwd+bwd program holds {counted} custom kernels, the recorded "
                 f"ones {alone}: the op did not run exactly these kernels.")
  return "\n".join(lines)


# BlockSizes options ahead of the older sweep entries, so that --deadline cuts those first. The
# H200 sweep of 2026-12-04 (second session, T 32k, gated) timed the walks' scaled values
# (docs/delta_rule_vs_fla.md section 6 item 5) at 1.024x the earlier walks, bwd_dqk unrolled at
# 1.016x, delta_rule_wy's dense form at 0.78x (11.68 ms against 4.63: an option, out of the
# sweep); the first two are the defaults since (their union 25.28 ms against 25.96, checked
# first). The sweep keeps undoing each, so every run re-measures the choice on its device.
# (keep_w, dk_partial="compute" and num_stages_parallel=2 with num_warps_bwd=4 became the
# defaults in the first H200 sweep of 2026-12-04.) wy_form="split" (2026-12-04, not yet timed:
# delta_rule_wy writes only T, delta_rule_wu forms W and U with two [C, C] x [C, D] dots; the
# blocked form's 20 16-row dots gone, T written and read once more) leads, alone and at 4 warps.
WY_OPTIONS = [dict(wy_form="split"), dict(wy_form="split", num_warps_wy=4)]
WALK_OPTIONS = [dict(walk_form="scaled_keys")]
UNROLLED_OPTIONS = [dict(unrolled=())]
NEW_OPTIONS = WY_OPTIONS + WALK_OPTIONS + UNROLLED_OPTIONS


def kernel_candidates() -> list[dict]:
  """Overrides of the default BlockSizes for the per-kernel sweep (--tune-kernels), most telling
  first. What reads each knob (pallas_gpu.py): block_v: both walks' programs and the Dv step of
  out, bwd_prep, bwd_dqk, bwd_wy; num_warps: both walks, out, bwd_prep, bwd_dqk; num_stages:
  the walks; num_stages_parallel: out, bwd_prep, bwd_dqk, bwd_wy; num_warps_bwd: bwd_wy (and
  the fused delta_rule_bwd); block_k: bwd_dqk; num_warps_wy: delta_rule_wy; num_warps_wu:
  delta_rule_wu (wy_form="split" only). The newer and earlier forms (NEW_OPTIONS; BlockSizes'
  docstring): wy_form="split": delta_rule_wy and the added delta_rule_wu (the smoke run's
  only); walk_form: the two walks (fwd, dstate); unrolled: the parallel kernels it names."""
  if SMOKE["on"]:
    return [dict(num_warps_bwd=2), dict(block_k=32)] + WY_OPTIONS[:1] + WALK_OPTIONS
  return NEW_OPTIONS + [
      dict(num_stages_parallel=3), dict(block_k=128), dict(num_warps_bwd=8), dict(num_stages=3),
      dict(block_v=32), dict(num_warps=8), dict(block_k=128, num_warps=8), dict(num_warps=2),
      dict(block_v=32, num_warps=2), dict(num_warps_bwd=2), dict(block_k=32),
      dict(num_stages=1), dict(num_warps_wy=4), dict(block_v=128, num_warps=8)]


def sweep_candidate(over: dict, t: int, backward: str, base: dict, base_outs: dict,
                    cache: dict) -> dict:
  """One candidate of the per-kernel sweep: the op's kernels recorded with these block sizes,
  its outputs compared with the checked default's (TUNE_TOL), and only if they agree, the
  kernels it changes timed alone; the others keep the default's times in "est_kernels_ms"."""
  import dataclasses
  cfg = dataclasses.replace(block_sizes_for(backward), **over)
  row = {"candidate": over, "block_sizes": str(cfg)}
  try:
    calls, outs = record_op(cfg, t, cache)
    errs = {n: device_rel_err(outs[n], base_outs[n]) for n in OP_OUTPUTS}
    del outs
    row.update(max_err=max(errs.values()), ok=max(errs.values()) < TUNE_TOL)
    if not row["ok"]:
      row["errs"] = errs
      return row
    # A kernel the default does not run (wy_form="split"'s delta_rule_wu) counts as changed.
    changed = [c["name"] for c in calls if c["name"] not in base or c["sig"] != base[c["name"]][0]]
    time_calls(calls, only=set(changed))
    row["kernel_ms"] = {c["name"]: c["ms"] for c in calls if "ms" in c}
    row["est_kernels_ms"] = (sum(row["kernel_ms"].get(n, ms) for n, (_, ms) in base.items())
                             + sum(ms for n, ms in row["kernel_ms"].items() if n not in base))
  except Exception as e:  # noqa: BLE001 - a tile that does not compile is reported, not fatal
    row.update(ok=False, error=refusal(e))
  return row


def tune_kernels(t: int, backward: str, base: dict, base_outs: dict, cache: dict, deadline: float,
                 on_row=lambda rows: None) -> dict:
  """The per-kernel sweep: kernel_candidates() one at a time (none starts after `deadline`,
  time.time()), then the union of the improving candidates' overrides (disjoint ones, best
  first) as one more candidate. Returns {"base_ms", "rows", "best": overrides or {}}."""
  base_total = sum(ms for _, ms in base.values())
  bar = base_total * (1 - MIN_GAIN)  # below it a candidate counts as faster
  res = {"T": t, "backward": backward, "base_ms": {n: ms for n, (_, ms) in base.items()},
         "base_kernels_ms": base_total, "rows": []}

  def run(over):
    if time.time() > deadline:
      res["rows"].append({"candidate": over, "ok": False, "skipped": "deadline"})
    else:
      res["rows"].append(sweep_candidate(over, t, backward, base, base_outs, cache))
    print("tune kernels", res["rows"][-1], flush=True)
    on_row(res)
    return res["rows"][-1]

  for over in kernel_candidates():
    run(over)
  better = sorted((r for r in res["rows"] if r.get("est_kernels_ms", bar) < bar),
                  key=lambda r: r["est_kernels_ms"])
  union = {}
  for r in better:
    if not set(r["candidate"]) & set(union):
      union.update(r["candidate"])
  if better and union != better[0]["candidate"]:  # two or more knobs improved: try them together
    joint = run(union)
    if "est_kernels_ms" in joint:
      better = sorted(better + [joint], key=lambda r: r["est_kernels_ms"])
  res["best"] = better[0]["candidate"] if better else {}
  return res


def tune_kernels_markdown(res: dict) -> str:
  base = res["base_ms"]
  lines = [f"Per-kernel sweep, backward={res['backward']}, T={res['T']}: each candidate's "
           "outputs checked against the default's first (max rel. err.), then the kernels it "
           "changes timed alone (ms, default's in brackets); est. = the sum over all kernels "
           f"with the others at the default's ({res['base_kernels_ms']:.3f} ms).", "",
           "| overrides | check | changed kernels ms (default) | est. kernels ms | vs default |",
           "|---|---|---|---|---|"]
  for r in res["rows"]:
    over = ", ".join(f"{k}={v}" for k, v in r["candidate"].items())
    if "est_kernels_ms" not in r:
      why = r.get("skipped") or r.get("error") or f"differs: {r.get('max_err', 0):.2e}"
      lines.append(f"| {over} | {why[:90]} | | | |")
      continue
    was = lambda n: f"{base[n]:.3f}" if n in base else "new"  # noqa: E731 - delta_rule_wu
    changed = "; ".join(f"{n.removeprefix('delta_rule_')} {ms:.3f} ({was(n)})"
                        for n, ms in r["kernel_ms"].items()) or "none"
    lines.append(f"| {over} | {r['max_err']:.1e} | {changed} | {r['est_kernels_ms']:.3f} | "
                 f"{res['base_kernels_ms'] / r['est_kernels_ms']:.3f}x |")
  lines += ["", f"Best: {res['best'] or 'the default'}."]
  return "\n".join(lines)


def markdown(rows, fla_rows, info) -> str:
  by = {}
  for r in rows + fla_rows:
    by.setdefault(r["T"], []).append(r)
  lines = [f"Device: {info.get('device', '?')}; B={B}, H={H}, Dk=Dv={D}, bf16, "
           f"{info.get('form', 'gated')} form; block sizes {info.get('block_sizes', '?')}. "
           "Medians in ms; fwd+bwd includes the forward output "
           "and the gradients of q, k, v, gates and b; kernels = custom kernels compiled "
           "(fwd / fwd+bwd; fla: not counted).", "",
           "| T | impl | fwd ms | fwd+bwd ms | fwd+bwd Mtok/s | vs fla (fwd / fwd+bwd) | kernels |",
           "|---|---|---|---|---|---|---|"]
  for t in sorted(by):
    peer = next((r for r in by[t] if r["impl"].startswith("fla") and "error" not in r), None)
    for r in by[t]:
      if "error" in r:
        lines.append(f"| {t} | {r['impl']} | error | {r['error'][:80]} | | | |")
        continue
      ms = lambda key: (f"{r[key]:.3f}" if key in r  # noqa: E731
                        else r.get(key.replace("_ms", "_error"), "-")[:80])
      ratio = lambda key: (f"{peer[key] / r[key]:.2f}x" if key in peer and key in r  # noqa: E731
                           else "-")
      speed = ""
      if r["impl"].startswith("ours") and peer:
        speed = f"{ratio('fwd_ms')} / {ratio('fwd_bwd_ms')}"
      kernels = f"{r['fwd_kernels']} / {r['fwd_bwd_kernels']}" if "fwd_kernels" in r else "-"
      mtok = f"{B * t / r['fwd_bwd_ms'] / 1e3:.1f}" if "fwd_bwd_ms" in r else "-"
      lines.append(f"| {t} | {r['impl']} | {ms('fwd_ms')} | {ms('fwd_bwd_ms')} | "
                   f"{mtok} | {speed} | {kernels} |")
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/bench_delta_rule")
  parser.add_argument("--sizes", default="8192,32768")
  parser.add_argument("--tune-sizes", default="8192", help="'' skips the block-size sweep")
  parser.add_argument("--part", default="all", choices=["all", "fla"])
  parser.add_argument("--skip-check", action="store_true")
  parser.add_argument("--fla-results", default="",
                      help="reuse fla.json and fla_check.npz from this folder (no fla run)")
  parser.add_argument("--no-fla", action="store_true")
  parser.add_argument("--backward", default=",".join(BACKWARDS),
                      help="comma-separated pallas_gpu backwards to check and time "
                           f"(of {BACKWARDS}; split is BlockSizes' default)")
  parser.add_argument("--form", default="gated", choices=FORMS,
                      help="ungated: every log gate 0, against fla's chunk_delta_rule")
  parser.add_argument("--smoke", action="store_true",
                      help="CPU self-test: tiny shapes, Pallas interpret mode, no fla")
  parser.add_argument("--kernel-sizes", default="",
                      help="T values (multiples of 64) of a per-kernel breakdown after the "
                           "rows: each of our kernels timed alone ('' skips it)")
  parser.add_argument("--tune-kernels", action="store_true",
                      help="per-kernel sweep of the block sizes at the first --kernel-sizes T "
                           "(kernel_candidates(); each checked against the default first), "
                           "then the winner's fwd+bwd end to end")
  parser.add_argument("--block-sizes", default="",
                      help="overrides of pallas_gpu.BlockSizes() used as the default of every "
                           "part (check, rows, breakdown, sweep base), e.g. "
                           "'keep_w=True,num_stages_parallel=2'")
  parser.add_argument("--deadline", type=float, default=0.0,
                      help="seconds from the start after which no sweep candidate starts (0: "
                           "none); the winner's end-to-end row still runs after it")
  args = parser.parse_args(argv)
  if args.tune_kernels and not args.kernel_sizes:
    parser.error("--tune-kernels needs --kernel-sizes")
  FORM["gated"] = args.form == "gated"
  try:
    BASE.clear()
    BASE.update(parse_block_sizes(args.block_sizes))
  except ValueError as e:
    parser.error(str(e))
  args.backward = [b for b in args.backward.split(",") if b]
  bad = [b for b in args.backward if b not in BACKWARDS]
  if bad or not args.backward:
    parser.error(f"--backward {bad or args.backward} must name some of {BACKWARDS}")
  if args.smoke:
    global B, H, D
    B, H, D = 1, 2, 16
    SMOKE["on"] = True
    CHECK.update(b=1, t=40, h=2, d=16)
    args.no_fla = not args.fla_results  # fla is not importable here; its files may be reused
    if args.sizes == parser.get_default("sizes"):
      args.sizes = "64"
    if args.tune_sizes == parser.get_default("tune_sizes"):
      args.tune_sizes = ""
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  sizes = [int(s) for s in args.sizes.split(",") if s]
  tune_sizes = [int(s) for s in args.tune_sizes.split(",") if s]
  if args.part == "fla":
    fla_part(args.out, sizes)
    return {}
  t0 = time.time()
  fla = fla_results(__file__, args.out, args.sizes, reuse=args.fla_results, skip=args.no_fla,
                    extra_args=("--form", args.form))
  print(f"fla part done at {time.time() - t0:.0f}s", flush=True)
  import jax
  from effattn.kernels.delta_rule import FAMILY
  info = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "form": args.form,
          "auto_path_on_this_device": FAMILY.choose(
              "auto", Dk=D, Dv=D, chunk_size=64, dtype=jax.numpy.dtype("bfloat16")).path}
  results = {"info": info, "rows": [], "fla": fla}

  def save(rows):
    results["rows"] = rows
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump(results, f, indent=1, default=str)

  info["correctness"], info["vs_fla"], passed = [], {}, []
  for backward in args.backward:
    rows = [] if args.skip_check else correctness(backward)
    info["correctness"] += rows
    if all(r["ok"] for r in rows):
      passed.append(backward)
    else:
      print(f"backward={backward} failed its check: not timed", flush=True)
    if not args.no_fla:
      try:
        info["vs_fla"][backward] = compare_with_fla(args.out, backward)
      except Exception as e:  # noqa: BLE001 - one failing comparison must not stop the run
        info["vs_fla"][backward] = {"error": refusal(e)}
      print(f"vs fla backward={backward}", info["vs_fla"][backward], flush=True)
  info["timed_backwards"] = passed
  print(f"checks done at {time.time() - t0:.0f}s", flush=True)
  save([])
  rows, info["tuning"], info["block_sizes"] = [], {}, {}
  info["kernels"], info["tune_kernels"] = {}, {}

  def write_table() -> str:
    parts = [markdown(rows, fla["rows"], info)]
    parts += [breakdown_markdown(r) for r in info["kernels"].values() if "rows" in r]
    parts += [tune_kernels_markdown(r) for r in info["tune_kernels"].values() if "best" in r]
    table = "\n\n".join(parts)
    with open(os.path.join(args.out, "table.md"), "w") as f:
      f.write(table + "\n")
    return table

  for backward in passed:
    block_sizes, info["tuning"][backward] = (tune_block_sizes(tune_sizes, backward)
                                             if tune_sizes else (candidates(backward)[0], {}))
    info["block_sizes"][backward] = str(block_sizes)
    bench_ours(sizes, block_sizes, on_row=save, name=f"ours pallas_gpu {backward}", rows=rows)
  save(rows)
  write_table()
  kernel_parts(args, passed, rows, info, save, write_table, t0)
  save(rows)
  table = write_table()
  print(f"total {time.time() - t0:.0f}s")
  print("correctness:", [(c["case"], c.get("max_rel_err"), c["ok"]) for c in info["correctness"]])
  print(table)
  return results


def kernel_parts(args, passed, rows, info, save, write_table, t0) -> None:
  """--kernel-sizes / --tune-kernels, for each checked backward: the per-kernel breakdown with
  the default block sizes (checked), the sweep at the first size, and the winner's end-to-end
  row (checked against the default in the sweep) appended to `rows`."""
  import dataclasses
  kernel_sizes = [int(s) for s in args.kernel_sizes.split(",") if s]
  deadline = t0 + args.deadline if args.deadline else float("inf")
  cache = {}  # one compiled executable per kernel signature, shared by every part
  for backward in passed:
    default = block_sizes_for(backward)
    name = f"ours pallas_gpu {backward}"
    for t in kernel_sizes:
      op = None
      if info["block_sizes"].get(backward) == str(default):  # the rows' block sizes are these
        op = next((r for r in rows if r.get("impl") == name and r.get("T") == t), None)
      key = f"{backward} T={t}"
      try:
        info["kernels"][key], outs, base = kernel_breakdown(t, backward, op, default, cache)
      except Exception as e:  # noqa: BLE001 - one failing part must not stop the others
        info["kernels"][key] = {"error": refusal(e)}
        print("breakdown", key, info["kernels"][key], flush=True)
        continue
      save(rows)
      write_table()
      print(f"breakdown {key} done at {time.time() - t0:.0f}s", flush=True)
      if not (args.tune_kernels and t == kernel_sizes[0]):
        del outs
        continue

      def on_sweep(res, backward=backward):
        info["tune_kernels"][backward] = res
        save(rows)
      sweep = tune_kernels(t, backward, base, outs, cache, deadline, on_row=on_sweep)
      del outs
      info["tune_kernels"][backward] = sweep
      print(tune_kernels_markdown(sweep), flush=True)
      print(f"kernel sweep {backward} done at {time.time() - t0:.0f}s", flush=True)
      if sweep["best"]:
        cfg = dataclasses.replace(default, **sweep["best"])
        bench_args, do = bench_inputs(t)
        row = ours_row(f"{name} kernel-tuned", t, *ours(cfg), bench_args, do)
        row["block_sizes"] = str(cfg)
        del bench_args, do
        rows.append(row)
        print(row, flush=True)
      save(rows)
      write_table()


if __name__ == "__main__":
  main()
