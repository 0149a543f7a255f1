r"""Every mechanism's auto path against its xla path on this device: the glue between a mechanism
and its kernels, checked where the kernels run.

    python scripts/check_mechanisms.py --out $OUT/check          # GPU: every mechanism, T 2048
    python scripts/check_mechanisms.py --smoke                    # CPU self-test (both paths xla)

For each mechanism (configs/base.py's defaults; `name:option=value` specs as bench_train takes
them) one attention layer is built once and called with impl="auto" and impl="xla" on the same
parameters and inputs: x [B, T, d_model], positions, and segment ids, both of ones and packed
(three segments of ragged lengths per row). Compared: the layer output and the gradients of a
random projection of it with respect to x and every parameter, as max |auto - xla| / max |xla|
per leaf (the worst leaf is reported). The auto row's compiled program is searched for custom
kernels (effattn.kernels.hlo): a mechanism whose auto path ran no kernel on a GPU is reported,
not failed (some have none). The table is printed last; check.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(SCRIPTS))
sys.path.insert(0, SCRIPTS)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mechanisms", default="default",
                 help="comma list of names or name:option=value specs; 'default': every one")
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--d_model", type=int, default=1024)
  p.add_argument("--num_heads", type=int, default=8)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--tol", type=float, default=0.0, help="0: 3e-2 for 16-bit dtypes, 1e-4 f32")
  p.add_argument("--smoke", action="store_true", help="CPU self-test at tiny sizes")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.smoke:
    args.seq_len, args.batch, args.d_model, args.num_heads = 40, 2, 32, 4
    args.dtype = "float32"
  return args


def mechanism_specs(arg: str) -> list[str]:
  from effattn import attention
  specs = []
  for s in filter(None, arg.split(",")):
    specs += sorted(attention.names()) if s == "default" else [s]
  return specs


def layer_config(spec: str, impl: str):
  """model.attention of configs/base.py with `spec`'s options and `impl`."""
  from configs import base

  name, _, rest = spec.partition(":")
  attn = base.get_config().model.attention
  attn.name, attn.impl = name, impl
  for item in filter(None, rest.split(",")):
    key, value = item.split("=")
    section = attn[name]
    target = section if key in section else attn
    current = target[key]
    target[key] = type(current)(value) if current is not None else int(value)
  return attn


def packed_segments(batch: int, t: int):
  """[B, T] ids of three segments per row, ragged lengths different in each row."""
  import numpy as np
  rows = []
  for b in range(batch):
    cuts = sorted({t // 3 + 7 * b + 1, 2 * t // 3 - 5 * b})
    row = np.zeros(t, np.int32)
    for c in cuts:
      row[c:] += 1
    rows.append(row + 1)
  return np.stack(rows)


def check_one(args, spec: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from effattn.attention import registry
  from effattn.kernels import hlo

  dtype = jnp.dtype(args.dtype)
  b, t, d = args.batch, args.seq_len, args.d_model
  tol = args.tol or (1e-4 if dtype == jnp.float32 else 3e-2)
  build = lambda impl: registry.build(layer_config(spec, impl), d_model=d,  # noqa: E731
                                      num_heads=args.num_heads, rngs=nnx.Rngs(0), dtype=dtype)
  auto, xla = build("auto"), build("xla")
  graph_auto, params = nnx.split(auto)
  graph_xla, params_xla = nnx.split(xla)
  assert jax.tree.structure(params) == jax.tree.structure(params_xla)
  keys = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(keys[0], (b, t, d), jnp.float32).astype(dtype)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  proj = jax.random.normal(keys[1], (b, t, d), jnp.float32)

  def loss_fn(graph):
    def loss(params, x, seg):
      y = nnx.merge(graph, params)(x, positions=positions, segment_ids=seg)[0]
      return jnp.sum(y.astype(jnp.float32) * proj), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  f_auto, f_xla = loss_fn(graph_auto), loss_fn(graph_xla)
  row = {"mechanism": spec}
  for case, seg in (("ones", jnp.ones((b, t), jnp.int32)),
                    ("packed", jnp.asarray(packed_segments(b, t)))):
    (_, y_a), g_a = f_auto(params, x, seg)
    (_, y_x), g_x = f_xla(params, x, seg)

    def rel(a, r):
      a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
      if not np.all(np.isfinite(a)):
        return float("inf")
      return float(np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 1e-30))
    errs = {"y": rel(y_a, y_x), "dx": rel(g_a[1], g_x[1])}
    leaf_errs = jax.tree.leaves(jax.tree.map(rel, g_a[0], g_x[0]))
    errs["dparams"] = max(leaf_errs) if leaf_errs else 0.0
    row[case] = errs
    if case == "ones":
      row["kernels"] = hlo.kernel_names(hlo.compiled_text(f_auto, params, x, seg))
  worst = max(max(row[c].values()) for c in ("ones", "packed"))
  row["worst"], row["tol"], row["ok"] = worst, tol, bool(worst <= tol)
  return row


def table(rows) -> str:
  lines = ["| mechanism | kernels (auto) | y | dx | dparams (ones) | y | dx | dparams (packed) | ok |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['mechanism']} | failed: {r['error'][:140]} |")
      continue
    k = sorted(set(r["kernels"]))
    e = [f"{r[c][n]:.1e}" for c in ("ones", "packed") for n in ("y", "dx", "dparams")]
    lines.append(f"| {r['mechanism']} | {len(r['kernels'])}: {', '.join(k)[:80]} | "
                 f"{' | '.join(e)} | {'yes' if r['ok'] else 'NO'} |")
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  import jax
  device = jax.devices()[0]
  print(f"{device.device_kind}: B {args.batch} T {args.seq_len} d_model {args.d_model} "
        f"H {args.num_heads} {args.dtype}", flush=True)
  rows = []
  for spec in mechanism_specs(args.mechanisms):
    try:
      rows.append(check_one(args, spec))
    except Exception as e:  # one mechanism's failure is a row, not the end of the run
      traceback.print_exc()
      rows.append({"mechanism": spec, "error": f"{type(e).__name__}: {e}".replace("\n", " ")})
    print(rows[-1], flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "check.json"), "w") as f:
      json.dump({"device": device.device_kind, "args": vars(args), "rows": rows}, f, indent=1)
  print(table(rows))
  return rows


if __name__ == "__main__":
  rows = main()
  sys.exit(0 if all(r.get("ok") for r in rows) else 1)
