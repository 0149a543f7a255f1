r"""Softmax attention over packed sequences on the GPU: cuDNN's packed layout against the oracle.

    python scripts/check_packed_attention.py --out /tmp/packed

`ops.softmax_attention(..., segment_ids=...)` sends packed rows to cuDNN as segment offsets and
lengths (at most `max_segments` runs per row, else the block-sparse kernel). This script
(1) checks the output and the q, k, v gradients of both branches against the f32 reference
with the dense segment mask, on ragged and padded rows, GQA, causal and bidirectional; and
(2) times forward+backward at B=8, T=4096, H=16, D=128 in bf16 (four documents per row) for the
packed cuDNN call (max_segments 16 and 64), the block-sparse fallback, the XLA dense-mask path
the trainer ran before, and unpacked cuDNN as the ceiling; and with a 512-token sliding window
the packed cuDNN call, its query-chunked XLA fallback and the dense mask. Medians of --iters
calls after a warm-up; forward+backward returns the output with the q, k, v gradients
(timing.forward_and_grads) and each row gives the custom kernels compiled (fwd / fwd+bwd: cuDNN
calls, or the block-sparse kernels of the fallback). A table is printed last and JSON goes to
--out. --smoke runs the script on CPU at tiny shapes with XLA in place of cuDNN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from effattn.kernels.softmax import api as ops  # noqa: E402
from effattn.evaluate.timing import forward_and_grads, measure  # noqa: E402

SMOKE = {"on": False}


def gpu_impl() -> str:
  return "xla" if SMOKE["on"] else "cudnn"


def packed_ids(batch: int, length: int, docs: int, pad: int, seed: int) -> np.ndarray:
  """[B, T] ids: `docs` documents of random lengths, then `pad` tokens of padding (id 0)."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length - pad), docs - 1, replace=False))
    for doc, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, length - pad])):
      ids[row, lo:hi] = doc + 1
  return ids


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check(args) -> list[dict]:
  rows = []
  cases = [  # (B, T, H, H_kv, causal, docs, pad, window)
      (2, 1000, 8, 2, True, 5, 37, None),
      (2, 512, 4, 4, False, 3, 0, None),
      (3, 768, 8, 1, True, 9, 100, None),
      (2, 1000, 8, 2, True, 5, 37, 128),
  ]
  d = 128
  if SMOKE["on"]:
    cases, d = [(1, 100, 2, 1, True, 3, 7, None), (1, 100, 2, 1, True, 3, 7, 16)], 16
  for b, t, h, h_kv, causal, docs, pad, window in cases:
    keys = jax.random.split(jax.random.key(t), 4)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, h_kv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, h_kv, d), jnp.bfloat16)
    ct = jax.random.normal(keys[3], (b, t, h, d), jnp.float32)
    seg = jnp.asarray(packed_ids(b, t, docs, pad, seed=t))

    def loss(q, k, v, impl, max_segments):
      o = ops.softmax_attention(q, k, v, causal=causal, segment_ids=seg, impl=impl,
                                window=window, max_segments=max_segments)
      return jnp.sum(o.astype(jnp.float32) * ct), o

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                   static_argnums=(3, 4))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("float32"):  # the oracle: exact products, not TF32
      (_, o_ref), g_ref = grad(f32(q), f32(k), f32(v), "reference", 16)
    # docs + (pad > 0) runs: max_segments 16 takes cuDNN, 2 the fallback.
    fallback = "fallback kernel" if window is None else "fallback chunked xla"
    for branch, m in (("cudnn packed", 16), (fallback, 2)):
      (_, o), g = grad(q, k, v, gpu_impl(), m)
      errs = [rel_err(o, o_ref)] + [rel_err(a, r) for a, r in zip(g, g_ref)]
      finite = bool(np.all(np.isfinite(np.asarray(o, np.float32))))
      rows.append({"case": f"B{b} T{t} H{h}/{h_kv} causal={causal} runs={docs + (pad > 0)}"
                           + (f" window={window}" if window else ""),
                   "branch": branch, "o": errs[0], "dq": errs[1], "dk": errs[2],
                   "dv": errs[3], "finite": finite})
      print(rows[-1], flush=True)
  return rows


def bench(args) -> list[dict]:
  b, t, h, d = (1, 128, 2, 16) if SMOKE["on"] else (8, 4096, 16, 128)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in keys)
  seg = jnp.asarray(packed_ids(b, t, 4, 0, seed=1))
  gpu = gpu_impl()
  variants = {
      "cudnn packed (max_segments 16)": dict(segment_ids=seg, impl=gpu, max_segments=16),
      "cudnn packed (max_segments 64)": dict(segment_ids=seg, impl=gpu, max_segments=64),
      "block-sparse fallback": dict(segment_ids=seg, impl=gpu, max_segments=2),
      "xla dense mask (before)": dict(segment_ids=seg, impl="xla"),
      "cudnn unpacked (ceiling)": dict(impl=gpu),
      "cudnn packed, window 512": dict(segment_ids=seg, impl=gpu, window=512),
      "chunked xla fallback, window 512": dict(segment_ids=seg, impl=gpu, window=512,
                                               max_segments=2),
      "xla dense mask, window 512 (before)": dict(segment_ids=seg, impl="xla", window=512),
  }
  rows = []
  for name, kw in variants.items():
    def fwd(q, k, v, kw=kw):
      return ops.softmax_attention(q, k, v, causal=True, **kw)

    row = {"variant": name}
    try:
      f = measure(fwd, q, k, v, reps=args.iters)
      fb = measure(forward_and_grads(fwd, argnums=(0, 1, 2)), q, k, v, ct, reps=args.iters)
      row.update(fwd_ms=f["ms"], fwd_bwd_ms=fb["ms"], kernels=(f["kernels"], fb["kernels"]))
    except Exception as e:  # noqa: BLE001 -- report and go on
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    rows.append(row)
    print(row, flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=None)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--skip_bench", action="store_true")
  p.add_argument("--smoke", action="store_true", help="CPU self-test: tiny shapes, XLA for cuDNN")
  args = p.parse_args(argv)
  SMOKE["on"] = args.smoke
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  checks = check(args)
  timings = [] if args.skip_bench else bench(args)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "check_packed_attention.json"), "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "checks": checks,
                 "timings": timings}, f, indent=1)
  print("\n| case | branch | o | dq | dk | dv | finite |\n|---|---|---|---|---|---|---|")
  for r in checks:
    print(f"| {r['case']} | {r['branch']} | {r['o']:.1e} | {r['dq']:.1e} | {r['dk']:.1e} | "
          f"{r['dv']:.1e} | {r['finite']} |")
  if timings:
    print("\nB=8 T=4096 H=16 D=128 bf16 causal, 4 documents per row (ms; kernels compiled, "
          "fwd / fwd+bwd)\n| variant | fwd | fwd+bwd | kernels |\n|---|---|---|---|")
    for r in timings:
      kernels = "{} / {}".format(*r["kernels"]) if "kernels" in r else ""
      print(f"| {r['variant']} | {r.get('fwd_ms', float('nan')):.2f} | "
            f"{r.get('fwd_bwd_ms', float('nan')):.2f} | {kernels} | {r.get('error', '')}")


if __name__ == "__main__":
  main()
