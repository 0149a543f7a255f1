"""Gated delta rule on one GPU: numerics against fla and our reference, then fwd+bwd beside fla.

    python scripts/bench_delta_rule.py --out DIR                    # everything
    python scripts/bench_delta_rule.py --out DIR --tune-sizes ''    # no block-size sweep
    python scripts/bench_delta_rule.py --out DIR --fla-results OLD  # reuse fla's part
    python scripts/bench_delta_rule.py --out DIR --no-fla --skip-check  # our timings only
    python scripts/bench_delta_rule.py --out DIR --smoke            # CPU self-test (interpret)
    python scripts/bench_delta_rule.py --out DIR --backward split   # one backward only
    python scripts/bench_delta_rule.py --out DIR --form ungated     # log gates 0, fla's
                                                                    # chunk_delta_rule as peer

Parts, in order (results.json and table.md under --out, written after every row):
1. fla (flash-linear-attention 0.6.0, carried as wheels) in a subprocess, before JAX takes the
   GPU: chunk_gated_delta_rule on the check inputs (bf16 q, k, v and b, float32 log gates and
   initial state, T = 1000: not a multiple of the chunk; random cotangents on o AND the final
   state), outputs and gradients saved in fla_check.npz; then fwd and fwd+bwd medians
   (triton.testing.do_bench) at --sizes. fla autotunes on first use. Where fla's backward
   refuses (fla 0.6.0 with Triton 3.4-3.7.0 on Hopper: chunk_bwd_dqkwg, fla issue #640), the
   forward's outputs and times are kept and the backward's reason recorded (fla_check.npz
   "bwd_error", a row's "fwd_bwd_error": "refused: ..."); the gradient comparisons stay empty.
2. JAX, for each of --backward (pallas_gpu.BlockSizes.backward: "fused", the default path,
   and "split"): (a) our Pallas path against our reference (the token recurrence, float32) on
   the GPU, forward, final state and all six gradients, f32 and bf16, with segments and initial
   state; (b) on the check inputs, per tensor, ours vs the reference, fla vs the reference and
   ours vs fla (relative Frobenius errors); (c) a block-size sweep of fwd+bwd at --tune-sizes;
   (d) fwd and fwd+bwd of ours beside fla at --sizes, each row with the custom kernels of its
   compiled program (6 on the fused path: 3 forward, 3 backward; 7 split). A backward whose
   check (a) fails is not timed.
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
import json
import os
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(SCRIPTS))
sys.path.insert(0, SCRIPTS)

from bench_vs_fla import (checked, fla_results, fla_row, ours_row, refusal, rel_err,  # noqa: E402
                          tune)

BACKWARDS = ("fused", "split")  # pallas_gpu.BlockSizes.backward

B, H, D = 8, 16, 128
CHECK = dict(b=2, t=1000, h=4, d=128)  # fla-vs-ours numeric check (--smoke: tiny)
CHECK_NAMES = ("o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0")
# --smoke (CPU): tiny shapes, the Pallas kernels in interpret mode, no fla.
SMOKE = {"on": False}
FORMS = ("gated", "ungated")  # --form: log gates as below, or all 0 (fla's chunk_delta_rule)
FORM = {"gated": True}


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
  with jax.default_matmul_precision("highest"):  # no TF32 in the float32 reference
    return run((q, k, v, g, beta, h0), (do, dht))


def block_sizes_for(backward: str, base=None):
  import dataclasses
  from effattn.kernels.delta_rule import pallas_gpu
  return dataclasses.replace(base or pallas_gpu.BlockSizes(), backward=backward)


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
  default = pallas_gpu.BlockSizes()
  if SMOKE["on"]:
    cands = [default]
  else:
    # block_v 32: twice the walk's programs (512 at B 8, H 16), each step thinner; 3 stages:
    # deeper pipelining of the walk's chunk loads (its loop is latency-bound).
    cands = [default, pallas_gpu.BlockSizes(block_v=64, num_warps=8),
             pallas_gpu.BlockSizes(block_v=128, num_warps=8, num_warps_wy=4),
             pallas_gpu.BlockSizes(block_v=32), pallas_gpu.BlockSizes(num_stages=3)]
    if backward == "split":
      cands += [pallas_gpu.BlockSizes(num_warps_bwd=4), pallas_gpu.BlockSizes(block_k=128)]
  return [block_sizes_for(backward, c) for c in cands]


def tune_block_sizes(sizes: list[int], backward: str = "fused") -> tuple[object, dict]:
  """The fastest BlockSizes (with this backward) for fwd+bwd over `sizes` (each candidate
  timed)."""
  def fwd_bwd_args(t):
    args, do = bench_inputs(t)
    return (*args, do)
  return tune(candidates(backward), sizes, fwd_bwd_args, lambda cfg: ours(cfg)[1])


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
                           f"(of {BACKWARDS}; fused is what impl='auto' runs)")
  parser.add_argument("--form", default="gated", choices=FORMS,
                      help="ungated: every log gate 0, against fla's chunk_delta_rule")
  parser.add_argument("--smoke", action="store_true",
                      help="CPU self-test: tiny shapes, Pallas interpret mode, no fla")
  args = parser.parse_args(argv)
  FORM["gated"] = args.form == "gated"
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
  for backward in passed:
    block_sizes, info["tuning"][backward] = (tune_block_sizes(tune_sizes, backward)
                                             if tune_sizes else (candidates(backward)[0], {}))
    info["block_sizes"][backward] = str(block_sizes)
    bench_ours(sizes, block_sizes, on_row=save, name=f"ours pallas_gpu {backward}", rows=rows)
  save(rows)
  table = markdown(rows, fla["rows"], info)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  print(f"total {time.time() - t0:.0f}s")
  print("correctness:", [(c["case"], c.get("max_rel_err"), c["ok"]) for c in info["correctness"]])
  print(table)
  return results


if __name__ == "__main__":
  main()
