"""Titans memory update on one GPU: kernel correctness, then tokens/s of the memory op and layer.

    python scripts/bench_memory.py --out /tmp/bench_memory            # everything (~3 min H100)
    python scripts/bench_memory.py --out /tmp/x --smoke                # tiny shapes, any backend

Parts (JSON under --out, a markdown table printed last; docs/benchmarks.md has results). Part 1
runs before any timing part whatever --parts says, and nothing it failed is timed:
1. check: memory_update on the Pallas (Triton) path (each form of the chunk loops) and the
   chunked xla path against reference.py on the device, forward, final states and every
   gradient (random cotangents), f32 and bf16, with packed segments and a ragged T.
2. op: forward and forward+backward medians of the linear-memory update (B=4, H=16, D=64,
   bf16, chunk 64) for Pallas, chunked xla and the sequential token recurrence (reference.py,
   a lax.scan over tokens), T = 2k .. 32k; a num_warps sweep and chunk 16 at T = 8k.
   forward+backward = the outputs (y, W_T, S_T) with the gradients of every input for random
   cotangents (timing.forward_and_grads); each row gives the custom kernels compiled.
3. blocks: the value columns split over programs (BlockSizes.block_v) at the shape of
   bench_train's 16k step (B=2, H=8, D=128, bf16, chunk 16, T = 16k: 16 programs of one
   block on 132 SMs), block_v None / 64 / 32 / 16, for each form of the chunk loops (LOOPS:
   BlockSizes.forward / .backward "fused", "split" or "hoisted"); part 1 checks block_v
   16 / 32 and every form first, and a form that fails there is not timed.
4. launch: Triton's num_warps x num_stages (software pipelining of the chunk loop's loads;
   the default is 4 warps at chunk 16, 2 stages) for LAUNCH_LOOPS at block_v 32, at blocks'
   16k shape; part 1 checks each pair first (in bf16, the timed dtype) when this part runs,
   and a pair that fails there is not timed.
5. layer: the whole neural_memory module (variant lmm, d_model 1024, 16 heads) forward+backward
   (output, gradients of the parameters and the input) tokens/s with the memory on Pallas vs
   xla.
fla 0.6.0's titans op is not timed: it is a TTT-style update of a layer-normed residual MLP
memory (a different loss and different state), so it computes another function.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from effattn.evaluate.timing import cotangent_like, forward_and_grads, measure  # noqa: E402
from effattn.kernels.memory_chunk import memory_update, pallas_gpu, reference  # noqa: E402

B, H, D = 4, 16, 64
# BlockSizes.forward / .backward of each form of the kernel's chunk loops that is timed.
LOOPS = {"fused": dict(forward="fused", backward="fused"),
         "split bwd": dict(forward="fused", backward="split"),
         "split": dict(forward="split", backward="split"),
         "hoisted": dict(forward="hoisted", backward="hoisted")}
SMOKE = {"on": False}  # --smoke: the Pallas kernels in interpret mode (CPU)
# (num_warps, num_stages) pairs of the launch part; (4, 2) is BlockSizes' default at chunk 16.
LAUNCHES = tuple((w, s) for w in (2, 4, 8) for s in (1, 2, 3))
LAUNCH_BLOCK_V = 32
# The loops the launch part sweeps: the hoisted ones, unmeasured (the split loops' sweep chose
# BlockSizes' 2 stages; docs/benchmarks.md).
LAUNCH_LOOPS = "hoisted"


def kernel_kwargs(impl: str) -> dict:
  return {"interpret": True} if SMOKE["on"] and impl.startswith("pallas") else {}


def inputs(key, b, t, h, d, dtype, segments=False):
  ks = jax.random.split(key, 8)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(ks[0], (b, t, h, d))).astype(dtype)
  k = unit(jax.random.normal(ks[1], (b, t, h, d))).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, d)).astype(dtype)
  g = jax.random.normal(ks[3], (3, b, t, h))
  gates = (0.3 * jax.nn.sigmoid(g[0]), jax.nn.sigmoid(g[1] - 3.0), jax.nn.sigmoid(g[2] + 1.0))
  w0 = 0.1 * jax.random.normal(ks[4], (b, h, d, d))
  seg = None
  if segments:
    ids = np.ones((b, t), np.int32)
    ids[0, t // 3:] = 2
    seg = jnp.asarray(ids)
  return (q, k, v) + gates + (w0,), seg


def check(results, launches=()):
  """Pallas and xla vs the reference on the device: max error / reference max, per tensor;
  launches: (num_warps, num_stages) pairs also checked (LAUNCH_LOOPS, block_v LAUNCH_BLOCK_V),
  in bf16 alone: the dtype they are timed in."""
  rows = []
  for dtype, chunk, t in ((jnp.float32, 16, 300), (jnp.bfloat16, 64, 517)):
    # f32: exact products (the kernels' dots and XLA's) whatever jax_default_matmul_precision
    # is: the limit is float32's, not TF32's. bf16 at the user's setting, as it is timed.
    with (jax.default_matmul_precision("float32") if dtype == jnp.float32
          else contextlib.nullcontext()):
      args, seg = inputs(jax.random.key(0), 2, t, 4, 64, dtype, segments=True)

      def run(impl, block_v=None, loops=None, launch=None):
        sizes = (pallas_gpu.BlockSizes(block_v=block_v, **launch_kwargs(launch), **LOOPS[loops])
                 if impl == "pallas_gpu" else None)
        f = lambda *a: memory_update(*a[:6], initial_memory=a[6], segment_ids=seg,  # noqa: E731
                                     chunk_size=chunk, impl=impl, block_sizes=sizes,
                                     **kernel_kwargs(impl))
        out, vjp = jax.vjp(f, *args)
        return out, vjp

      out_r, vjp_r = run("reference")
      keys = jax.random.split(jax.random.key(1), 3)
      ct = (jax.random.normal(keys[0], out_r[0].shape).astype(dtype),
            (jax.random.normal(keys[1], out_r[1][0].shape),
             jax.random.normal(keys[2], out_r[1][1].shape)))
      g_r = vjp_r(ct)
      names = ["y", "W_T", "S_T", "dq", "dk", "dv", "dtheta", "dalpha", "deta", "dW0"]
      forms = [("pallas_gpu", None, "fused", None), ("pallas_gpu", 16, "fused", None),
               ("pallas_gpu", None, "split bwd", None), ("pallas_gpu", 32, "split", None),
               ("pallas_gpu", None, "split", None), ("pallas_gpu", 32, "hoisted", None),
               ("xla", None, None, None)]
      if dtype == jnp.bfloat16:
        forms += [("pallas_gpu", LAUNCH_BLOCK_V, LAUNCH_LOOPS, tuple(pair)) for pair in launches]
      for impl, block_v, loops, launch in forms:
        out, vjp = run(impl, block_v, loops, launch)
        g = vjp(ct)
        want = jax.tree.leaves(out_r) + list(g_r)
        got = jax.tree.leaves(out) + list(g)
        errs = {n: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                         / max(1e-6, float(jnp.max(jnp.abs(a.astype(jnp.float32))))))
                for n, a, b in zip(names, want, got)}
        worst = max(errs.values())
        limit = 1e-4 if dtype == jnp.float32 else 5e-2
        rows.append(dict(impl=impl, block_v=block_v, loops=loops,
                         dtype=jnp.dtype(dtype).name, chunk=chunk, t=t, worst=worst,
                         ok=worst < limit, errors=errs, **({"launch": launch} if launch else {})))
        print(f"check {impl:10s} block_v={block_v} loops={loops} "
              f"{'' if launch is None else f'warps, stages={launch} '}"
              f"{jnp.dtype(dtype).name:8s} C={chunk} T={t}: "
              f"worst rel err "
              f"{worst:.2e} ({'ok' if worst < limit else 'FAIL'})", flush=True)
  results["check"] = rows


def launch_kwargs(launch) -> dict:
  """BlockSizes' num_warps / num_stages for a (warps, stages) pair (None: the defaults)."""
  return {} if launch is None else dict(num_warps=launch[0], num_stages=launch[1])


