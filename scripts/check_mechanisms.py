r"""Every mechanism's auto path against its xla path on this device: the glue between a mechanism
and its kernels, checked where the kernels run.

    python scripts/check_mechanisms.py --out $OUT/check          # GPU: every mechanism, T 2048
    python scripts/check_mechanisms.py --smoke                    # CPU self-test (both paths xla)

For each mechanism (configs/base.py's defaults; `name:option=value` specs as bench_train takes
them) one attention layer is built once and called with impl="auto" and impl="xla" on the same
parameters and inputs: x [B, T, d_model], positions, and segment ids, both of ones and packed
(three segments of ragged lengths per row). Both are compared with the xla path in float32 on the
same (rounded) inputs: the layer output and the gradients of a random projection of it with
respect to x and every parameter, as max |path - f32| / max |f32| per leaf (the worst leaf is
reported). A row passes when the auto path's error is within 1.5x the xla path's in the same
dtype plus a floor: the kernels may round differently from XLA, not worse. The float32
baseline runs at jax_default_matmul_precision "float32" (exact products); --precision runs both
paths at another (e.g. tensorfloat32: the kernels' float32 dots on TF32, effattn/kernels/matmul.py). The auto row's compiled program is searched for custom
kernels (effattn.kernels.hlo): a mechanism whose auto path ran no kernel on a GPU is reported,
not failed (some have none). The table is printed last; check.json under --out.

--jobs N checks N mechanisms at once, each in its own process (the GPU shared, memory allocated
on demand): a row is mostly compile time (35-50 s for a mechanism's three programs on an H200,
which one process does one after another), so the whole check takes about a (jobs)th of it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
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
  p.add_argument("--floor", type=float, default=0.0,
                 help="error allowed beyond 1.5x the xla path's (0: 2e-3 for 16-bit, 1e-5 f32)")
  p.add_argument("--precision", default="", choices=("", "tensorfloat32", "float32"),
                 help="jax_default_matmul_precision of the auto and xla paths ('': unset)")
  p.add_argument("--interpret", default="", choices=("", "gpu", "tpu"),
                 help="CPU: run the auto path's kernels of this platform in interpret mode")
  p.add_argument("--smoke", action="store_true", help="CPU self-test at tiny sizes")
  p.add_argument("--jobs", type=int, default=1,
                 help="mechanisms checked at once, one process each (1: all in this process)")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.jobs < 1:
    p.error(f"--jobs={args.jobs} must be >= 1")
  if args.smoke:
    args.seq_len, args.batch, args.d_model, args.num_heads = 40, 2, 64, 4
    args.dtype = "float32"
  return args


def mechanism_specs(arg: str) -> list[str]:
  from effattn import attention
  specs = []
  for s in filter(None, arg.split(",")):
    specs += sorted(attention.names()) if s == "default" else [s]
  return specs


def layer_config(spec: str, impl: str):
  """model.attention of configs/base.py with `spec`'s options (`name:option=value:...`, as
  bench_train takes them) and `impl`. A spec's own impl replaces "auto" (the path under test);
  the xla rows stay xla."""
  from configs import base

  name, *items = spec.split(":")
  attn = base.get_config().model.attention
  attn.name = name
  for item in items:
    key, value = item.split("=")
    if key == "impl":
      impl = value if impl == "auto" else impl
      continue
    section = attn[name]
    target = section if key in section else attn
    current = target[key]
    target[key] = type(current)(value) if current is not None else int(value)
  attn.impl = impl
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
  from effattn.kernels import dispatch, hlo

  dtype = jnp.dtype(args.dtype)
  b, t, d = args.batch, args.seq_len, args.d_model
  floor = args.floor or (1e-5 if dtype == jnp.float32 else 2e-3)
  build = lambda impl, dt: registry.build(layer_config(spec, impl), d_model=d,  # noqa: E731
                                          num_heads=args.num_heads, rngs=nnx.Rngs(0), dtype=dt)
  graphs = {}
  for role, impl, dt in (("auto", "auto", dtype), ("xla", "xla", dtype),
                         ("f32", "xla", jnp.float32)):
    graphs[role], params = nnx.split(build(impl, dt))  # same seed: the same parameters
  keys = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(keys[0], (b, t, d), jnp.float32).astype(dtype)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  proj = jax.random.normal(keys[1], (b, t, d), jnp.float32)

  def loss_fn(graph):
    def loss(params, x, seg):
      y = nnx.merge(graph, params)(x, positions=positions, segment_ids=seg)[0]
      return jnp.sum(y.astype(jnp.float32) * proj), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  def rel(a, r, scale=None):
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    if not np.all(np.isfinite(a)):
      return float("inf")
    scale = np.max(np.abs(r)) if scale is None else scale
    return float(np.max(np.abs(a - r)) / max(scale, 1e-30))

  def errors(out, ref):
    (_, y), (dparams, dx) = out
    (_, y_ref), (dparams_ref, dx_ref) = ref
    # A leaf whose float32 gradient is below 1e-5 of the largest leaf's is zero up to rounding
    # (MoH's router with top_k 1 and official scaling: every chosen gate is exactly 1), so its
    # error is measured on the scale of the whole gradient instead of its own noise.
    whole = max((float(np.max(np.abs(np.asarray(r, np.float32))))
                 for r in jax.tree.leaves(dparams_ref)), default=0.0)
    def rel_leaf(a, r):
      small = float(np.max(np.abs(np.asarray(r, np.float32)))) <= 1e-5 * whole
      return rel(a, r, scale=whole if small else None)
    leaf = jax.tree.leaves(jax.tree.map(rel_leaf, dparams, dparams_ref))
    return {"y": rel(y, y_ref), "dx": rel(dx, dx_ref), "dparams": max(leaf, default=0.0)}

  fns = {role: loss_fn(g) for role, g in graphs.items()}
  interpret = (lambda: dispatch.interpret_kernels(args.interpret)) if args.interpret else (
      contextlib.nullcontext)
  # jit's cache key holds the precision, so each context traces its own program.
  paths = (lambda: jax.default_matmul_precision(args.precision)) if args.precision else (
      contextlib.nullcontext)
  row = {"mechanism": spec}
  for case, seg in (("ones", jnp.ones((b, t), jnp.int32)),
                    ("packed", jnp.asarray(packed_segments(b, t)))):
    with jax.default_matmul_precision("float32"):
      ref = fns["f32"](params, x.astype(jnp.float32), seg)
    with interpret(), paths():
      out = fns["auto"](params, x, seg)
      if case == "ones":
        row["kernels"] = hlo.kernel_names(hlo.compiled_text(fns["auto"], params, x, seg))
    with paths():
      xla = fns["xla"](params, x, seg)
    row[case] = {"auto": errors(out, ref), "xla": errors(xla, ref)}
  worst = {role: max(row[c][role][n] for c in ("ones", "packed") for n in ("y", "dx", "dparams"))
           for role in ("auto", "xla")}
  row["worst"], row["floor"] = worst, floor
  # The kernels may round differently from XLA, not worse: within 1.5x of the xla path's error
  # against float32 (and a floor for paths that agree to rounding).
  row["ok"] = bool(worst["auto"] <= 1.5 * worst["xla"] + floor)
  return row


def table(rows) -> str:
  lines = ["| mechanism | kernels (auto) | auto: y | dx | dparams | xla: y | dx | dparams | ok |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['mechanism']} | failed: {r['error'][:140]} |")
      continue
    k = sorted(set(r["kernels"]))
    worst = lambda role, n: max(r[c][role][n] for c in ("ones", "packed"))  # noqa: E731
    e = [f"{worst(role, n):.1e}" for role in ("auto", "xla") for n in ("y", "dx", "dparams")]
    lines.append(f"| {r['mechanism']} | {len(r['kernels'])}: {', '.join(k)[:80]} | "
                 f"{' | '.join(e)} | {'yes' if r['ok'] else 'NO'} |")
  return "\n".join(lines)


def check_in_process(args, spec: str) -> dict:
  try:
    return check_one(args, spec)
  except Exception as e:  # one mechanism's failure is a row, not the end of the run
    traceback.print_exc()
    return {"mechanism": spec, "error": f"{type(e).__name__}: {e}".replace("\n", " ")}


def check_in_subprocess(argv: list[str], spec: str) -> dict:
  """check_one(spec) in a child process of this script (the same flags but --mechanisms, --out
  and --jobs); its row from the child's check.json, or an error row with its output's tail."""
  with tempfile.TemporaryDirectory() as out:
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # children share the GPU
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--mechanisms", spec,
                           "--out", out], env=env, capture_output=True, text=True)
    try:
      with open(os.path.join(out, "check.json")) as f:
        return json.load(f)["rows"][0]
    except (OSError, ValueError, IndexError, KeyError):
      tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
      return {"mechanism": spec, "error": f"child exited {done.returncode}: " + " | ".join(tail)}


def child_argv(argv: list[str]) -> list[str]:
  """argv without --mechanisms, --out and --jobs (each child gets its own)."""
  own, kept, skip = ("--mechanisms", "--out", "--jobs"), [], False
  for a in argv:
    if skip:
      skip = False
    elif a in own:
      skip = True
    elif not a.startswith(tuple(o + "=" for o in own)):
      kept.append(a)
  return kept


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  import jax
  device = jax.devices()[0]
  print(f"{device.device_kind}: B {args.batch} T {args.seq_len} d_model {args.d_model} "
        f"H {args.num_heads} {args.dtype} precision {args.precision or 'unset'}", flush=True)
  specs = mechanism_specs(args.mechanisms)
  rows = []
  with contextlib.ExitStack() as stack:
    if args.jobs == 1:
      results = map(functools.partial(check_in_process, args), specs)
    else:
      pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(args.jobs))
      flags = child_argv(sys.argv[1:] if argv is None else list(argv))
      results = pool.map(functools.partial(check_in_subprocess, flags), specs)
    for row in results:  # in the order of specs, each printed as it lands
      rows.append(row)
      print(row, flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "check.json"), "w") as f:
      json.dump({"device": device.device_kind, "args": vars(args), "rows": rows}, f, indent=1)
  print(table(rows))
  return rows


if __name__ == "__main__":
  rows = main()
  sys.exit(0 if all(r.get("ok") for r in rows) else 1)
