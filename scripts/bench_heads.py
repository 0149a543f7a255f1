"""Head-efficiency family on one GPU: kernel correctness, kernel tiles, then whole layers.

    python scripts/bench_heads.py --out /tmp/bench_heads.json
    python scripts/bench_heads.py --smoke   # CPU: tiny shapes, Pallas in interpret mode

1. check:  the head_routing Pallas GPU kernel against reference.py, forward and gradients
           (random cotangent) for q, k, v and gates, bf16 and f32, causal / bidirectional /
           segments, ragged T.
2. tiles:  the routed-head op alone at T = 32k (12 routed heads, top-4, causal, bf16) for a few
           (block_q, block_k), against cuDNN computing all 12 heads densely; also the share of
           (head, 64-token query block) pairs holding at least one routed token, i.e. the work
           a "skip empty query blocks" kernel would keep.
3. layers: the whole attention layer (projections, RoPE, router, attention, output projection)
           at d_model 2048, bf16 compute, T = 32k / 16k / 4k with B = 32k / T (32k tokens per
           step), forward and forward+backward: MHA (H 16), GQA (16, kv 4), SQA (H_q 8, kv 4),
           sSQA (H_q = kv = 8), MoH with 50 % and 75 % of heads active (4 shared + top-4 or
           top-8 of 12 routed), and MoH 50 % computed densely with XLA attention (impl="xla":
           every head, then masked, as the official code does).
Times are medians of repeated runs after a warm-up (block_until_ready); forward+backward
returns the forward output with the gradients (timing.forward_and_grads), and every row gives
the custom kernels compiled (fwd / fwd+bwd). Targets: SQA (H_q 8) >= 1.8x MHA tokens/s at 32k;
MoH 50 % >= 1.6x MHA.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, ".")
from effattn.attention import moh as moh_module  # noqa: E402
from effattn.attention import registry  # noqa: E402
from effattn.kernels.softmax import softmax_attention  # noqa: E402
from effattn.kernels.head_routing import api  # noqa: E402
from effattn.kernels.head_routing import head_routed_attention as _hra  # noqa: E402
from effattn.evaluate.timing import forward_and_grads, measure  # noqa: E402

SMOKE = {"on": False}


def head_routed_attention(*args, **kwargs):
  if SMOKE["on"]:
    kwargs["interpret"] = True
  return _hra(*args, **kwargs)


def random_gates(key, b, t, h, k_active):
  """Exactly k_active random heads per token, gates in [0.5, 1.5)."""
  k1, k2 = jax.random.split(key)
  ranks = jnp.argsort(jax.random.uniform(k1, (b, t, h)), axis=-1).argsort(axis=-1)
  return jnp.where(ranks < k_active, jax.random.uniform(k2, (b, t, h)) + 0.5, 0.0)


def check() -> list[dict]:
  rows = []
  cases = [  # (dtype, B, T, H, H_kv, D, causal, segments, density, bq, bk)
      (jnp.bfloat16, 2, 1000, 4, 2, 128, True, False, 0.3, 64, 64),
      (jnp.bfloat16, 1, 768, 3, 1, 64, False, True, 0.5, 64, 64),
      (jnp.bfloat16, 1, 640, 4, 4, 128, True, True, 0.25, 128, 64),
      # f32 tiles take twice the shared memory: 64 x 64 at D = 64.
      (jnp.float32, 1, 520, 4, 2, 64, True, True, 0.4, 64, 64),
  ]
  if SMOKE["on"]:
    cases = [(jnp.float32, 1, 40, 2, 1, 16, True, True, 0.4, 16, 16)]
  for dtype, b, t, h, h_kv, d, causal, segments, density, bq, bk in cases:
    ks = jax.random.split(jax.random.key(t + h), 6)
    q = jax.random.normal(ks[0], (b, t, h, d)).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, h_kv, d)).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, h_kv, d)).astype(dtype)
    gates = random_gates(ks[3], b, t, h, max(1, round(density * h)))
    seg = None
    if segments:
      seg = jnp.broadcast_to(jnp.where(jnp.arange(t) < t // 3, 1, 2).at[t - 7:].set(0),
                             (b, t)).astype(jnp.int32)

    def run(impl):
      f = functools.partial(head_routed_attention, causal=causal, segment_ids=seg,
                            block_q=bq, block_k=bk, impl=impl)
      return jax.vjp(jax.jit(f), q, k, v, gates)

    row = {"dtype": jnp.dtype(dtype).name, "shape": [b, t, h, h_kv, d], "causal": causal,
           "segments": segments}
    # f32: exact products (the kernel's dots and XLA's) whatever jax_default_matmul_precision
    # is: the tolerance is float32's, not TF32's. bf16 at the user's setting, as it is timed.
    with (jax.default_matmul_precision("float32") if dtype == jnp.float32
          else contextlib.nullcontext()):
      o_r, vjp_r = run("reference")
      do = jax.random.normal(ks[4], o_r.shape).astype(dtype)
      want_all = (o_r, *vjp_r(do))
      try:
        o_p, vjp_p = run("pallas_gpu")
        got_all = (o_p, *vjp_p(do))
      except Exception as e:  # report and go on to the timings
        rows.append({**row, "ok": False, "error": str(e)[:300]})
        print(f"check {row}: failed: {str(e)[:300]}", flush=True)
        continue
    worst = 0.0
    for name, want, got in zip(("o", "dq", "dk", "dv", "dgates"), want_all, got_all):
      want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
      err = float(np.abs(want - got).max() / max(np.abs(want).max(), 1e-6))
      row[f"rel_err_{name}"] = err
      worst = max(worst, err if np.all(np.isfinite(got)) else np.inf)
    row["ok"] = worst < (3e-2 if dtype == jnp.bfloat16 else 5e-3)
    rows.append(row)
    print(f"check {row['dtype']:8s} {row['shape']} causal={causal} seg={segments}: "
          f"worst rel err {worst:.2e} {'OK' if row['ok'] else 'FAIL'}", flush=True)
  return rows


def tiles(t: int, reps: int) -> list[dict]:
  """The routed-head op alone: Pallas tiles vs cuDNN over all heads, fwd and fwd+bwd."""
  b, h, d, k_active = 1, 12, 128, 4
  if SMOKE["on"]:
    d = 16
  ks = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, t, h, d), jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, h, d), jnp.bfloat16)
  gates = random_gates(ks[3], b, t, h, k_active)
  ct = jax.random.normal(ks[4], q.shape, jnp.bfloat16)
  occupied = (gates.reshape(b, t // 64, 64, h) != 0).any(axis=2).mean()
  rows = [{"what": "query-block occupancy (64-token blocks with >= 1 routed token)",
           "fraction": float(occupied), "routed_fraction": k_active / h}]
  print(f"tiles: T={t}, {k_active}/{h} heads per token; 64-blocks holding a routed token: "
        f"{float(occupied):.3f}", flush=True)

  def time_fn(f):
    fwd = measure(f, q, k, v, gates, reps=reps)
    fb = measure(forward_and_grads(f, argnums=(0, 1, 2, 3)), q, k, v, gates, ct, reps=reps)
    return fwd["ms"], fb["ms"], (fwd["kernels"], fb["kernels"])

  dense_impl = "xla" if SMOKE["on"] else "cudnn"
  f_dense = lambda q, k, v, g: softmax_attention(q, k, v, causal=True, impl=dense_impl)  # noqa
  fwd_ms, bwd_ms, kernels = time_fn(f_dense)
  rows.append({"what": "cudnn all heads", "fwd_ms": fwd_ms, "fwd_bwd_ms": bwd_ms,
               "kernels": kernels})
  print(f"tiles: cuDNN all {h} heads: fwd {fwd_ms:.2f} ms, fwd+bwd {bwd_ms:.2f} ms, kernels "
        f"{kernels}", flush=True)
  blocks = [(64, 64), (128, 64), (64, 128)]
  if SMOKE["on"]:
    blocks = [(16, 16)]
  for bq, bk in blocks:
    f = functools.partial(head_routed_attention, causal=True, block_q=bq, block_k=bk,
                          impl="pallas_gpu")
    try:
      fwd_ms, bwd_ms, kernels = time_fn(f)
    except Exception as e:  # a tile that does not compile (shared memory) is reported, not fatal
      rows.append({"what": f"pallas {bq}x{bk}", "error": str(e)[:300]})
      print(f"tiles: pallas {bq}x{bk}: failed: {str(e)[:200]}", flush=True)
      continue
    rows.append({"what": f"pallas {bq}x{bk}", "block_q": bq, "block_k": bk, "fwd_ms": fwd_ms,
                 "fwd_bwd_ms": bwd_ms, "kernels": kernels})
    print(f"tiles: pallas {bq}x{bk}: fwd {fwd_ms:.2f} ms, fwd+bwd {bwd_ms:.2f} ms, kernels "
          f"{kernels}", flush=True)
  return rows


def layer_configs(bq: int, bk: int):
  moh = lambda top_k, impl="auto": ("moh", {"impl": impl, "moh": {  # noqa: E731
      "num_shared_heads": 4, "top_k": top_k, "block_q": bq, "block_k": bk}})
  return {
      "MHA (H16)": ("softmax", {}),
      "GQA (H16 kv4)": ("softmax", {"num_kv_heads": 4}),
      "SQA (Hq8 kv4)": ("sqa", {"sqa": {"variant": "sqa"}}),
      "sSQA (Hq8 kv8)": ("sqa", {"sqa": {"variant": "ssqa"}}),
      "MoH 50% (4+4/12)": moh(4),
      "MoH 75% (4+8/12)": moh(8),
      "MoH 50% dense (XLA attn)": moh(4, "xla"),
  }


def layer(name, fields, t, b, d_model, reps):
  cfg = {"name": name, "num_kv_heads": None, "head_dim": None, "window": None, "impl": "auto"}
  cfg.update(fields)
  attn = registry.build(cfg, d_model=d_model, num_heads=16, rngs=nnx.Rngs(0),
                        dtype=jnp.bfloat16)
  graph, state = nnx.split(attn)
  ks = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(ks[0], (b, t, d_model), jnp.bfloat16)
  ct = jax.random.normal(ks[1], (b, t, d_model), jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

  def fwd(state, x):
    return nnx.merge(graph, state)(x, positions=pos)[0]

  def train(state, x):  # the layer's output and its weighted aux losses, as training sees them
    y, aux = nnx.merge(graph, state)(x, positions=pos, train=True)
    return y, sum((v for key, v in aux.items() if key.startswith("loss_")), jnp.float32(0))

  f = measure(fwd, state, x, reps=reps)
  fb = measure(forward_and_grads(train, argnums=(0, 1)), state, x, (ct, jnp.float32(1)),
               reps=reps)
  return f["ms"], fb["ms"], (f["kernels"], fb["kernels"])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="/tmp/bench_heads.json")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--skip_check", action="store_true")
  parser.add_argument("--seqs", default="32768,16384,4096")
  parser.add_argument("--tokens", type=int, default=32768, help="B * T per step")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--budget_s", type=float, default=450.0, help="stop starting new layers")
  parser.add_argument("--block", default="auto", help="bq,bk for MoH, or auto (best tile)")
  args = parser.parse_args()
  start = time.time()
  SMOKE["on"] = args.smoke
  d_model = 2048
  seqs = [int(s) for s in args.seqs.split(",")]
  if args.smoke:
    moh_module.head_routed_attention = head_routed_attention
    d_model, seqs, args.tokens, args.reps = 256, [128, 64], 128, 2
  result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "d_model": d_model, "tokens_per_step": args.tokens}
  print(f"device: {result['device']}, jax {jax.__version__}", flush=True)
  if not args.skip_check:
    result["check"] = check()
  result["tiles"] = tiles(max(seqs), args.reps)
  if args.block == "auto":
    timed = [r for r in result["tiles"] if "fwd_bwd_ms" in r and "block_q" in r]
    best = min(timed, key=lambda r: r["fwd_ms"] + r["fwd_bwd_ms"])
    bq, bk = best["block_q"], best["block_k"]
  else:
    bq, bk = (int(s) for s in args.block.split(","))
  result["moh_blocks"] = [bq, bk]
  print(f"MoH kernel tiles: {bq}x{bk}", flush=True)
  layers = []
  for t in seqs:
    b = max(1, args.tokens // t)
    for label, (name, fields) in layer_configs(bq, bk).items():
      if name == "moh" and args.smoke:
        fields = {**fields, "impl": "pallas" if fields["impl"] == "auto" else fields["impl"]}
      if time.time() - start > args.budget_s:
        print(f"budget reached, skipping {label} at T={t}", flush=True)
        continue
      try:
        fwd_ms, bwd_ms, kernels = layer(name, fields, t, b, d_model, args.reps)
      except Exception as e:  # report and go on: one failing layer must not hide the others
        layers.append({"layer": label, "T": t, "B": b, "error": str(e)[:300]})
        print(f"{label} T={t}: failed: {str(e)[:300]}", flush=True)
        continue
      layers.append({"layer": label, "T": t, "B": b, "fwd_ms": fwd_ms, "fwd_bwd_ms": bwd_ms,
                     "kernels": kernels})
      print(f"{label:18s} T={t:6d} B={b}: fwd {fwd_ms:8.2f} ms  fwd+bwd {bwd_ms:8.2f} ms  "
            f"kernels {kernels[0]} / {kernels[1]}", flush=True)
    result["layers"] = layers
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  # Throughput relative to MHA at the same T.
  print("\n| layer | T | B | fwd ms | fwd+bwd ms | fwd vs MHA | fwd+bwd vs MHA | kernels |")
  print("|---|---|---|---|---|---|---|---|")
  for row in layers:
    if "error" in row:
      print(f"| {row['layer']} | {row['T']} | {row['B']} | failed | | | | |")
      continue
    mha = next((r for r in layers if r["T"] == row["T"] and r["layer"].startswith("MHA")
                and "fwd_ms" in r), None)
    ratio = lambda key: f"{mha[key] / row[key]:.2f}x" if mha else "-"  # noqa: E731
    row["fwd_speedup"] = mha["fwd_ms"] / row["fwd_ms"] if mha else None
    row["fwd_bwd_speedup"] = mha["fwd_bwd_ms"] / row["fwd_bwd_ms"] if mha else None
    print(f"| {row['layer']} | {row['T']} | {row['B']} | {row['fwd_ms']:.2f} | "
          f"{row['fwd_bwd_ms']:.2f} | {ratio('fwd_ms')} | {ratio('fwd_bwd_ms')} | "
          f"{row['kernels'][0]} / {row['kernels'][1]} |")
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"total {time.time() - start:.0f} s; wrote {args.out}")
  if "check" in result and not all(r["ok"] for r in result["check"]):
    sys.exit(1)


if __name__ == "__main__":
  main()
