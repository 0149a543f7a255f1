"""Linear-scan kernels on one GPU: correctness, then speed against fla and cuDNN softmax.

    python scripts/bench_linear.py --out /tmp/bench_linear          # everything
    python scripts/bench_linear.py --out DIR --fla-results OLD_DIR  # reuse fla's numbers
    python scripts/bench_linear.py --out DIR --part check           # correctness only
    python scripts/bench_linear.py --out DIR --no-fla --skip-check  # ours and cuDNN only
    python scripts/bench_linear.py --out DIR --smoke                # CPU self-test (interpret)
    python scripts/bench_linear.py --out DIR --no-fla --skip-check --batch 2 --heads 8 \
        --sizes 4096,16384 --tune-sizes "" --splits 1,0 --no-xla  # one pass vs T in parts

Parts, in order (results as JSON and a markdown table under --out):
1. fla (PyTorch/Triton, flash-linear-attention 0.6.0) in a subprocess, before JAX takes the GPU:
   chunk_linear_attn(normalize=False) and chunk_lightning_attn, fwd and fwd+bwd medians, and
   lightning outputs/grads on fixed inputs for the numeric comparison. fla autotunes on first
   use, which takes minutes; --fla-results reuses fla.json and fla_*.npy from an earlier run.
2. JAX: measured ceilings (bf16 matmul TFLOP/s, copy GB/s); our Pallas kernel vs reference.py
   on the GPU (fwd + grads, bf16/f32, D 64/128, decay, state, segments, bidirectional); our
   lightning op vs fla's on the same inputs; a small block-size sweep; then the table: ours
   (Pallas, xla) without and with decay, fla's two ops, cuDNN softmax
   (jax.nn.dot_product_attention). The JAX part takes about 2 minutes on an H100.
Shapes: B=8, H=16, D=128, bf16, causal, T in --sizes. Results: docs/benchmarks.md.

fwd+bwd returns the forward output with the gradients (timing.forward_and_grads), as fla's
timing includes its forward: timing our gradients alone let XLA drop our forward kernel (its
backward reads only q, k, v). Every row carries the custom kernels of its compiled program
(1 forward + 3 backward scans on the Pallas path).
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

from bench_vs_fla import (checked, fla_results, fla_row, ours_row, rel_err,  # noqa: E402
                          timed, tune)

B, H, D = 8, 16, 128
CHECK = dict(b=2, t=1000, h=8, d=128, layer=1, layers=4)  # fla-vs-ours numeric check
# --smoke (CPU): tiny shapes, the Pallas kernel in interpret mode, XLA instead of cuDNN.
SMOKE = {"on": False}


def interpret() -> dict:
  return {"interpret": True} if SMOKE["on"] else {}


def fla_decays(h: int, layer: int, layers: int):
  """fla's chunk_lightning_attn schedule: g_h = -(8 / H) (1 - l / L) h, h = 0..H-1."""
  return [-(8.0 / h) * (1.0 - layer / layers) * i for i in range(h)]


def check_inputs(seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  c = CHECK
  shape = (c["b"], c["t"], c["h"], c["d"])
  q, k, v, do = (rng.standard_normal(shape).astype(np.float32) * 0.5 for _ in range(4))
  dht = rng.standard_normal((c["b"], c["h"], c["d"], c["d"])).astype(np.float32)
  return q, k, v, do, dht


# ----------------------------------------------------------------------------------------- fla
def fla_part(out: str, sizes: list[int]) -> None:
  import numpy as np
  import torch
  import triton
  from fla.ops.lightning_attn import chunk_lightning_attn
  from fla.ops.linear_attn import chunk_linear_attn

  results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
             "triton": triton.__version__, "rows": []}
  # Numeric check inputs -> fla outputs and grads, saved for the JAX side.
  c = CHECK
  q, k, v, do, dht = (torch.from_numpy(x).cuda().to(torch.bfloat16) for x in check_inputs())
  dht = dht.float()
  q, k, v = (x.requires_grad_() for x in (q, k, v))
  o, ht = chunk_lightning_attn(q, k, v, layer_idx=c["layer"], num_layers=c["layers"],
                               scale=c["d"] ** -0.5, output_final_state=True)
  torch.autograd.backward([o, ht], [do, dht])
  for name, x in (("o", o), ("ht", ht), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
    np.save(os.path.join(out, f"fla_{name}.npy"), x.detach().float().cpu().numpy())

  for t in sizes:
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, t, H, D, device="cuda", dtype=torch.bfloat16) * 0.3
                   for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    ops = {
        "fla chunk_linear_attn": lambda: chunk_linear_attn(q, k, v, normalize=False)[0],
        "fla chunk_lightning_attn": lambda: chunk_lightning_attn(q, k, v, layer_idx=0,
                                                                 num_layers=2)[0],
    }
    for name, op in ops.items():
      results["rows"].append(fla_row(name, t, op, do, [q, k, v], warmup=25, rep=200))
      print(results["rows"][-1], flush=True)
    del q, k, v, do
    torch.cuda.empty_cache()
  with open(os.path.join(out, "fla.json"), "w") as f:
    json.dump(results, f, indent=1)