def op_fns(impl, chunk, warps=None, block_v=None, loops="fused", stages=None):
  sizes = (pallas_gpu.BlockSizes(num_warps=warps, block_v=block_v, **LOOPS[loops],
                                 **({} if stages is None else {"num_stages": stages}))
           if impl == "pallas_gpu" else None)

  def fwd(*a):
    if impl == "recurrent":
      return reference.recurrent(*a[:6], a[6])
    return memory_update(*a[:6], initial_memory=a[6], chunk_size=chunk, impl=impl,
                         block_sizes=sizes, **kernel_kwargs(impl))

  return fwd, forward_and_grads(fwd, argnums=tuple(range(7)))


def timed(impl, chunk, warps, args, reps, block_v=None, loops="fused", stages=None):
  """(fwd, fwd+bwd) measurements of the memory update on args (q, k, v, gates, w0)."""
  fwd, fb = op_fns(impl, chunk, warps, block_v, loops, stages)
  return (measure(fwd, *args, reps=reps),
          measure(fb, *args, cotangent_like(fwd, *args), reps=max(2, reps // 2)))


def op(results, sizes, b, h, d):
  rows = []
  for t in sizes:
    args, _ = inputs(jax.random.key(2), b, t, h, d, jnp.bfloat16)
    for impl, chunk, warps in (("pallas_gpu", 64, 4), ("xla", 64, 4), ("recurrent", 1, 4)):
      row = dict(t=t, impl=impl, chunk=chunk, warps=warps)
      try:
        f, fb = timed(impl, chunk, warps, args, 3 if impl == "recurrent" else 10)
        row.update(fwd_ms=f["ms"], fwdbwd_ms=fb["ms"], kernels=(f["kernels"], fb["kernels"]))
        row["fwd_tok_s"] = b * t / row["fwd_ms"] * 1e3
        row["fwdbwd_tok_s"] = b * t / row["fwdbwd_ms"] * 1e3
        print(f"op T={t:6d} {impl:10s} fwd {row['fwd_ms']:8.2f} ms  fwd+bwd "
              f"{row['fwdbwd_ms']:8.2f} ms", flush=True)
      except Exception as e:  # recorded, the table says what failed
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"op T={t} {impl} failed: {row['error']}", flush=True)
        traceback.print_exc()
      rows.append(row)
  results["op"] = rows


def kernel_row(label, row, args, chunk, warps=None, block_v=None, loops="fused", stages=None):
  """row with the Pallas kernel's fwd and fwd+bwd medians (or its error), printed."""
  try:
    f, fb = timed("pallas_gpu", chunk, warps, args, 10, block_v, loops, stages)
    row.update(fwd_ms=f["ms"], fwdbwd_ms=fb["ms"], kernels=(f["kernels"], fb["kernels"]))
    print(f"{label}: fwd {row['fwd_ms']:.2f} ms fwd+bwd {row['fwdbwd_ms']:.2f} ms kernels "
          f"{row['kernels']}", flush=True)
  except Exception as e:
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(f"{label} failed: {row['error']}", flush=True)
  return row


def sweep(results, t, b, h, d):
  rows = []
  args, _ = inputs(jax.random.key(3), b, t, h, d, jnp.bfloat16)
  for chunk, warps in ((64, 8), (64, 2), (16, 4), (32, 4)):
    rows.append(kernel_row(f"sweep C={chunk} warps={warps}",
                           dict(t=t, impl="pallas_gpu", chunk=chunk, warps=warps), args, chunk,
                           warps))
  for chunk in (16, 32):
    f, fb = timed("xla", chunk, 4, args, 10)
    row = dict(t=t, impl="xla", chunk=chunk, fwd_ms=f["ms"], fwdbwd_ms=fb["ms"],
               kernels=(f["kernels"], fb["kernels"]))
    print(f"sweep xla C={chunk}: fwd {row['fwd_ms']:.2f} ms fwd+bwd {row['fwdbwd_ms']:.2f} ms",
          flush=True)
    rows.append(row)
  results["sweep"] = rows


def blocks(results, t, b, h, d, chunk):
  rows = []
  args, _ = inputs(jax.random.key(5), b, t, h, d, jnp.bfloat16)
  # Loops that failed part 1 on this device are not timed.
  failed = {r["loops"] for r in results.get("check", []) if not r["ok"] and "launch" not in r}
  for loops in LOOPS:
    if loops in failed:
      print(f"blocks loops={loops}: not timed, it failed its check", flush=True)
      continue
    for block_v in (None, 64, 32, 16) if loops == "fused" else (64, 32, 16):
      if block_v and (block_v > d or d % block_v):
        continue
      programs = b * h * (d // block_v if block_v else 1)
      rows.append(kernel_row(f"blocks loops={loops} block_v={block_v} ({programs} programs)",
                             dict(t=t, b=b, h=h, d=d, chunk=chunk, block_v=block_v,
                                  loops=loops, programs=programs), args, chunk,
                             block_v=block_v, loops=loops))
  results["blocks"] = rows


def launch(results, t, b, h, d, chunk, pairs=LAUNCHES):
  """Part 4: (num_warps, num_stages) of LAUNCH_LOOPS at block_v LAUNCH_BLOCK_V; a pair
  that failed its check in part 1 (or was not checked there) is not timed."""
  passed = {tuple(r["launch"]) for r in results.get("check", []) if "launch" in r and r["ok"]}
  failed = {tuple(r["launch"]) for r in results.get("check", []) if "launch" in r and not r["ok"]}
  args, _ = inputs(jax.random.key(5), b, t, h, d, jnp.bfloat16)
  rows = []
  for warps, stages in pairs:
    if (warps, stages) in failed or (warps, stages) not in passed:
      print(f"launch warps={warps} stages={stages}: not timed, it "
            f"{'failed' if (warps, stages) in failed else 'was not in'} its check", flush=True)
      continue
    rows.append(kernel_row(f"launch warps={warps} stages={stages}",
                           dict(t=t, b=b, h=h, d=d, chunk=chunk, block_v=LAUNCH_BLOCK_V,
                                loops=LAUNCH_LOOPS, warps=warps, stages=stages), args, chunk,
                           warps=warps, block_v=LAUNCH_BLOCK_V, loops=LAUNCH_LOOPS,
                           stages=stages))
  results["launch"] = rows


def layer(results, t, b, d_model, heads):
  from flax import nnx

  from effattn.attention import registry
  rows = []
  x = jax.random.normal(jax.random.key(4), (b, t, d_model), jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  # The module's Pallas path has no interpret switch: on CPU (--smoke) only xla runs.
  for impl in ("xla",) if SMOKE["on"] else ("pallas_gpu", "xla"):
    cfg = {"name": "neural_memory", "impl": impl, "window": None, "num_kv_heads": None,
           "head_dim": None, "neural_memory": {"variant": "lmm", "chunk_size": 64}}
    module = registry.build(cfg, d_model=d_model, num_heads=heads, rngs=nnx.Rngs(0),
                            dtype=jnp.bfloat16)
    graph, params, rest = nnx.split(module, nnx.Param, ...)

    def layer_out(params, x, graph=graph, rest=rest):
      return nnx.merge(graph, params, rest)(x, positions=pos)[0]

    row = dict(impl=impl, t=t, b=b, d_model=d_model, heads=heads)
    try:
      fb = measure(forward_and_grads(layer_out, argnums=(0, 1)), params, x,
                   cotangent_like(layer_out, params, x), reps=5)
      ms = fb["ms"]
      row.update(fwdbwd_ms=ms, tok_s=b * t / ms * 1e3, kernels=fb["kernels"])
      print(f"layer lmm {impl:10s} T={t} fwd+bwd {ms:.2f} ms ({b * t / ms * 1e3:,.0f} tok/s), "
            f"kernels {fb['kernels']}", flush=True)
    except Exception as e:
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(f"layer {impl} failed: {row['error']}", flush=True)
    rows.append(row)
  results["layer"] = rows


def table(results):
  lines = ["| T | path | fwd ms | fwd tok/s | fwd+bwd ms | fwd+bwd tok/s | kernels |",
           "|---|---|---|---|---|---|---|"]
  for r in results.get("op", []):
    if "error" in r:
      lines.append(f"| {r['t']} | {r['impl']} | failed: {r['error'][:60]} | | | | |")
      continue
    lines.append(f"| {r['t']} | {r['impl']} (C={r['chunk']}) | {r['fwd_ms']:.2f} | "
                 f"{r['fwd_tok_s']:,.0f} | {r['fwdbwd_ms']:.2f} | {r['fwdbwd_tok_s']:,.0f} | "
                 f"{r['kernels'][0]} / {r['kernels'][1]} |")
  for r in results.get("blocks", []) + results.get("launch", []):
    if "error" not in r:
      launch = f", warps {r['warps']}, stages {r['stages']}" if "stages" in r else ""
      programs = f"{r['programs']} programs, " if "programs" in r else ""
      lines.append(f"| {r['t']} | pallas_gpu loops {r['loops']}, block_v={r['block_v']}{launch} "
                   f"({programs}B={r['b']} H={r['h']} D={r['d']} C={r['chunk']}) | "
                   f"{r['fwd_ms']:.2f} | | {r['fwdbwd_ms']:.2f} | | "
                   f"{r['kernels'][0]} / {r['kernels'][1]} |")
  return "\n".join(lines)


def checked(results, part: str) -> bool:
  """Whether `part` may be timed: part 1 ran on this device and passed the fused kernel and
  the xla path (blocks also skips each other form that failed; printed when not)."""
  rows = results.get("check", [])
  ok = bool(rows) and all(r["ok"] for r in rows if r["loops"] in ("fused", None))
  if not ok:
    print(f"{part}: not timed, the check did not pass on this device", flush=True)
  return ok


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="/tmp/bench_memory")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU sanity run)")
  parser.add_argument("--parts", default="check,op,sweep,blocks,launch,layer")
  parser.add_argument("--sizes", default="2048,4096,8192,16384,32768", help="T values of 'op'")
  flags = parser.parse_args()
  SMOKE["on"] = flags.smoke
  os.makedirs(flags.out, exist_ok=True)
  results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "shape": dict(B=B, H=H, D=D)}
  parts = flags.parts.split(",")
  if set(parts) - {"check"} and "check" not in parts:  # nothing is timed unchecked
    parts.insert(0, "check")
  sizes = [256, 512] if flags.smoke else [int(x) for x in flags.sizes.split(",")]
  b, h, d = (1, 2, 16) if flags.smoke else (B, H, D)
  pairs = LAUNCHES[:2] if flags.smoke else LAUNCHES
  blocks_shape = (256, 1, 2, 32) if flags.smoke else (16384, 2, 8, 128)  # T, B, H, D
  for name, fn in (("check", lambda: check(results, pairs if "launch" in parts else ())),
                   ("op", lambda: op(results, sizes, b, h, d)),
                   ("sweep", lambda: sweep(results, sizes[-1] if flags.smoke else 8192, b, h, d)),
                   ("blocks", lambda: blocks(results, *blocks_shape, 16)),
                   ("launch", lambda: launch(results, *blocks_shape, 16, pairs)),
                   ("layer", lambda: layer(results, 512 if flags.smoke else 8192,
                                           1 if flags.smoke else 4, 64 if flags.smoke else 1024,
                                           4 if flags.smoke else 16))):
    if name in parts:
      if name != "check" and not checked(results, name):
        continue
      try:
        fn()
      except Exception:
        traceback.print_exc()
        results[f"{name}_error"] = traceback.format_exc()[-2000:]
      with open(os.path.join(flags.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
  print(results["device"])
  print(table(results))


if __name__ == "__main__":
  main()