# ----------------------------------------------------------------------------------------- jax
def ceilings() -> dict:
  import jax.numpy as jnp
  n = 256 if SMOKE["on"] else 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  ms = timed(lambda a: a @ a, a)["ms"]
  x = jnp.ones((2**20 if SMOKE["on"] else 512 * 1024 * 1024,), jnp.bfloat16)  # 1 GiB
  ms_cp = timed(lambda x: x * 2, x)["ms"]
  return {"bf16_matmul_tflops": 2 * n ** 3 / ms / 1e9, "copy_gbps": 2 * x.nbytes / ms_cp / 1e6}


def correctness() -> list[dict]:
  """Pallas GPU kernel vs reference.py on the GPU: forward, final state and every gradient."""
  import jax
  import jax.numpy as jnp
  from effattn.kernels.linear_scan import api
  rows = []
  cases = [  # (dtype, D, causal, decay, state, segments)
      ("float32", 64, True, True, True, True),
      ("float32", 128, False, True, False, False),
      ("bfloat16", 128, True, True, True, True),
      ("bfloat16", 64, False, False, False, True),
  ]
  tol = {"float32": 2e-4, "bfloat16": 2e-2}
  b, t, h = (1, 70, 2) if SMOKE["on"] else (2, 300, 2)
  for dtype, d, causal, decay, state, segments in cases:
    keys = jax.random.split(jax.random.key(d + causal), 6)
    q, k, v, do = (jax.random.normal(kk, (b, t, h, d), dtype) * 0.5 for kk in keys[:4])
    s0 = jax.random.normal(keys[4], (b, h, d, d)) if state else None
    ds = jax.random.normal(keys[5], (b, h, d, d))
    g = jnp.array([-0.05, -1.0]) if decay else None
    seg = jnp.concatenate([jnp.ones((b, t // 3), jnp.int32),
                           2 * jnp.ones((b, t - t // 3), jnp.int32)], 1) if segments else None

    def run(impl, q, k, v, s0):
      return api.linear_scan(q, k, v, g, causal=causal, initial_state=s0, segment_ids=seg,
                             scale=d ** -0.5, impl=impl, **interpret())

    def errors():  # called at once by checked, in this iteration
      outs = {}
      for impl in ("reference", "pallas_gpu"):
        def fwd_and_grads(q, k, v, s0, do, ds, impl=impl):
          out, vjp = jax.vjp(lambda q, k, v, s0: run(impl, q, k, v, s0), q, k, v, s0)
          return out + tuple(vjp((do, ds)))
        # The reference and the float32 cases at exact products (no TF32, whatever jax's
        # setting); ours in bf16 at the user's setting, as it is timed.
        exact = impl == "reference" or dtype == "float32"
        with jax.default_matmul_precision("float32") if exact else contextlib.nullcontext():
          outs[impl] = jax.jit(fwd_and_grads)(q, k, v, s0, do, ds)
      return {n: rel_err(a, r) for n, a, r in zip(("o", "final", "dq", "dk", "dv", "ds0"),
                                                   outs["pallas_gpu"], outs["reference"])
              if r is not None}
    name = (f"{dtype} D={d} {'causal' if causal else 'bidir'} decay={decay} state={state} "
            f"seg={segments}")
    rows.append(checked(name, errors, tol[dtype]))
  return rows


def mechanism_checks() -> list[dict]:
  """linear / mala / lightning modules on the GPU: output and gradients (input and every
  parameter) for a random cotangent. f32: the Pallas path vs the reference. bf16: the Pallas path
  vs the xla path (the same bf16 arithmetic; MALA's beta * num - z * mean(v) cancels, so bf16
  paths sit ~3% from an f32 reference, which is recorded as `vs_reference`)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from effattn.attention import registry
  rows = []
  b, t, d_model, heads = 2, 200, 256, 2  # head_dim 128
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg = jnp.concatenate([jnp.ones((b, 90), jnp.int32), 2 * jnp.ones((b, t - 90), jnp.int32)], 1)
  for name in ("linear", "mala", "lightning"):
    for dtype, baseline, tol in ((jnp.float32, "reference", 2e-3), (jnp.bfloat16, "xla", 1e-2)):
      case = f"{name} {jnp.dtype(dtype).name} pallas_gpu vs {baseline}"
      try:
        outs = {}
        x = jax.random.normal(jax.random.key(1), (b, t, d_model), dtype)
        dy = jax.random.normal(jax.random.key(2), (b, t, d_model), dtype)
        for impl in ("reference", "xla", "pallas_gpu"):
          cfg = {"name": name, "num_kv_heads": None, "head_dim": None, "window": None,
                 "impl": impl}
          m = registry.build(cfg, d_model=d_model, num_heads=heads, rngs=nnx.Rngs(0),
                             layer_idx=1, num_layers=2, dtype=dtype)
          graph, params, rest = nnx.split(m, nnx.Param, ...)

          def f(params, x, graph=graph, rest=rest):
            return nnx.merge(graph, params, rest)(x, positions=pos, segment_ids=seg)[0]

          @jax.jit
          def fwd_bwd(params, x, dy, f=f):
            y, vjp = jax.vjp(f, params, x)
            return y, vjp(dy)
          # As in correctness(): the reference and float32 exact, bf16 paths at the user's.
          exact = impl == "reference" or dtype == jnp.float32
          with jax.default_matmul_precision("float32") if exact else contextlib.nullcontext():
            outs[impl] = jax.tree.leaves(fwd_bwd(params, x, dy))
        worst = max(rel_err(a, r) for a, r in zip(outs["pallas_gpu"], outs[baseline]))
        vs_ref = max(rel_err(a, r) for a, r in zip(outs["pallas_gpu"], outs["reference"]))
        rows.append({"case": case, "max_rel_err": worst, "tol": tol, "ok": worst < tol,
                     "vs_reference": vs_ref})
      except Exception as e:
        rows.append({"case": case, "ok": False, "error": repr(e)[:500]})
      print(rows[-1], flush=True)
  return rows


def compare_with_fla(out: str) -> dict:
  import jax.numpy as jnp
  import numpy as np
  from effattn.kernels.linear_scan import api
  import jax
  c = CHECK
  if not os.path.exists(os.path.join(out, "fla_o.npy")):
    return {"error": "fla outputs missing (fla part failed)"}
  q, k, v, do, dht = check_inputs()
  q, k, v, do = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, do))
  g = jnp.asarray(fla_decays(c["h"], c["layer"], c["layers"]), jnp.float32)
  (o, ht), vjp = jax.vjp(lambda q, k, v: api.linear_scan(q, k, v, g, scale=c["d"] ** -0.5,
                                                         impl="pallas_gpu"), q, k, v)
  dq, dk, dv = vjp((do, jnp.asarray(dht)))
  res = {}
  for name, ours in (("o", o), ("ht", ht), ("dq", dq), ("dk", dk), ("dv", dv)):
    res[name] = rel_err(ours, np.load(os.path.join(out, f"fla_{name}.npy")))
  res["ok"] = max(res.values()) < 2e-2
  return res


def bench_ours(sizes, sizes_tuned, on_row=lambda rows: None, *, splits=(None,),
               with_xla: bool = True) -> tuple[list[dict], dict]:
  """Rows of ours (Pallas at the tuned block sizes, once per value of `splits`: None keeps the
  tuned value, 1 the one-pass kernel, 0 parts chosen from the grid; xla) and cuDNN."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  from effattn.evaluate.timing import forward_and_grads
  from effattn.kernels.linear_scan import api, pallas_gpu
  rows = []
  g_lightning = jnp.asarray(fla_decays(H, 0, 2), jnp.float32)

  def make(impl, decay, sizes=None):
    def op(q, k, v):
      return api.linear_scan(q, k, v, g_lightning if decay else None, scale=D ** -0.5, impl=impl,
                             block_sizes=sizes, **(interpret() if impl != "xla" else {}))[0]
    return op, forward_and_grads(op, argnums=(0, 1, 2))  # fb(q, k, v, do) -> (o, grads)

  def inputs(t):
    keys = jax.random.split(jax.random.key(t), 4)
    return [jax.random.normal(kk, (B, t, H, D), jnp.bfloat16) * 0.3 for kk in keys]

  # Block-size sweep on fwd+bwd at the tuning lengths.
  candidates = (pallas_gpu.BlockSizes(64, 64, 4, 2), pallas_gpu.BlockSizes(64, 64, 8, 2),
                pallas_gpu.BlockSizes(64, 128, 8, 2), pallas_gpu.BlockSizes(128, 64, 8, 2))
  best, tuning = tune(candidates[:1] if SMOKE["on"] else candidates, sizes_tuned, inputs,
                      lambda cfg: make("pallas_gpu", False, cfg)[1])

  for t in sizes:
    q, k, v, do = inputs(t)
    variants = []
    for split in splits:
      cfg = best if split is None else dataclasses.replace(best, splits=split)
      tag = "" if split is None else f" splits={split}"
      variants += [(f"ours pallas{tag} (no decay)", "pallas_gpu", False, cfg),
                   (f"ours pallas{tag} (lightning decay)", "pallas_gpu", True, cfg)]
    if with_xla:
      variants += [("ours xla (no decay)", "xla", False, None),
                   ("ours xla (lightning decay)", "xla", True, None)]
    for name, impl, decay, cfg in variants:
      rows.append(ours_row(name, t, *make(impl, decay, cfg), (q, k, v), do))
      print(rows[-1], flush=True)
      on_row(rows)
    sm = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, implementation="xla" if SMOKE["on"] else "cudnn")
    rows.append(ours_row("cuDNN softmax", t, sm, forward_and_grads(sm, argnums=(0, 1, 2)),
                         (q, k, v), do))
    print(rows[-1], flush=True)
    del q, k, v, do
  return rows, tuning


def model_costs(t: int, chunk: int = 64) -> dict:
  """Useful FLOPs and minimal HBM bytes of one causal scan (all B*H), forward only.

  Per chunk: q k^T (2 C^2 Dk) + P v (2 C^2 Dv) + q S (2 C Dk Dv) + k^T v (2 C Dk Dv); bytes:
  read q, k, v and write o once (bf16). The backward is three such scans.
  """
  flops = B * H * t * (2 * chunk * D + 2 * chunk * D + 4 * D * D)
  return {"fwd_flops": flops, "fwd_bytes": B * H * t * 4 * D * 2}


def markdown(rows, fla_rows, info) -> str:
  by = {}
  for r in rows + fla_rows:
    by.setdefault(r["T"], []).append(r)
  lines = [f"Device: {info.get('device', '?')}; B={B}, H={H}, D={D}, bf16, causal. "
           f"Medians in ms; tokens/s for fwd+bwd = B*T / time; fwd+bwd includes the forward "
           f"output; kernels = custom kernels compiled (fwd / fwd+bwd; fla: not counted).", "",
           "| T | impl | fwd ms | fwd+bwd ms | fwd+bwd Mtok/s | fwd+bwd vs fla | kernels |",
           "|---|---|---|---|---|---|---|"]
  for t in sorted(by):
    ref = {r["impl"]: r.get("fwd_bwd_ms") for r in by[t]}
    for r in by[t]:
      if "error" in r:
        lines.append(f"| {t} | {r['impl']} | error | {r['error'][:80]} | | | |")
        continue
      peer = ("fla chunk_lightning_attn" if "decay)" in r["impl"] and "no decay" not in r["impl"]
              else "fla chunk_linear_attn")
      speed = ""
      if r["impl"].startswith("ours") and ref.get(peer):
        speed = f"{ref[peer] / r['fwd_bwd_ms']:.2f}x vs {peer.split()[-1]}"
      mtok = B * t / r["fwd_bwd_ms"] / 1e3
      kernels = (f"{r['fwd_kernels']} / {r['fwd_bwd_kernels']}" if "fwd_kernels" in r
                 else "-")
      lines.append(f"| {t} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                   f"{mtok:.1f} | {speed} | {kernels} |")
  return "\n".join(lines)


def main() -> None:
  global B, H, D
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/bench_linear")
  parser.add_argument("--sizes", default="2048,8192,32768")
  parser.add_argument("--tune-sizes", default="8192")
  parser.add_argument("--part", default="all", choices=["all", "fla", "check"],
                      help="check: only the GPU correctness checks (kernel and mechanisms)")
  parser.add_argument("--skip-check", action="store_true")
  parser.add_argument("--fla-results", default="",
                      help="reuse fla.json and fla_*.npy from this folder instead of running fla")
  parser.add_argument("--no-fla", action="store_true",
                      help="skip fla (its figures: docs/benchmarks.md, /work/shared/gpu-notes.md)")
  parser.add_argument("--smoke", action="store_true",
                      help="CPU self-test: tiny shapes, Pallas interpret mode, no fla")
  parser.add_argument("--batch", type=int, default=B, help="B of the timed shapes")
  parser.add_argument("--heads", type=int, default=H, help="H of the timed shapes")
  parser.add_argument("--splits", default="",
                      help="comma list of BlockSizes.splits to time the Pallas kernel with "
                           "(1: one pass over T per program, 0: T in parts chosen from the "
                           "grid); default: the tuned block sizes as they are")
  parser.add_argument("--no-xla", action="store_true", help="skip the xla rows")
  args = parser.parse_args()
  B, H = args.batch, args.heads
  if args.smoke:
    B, H, D = 1, 2, 16
    SMOKE["on"] = True
    args.no_fla = True
    if args.sizes == parser.get_default("sizes"):
      args.sizes = "128,256"
    if args.tune_sizes == parser.get_default("tune_sizes"):
      args.tune_sizes = "128"
  os.makedirs(args.out, exist_ok=True)
  sizes = [int(s) for s in args.sizes.split(",") if s]
  tune_sizes = [int(s) for s in args.tune_sizes.split(",") if s]
  if args.part == "fla":
    fla_part(args.out, sizes)
    return
  t0 = time.time()
  if args.part == "check":
    # The module checks build the mechanisms on the Pallas path, which needs a GPU.
    checks = {"kernel": correctness(), "mechanisms": [] if args.smoke else mechanism_checks()}
    with open(os.path.join(args.out, "checks.json"), "w") as f:
      json.dump(checks, f, indent=1)
    for row in checks["kernel"] + checks["mechanisms"]:
      print(f"{row['case']:60s} {row.get('max_rel_err', float('nan')):.2e} "
            f"{'ok' if row['ok'] else 'FAIL ' + row.get('error', '')[:200]}")
    print(f"total {time.time() - t0:.0f}s")
    return
  fla = fla_results(__file__, args.out, args.sizes, reuse=args.fla_results, skip=args.no_fla)
  print(f"fla part done at {time.time() - t0:.0f}s", flush=True)
  import jax
  info = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
  info["ceilings"] = ceilings()
  print("ceilings", info["ceilings"], flush=True)
  from effattn.kernels.linear_scan import api
  info["auto_path_on_this_gpu"] = api.FAMILY.choose(
      "auto", Dk=D, Dv=D, dtype=jax.numpy.dtype("bfloat16")).path
  save = lambda rows: json.dump({"info": info, "rows": rows, "fla": fla},
                                open(os.path.join(args.out, "results.json"), "w"), indent=1,
                                default=str)
  info["correctness"] = [] if args.skip_check else correctness()
  info["lightning_vs_fla"] = {} if args.no_fla else compare_with_fla(args.out)
  print("lightning vs fla", info["lightning_vs_fla"], flush=True)
  print(f"checks done at {time.time() - t0:.0f}s", flush=True)
  save([])
  splits = [int(x) for x in args.splits.split(",") if x] or [None]
  rows, info["tuning"] = bench_ours(sizes, tune_sizes, on_row=save, splits=splits,
                                    with_xla=not args.no_xla)
  info["model_costs"] = {t: model_costs(t) for t in sizes}
  table = markdown(rows, fla["rows"], info)
  save(rows)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  print(f"total {time.time() - t0:.0f}s")
  print("correctness:", [(c["case"], c.get("max_rel_err"), c["ok"]) for c in info["correctness"]])
  print(table)


if __name__ == "__main__":
  main()
