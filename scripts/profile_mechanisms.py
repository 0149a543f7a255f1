r"""Where one train step of each efficient mechanism spends its time and memory, stage by stage.

    python scripts/profile_mechanisms.py --out $OUT/profile            # GPU: every group, 16k
    python scripts/profile_mechanisms.py --groups moh,mha --variants new --out DIR
    python scripts/profile_mechanisms.py --smoke --out /tmp/profile    # CPU self-test, tiny

The model is bench_train.py's (4 layers, d_model 1024, 8 heads, SwiGLU, RoPE, bf16, 32,768
tokens per step, segment_ids of ones as every pipeline batch has), here at T = --seq_len
(batch = tokens / T). Rows, each compiled once, its custom kernels counted and timed with
effattn.evaluate.timing (median of --reps calls; fwd+bwd rows return the forward output with
the gradients, so no forward kernel is dropped):

  layer   one attention layer alone (the mechanism module, as the Block builds it), fwd+bwd:
          gradients of its parameters and of x; a step holds num_layers of these
  stage   one piece of that layer on the inputs the layer's own code makes for it, fwd+bwd
          where it is differentiated, fwd where it is not (top-w selection, tile lists,
          compaction are computed without gradients)
  step    the whole train step (bench_train.bench_one), with --steps

Groups and their stages:
  mha            attention op (cuDNN on GPU; with the batch's segment ids, and without)
  dynamic_mask   projections; key ranking; top-w selection; key layout (token order, or the
                 chunk-sorted one the layer picks at this T) with its gathers; block-sparse
                 kernel on that layout
  landmark       landmark keys; grouped softmax
  neural_memory  per variant (mag, mal, lmm, mac): memory streams; memory update; attention
                 branch (mag, mal)
  moh            (75% active: the defaults; 50%: 2 shared + top-2 of 6 routed) router;
                 compaction and gathers; shared heads (softmax op: cuDNN on GPU); routed
                 heads (head_routing kernel)
"of layer" is a stage's time over its layer's. Stages are compiled and timed apart, so their sum
only approximates the layer (no fusion across a stage's edges); the rest of a layer is its
projections and glue.

Variants: every change of issue 16 keeps its old path behind an option, so one run measures
both: "old" rows run dynamic_mask:select_impl=dense and neural_memory:swa_impl=dense (mag,
mal); "new" rows run the defaults. An old entry times its layer and the stage it changes only
(the other stages are the new entry's). "landmark block 63" is not a fix but a data point:
block_len 63 fills the grouped-softmax kernel's 64-slot tiles (63 tokens and the landmark key),
which the default 50 fills to (51/64)^2 = 64% of each tile pair's work. "diff" is max |y_old - y_new| / max |y_old| of the layer
outputs (same parameters and batch). Memory per row: the compiled program's temporaries and
arguments (memory_analysis) and the device's peak bytes in use (a running maximum over the
process: "<=" marks a row whose peak did not rise). Results: profile.json and profile.md under
--out, the table printed last; --max_seconds stops starting new rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(SCRIPTS))
sys.path.insert(0, SCRIPTS)

import bench_train  # noqa: E402  (the model config, batches and mechanism specs)

GROUPS = ("mha", "dynamic_mask", "moh", "landmark", "neural_memory")
MEMORY_VARIANTS = ("mag", "mal", "lmm", "mac")  # the changed ones first (--max_seconds)
SMOKE = dict(seq_len=64, tokens_per_batch=128, d_model=64, num_heads=4, vocab_size=128,
             num_layers=1, dtype="float32", reps=1)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--groups", default=",".join(GROUPS))
  p.add_argument("--variants", default="old,new", help="old, new or both (comma list)")
  p.add_argument("--rows", default="", help="keep rows whose name contains one of these "
                                           "comma-separated words (default: all)")
  p.add_argument("--seq_len", type=int, default=16384)
  p.add_argument("--tokens_per_batch", type=int, default=32768)
  p.add_argument("--d_model", type=int, default=1024)
  p.add_argument("--num_layers", type=int, default=4)
  p.add_argument("--num_heads", type=int, default=8)
  p.add_argument("--vocab_size", type=int, default=32768)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--steps", action="store_true", help="add a full train-step row per entry")
  p.add_argument("--max_seconds", type=float, default=0.0, help="0: no limit")
  p.add_argument("--smoke", action="store_true", help="CPU self-test at tiny sizes")
  p.add_argument("--estimate", action="store_true",
                 help="compile only: XLA's cost_analysis (GFLOP, GB accessed) and the memory "
                      "figures per row, no timing (what a machine without the GPU can say)")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.smoke:
    for key, value in SMOKE.items():
      if getattr(args, key) == p.get_default(key):
        setattr(args, key, value)
  return args


# -- what runs ---------------------------------------------------------------------------------


def entries(args) -> list[tuple[str, str, str]]:
  """(group, label, bench_train mechanism spec) for every layer the run profiles."""
  variants = {v.strip() for v in args.variants.split(",") if v.strip()}
  if not variants <= {"old", "new"}:
    raise ValueError(f"--variants={args.variants!r}: use old, new or old,new")
  out = []
  for group in (g.strip() for g in args.groups.split(",") if g.strip()):
    if group not in GROUPS:
      raise ValueError(f"--groups: {group!r} is not one of {GROUPS}")
    if group == "mha":
      out.append((group, "mha", "mha"))
    elif group == "landmark":  # block_len 63 fills the kernel's 64-slot tiles (50 fills 80%)
      out += [(group, "landmark", "landmark"),
              (group, "landmark block 63", "landmark:block_len=63")]
    elif group == "dynamic_mask":
      out += [(group, f"dynamic_mask {v}",
               "dynamic_mask:select_impl=" + ("dense" if v == "old" else "ranked"))
              for v in ("old", "new") if v in variants]
    elif group == "neural_memory":
      for name in MEMORY_VARIANTS:
        changed = name in ("mag", "mal")
        for v in ("old", "new") if changed else ("new",):
          if v in variants or not changed:
            spec = f"neural_memory:variant={name}"
            if changed:
              spec += ":swa_impl=" + ("dense" if v == "old" else "fused")
            out.append((group, f"neural_memory {name}" + (f" {v}" if changed else ""), spec))
    else:  # moh
      out += [(group, "moh 75%", "moh"),
              (group, "moh 50%", "moh:num_shared_heads=2:top_k=2")]
  return out


class Layer:
  """One attention layer of the bench_train model and the batch it sees."""

  def __init__(self, args, spec: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from effattn import attention
    from effattn.config import validate
    from effattn.model.transformer import compute_dtype

    config = bench_train.make_config(bench_args(args), spec, args.seq_len)
    validate(config)
    m = config.model
    self.dtype = compute_dtype(m.dtype)
    self.module = attention.build(m.attention, d_model=m.d_model, num_heads=m.num_heads,
                                  rngs=nnx.Rngs(0), layer_idx=0, num_layers=m.num_layers,
                                  dtype=self.dtype, rope_theta=m.rope_theta)
    self.graphdef, self.params, self.rest = nnx.split(self.module, nnx.Param, ...)
    b, t = config.train.batch_size, args.seq_len
    batch = bench_train.synthetic_batch(b, t, args.vocab_size)
    self.x = jax.random.normal(jax.random.key(1), (b, t, m.d_model), self.dtype)
    self.positions = jnp.asarray(batch["positions"])
    self.segment_ids = jnp.asarray(batch["segment_ids"])

  def bind(self, fn):
    """fn(module, *args) -> g(params, *args) that merges the module from params (no constant
    parameters baked into the compiled program)."""
    from flax import nnx

    def g(params, *args):
      return fn(nnx.merge(self.graphdef, params, self.rest), *args)
    return g

  def forward(self):
    """layer(params, x) -> (y, sum of the loss_ aux terms): what the train step differentiates."""
    import jax.numpy as jnp

    def call(module, x):
      y, aux = module(x, positions=self.positions, segment_ids=self.segment_ids, train=True)
      loss = sum((v for k, v in aux.items() if k.startswith("loss_")), jnp.zeros(()))
      return y, loss
    return self.bind(call)

  def run(self, fn, *args):
    """fn(params, *args) evaluated once (jitted), for the inputs of the next stages."""
    import jax
    return jax.jit(fn)(self.params, *args)


def _stage(name, fn, args, diff=None, changed=False):
  """A stage row: fn(params, *args); diff: argnums to differentiate (None: forward only);
  changed: the stage an old/new variant differs in (the only stage an "old" entry times)."""
  return {"stage": name, "fn": fn, "args": args, "diff": diff, "changed": changed}


def stages(group: str, label: str, layer: Layer) -> list[dict]:
  """The stage rows of one layer, their inputs made by the layer's own code."""
  import jax.numpy as jnp

  m, x, pos, seg = layer.module, layer.x, layer.positions, layer.segment_ids
  if group == "mha":
    from effattn.kernels.softmax import softmax_attention
    q, k, v = layer.run(layer.bind(lambda mod, x: mod.project(x, pos)), x)
    attend = lambda segment_ids: lambda p, q, k, v: softmax_attention(  # noqa: E731
        q, k, v, causal=True, segment_ids=segment_ids, impl=m.op_impl("softmax"))
    # With segment ids (every pipeline batch has them) cuDNN runs its packed layout.
    return [_stage("attention op", attend(seg), (q, k, v), (1, 2, 3)),
            _stage("attention op (no segment ids)", attend(None), (q, k, v), (1, 2, 3))]
  if group == "dynamic_mask":
    from effattn.kernels.block_sparse import (block_size_for, block_sparse_attention,
                                              sorted_chunks, top_w)
    t = x.shape[1]
    bs = block_size_for(t, m.opts.block)
    sort = m.key_layout(t) == "sorted"
    project = layer.bind(lambda mod, x: mod.project(x, pos))
    q, k, v, bias = layer.run(project, x)
    rank = lambda p, bias: top_w.key_ranks(bias)  # noqa: E731
    ranks = layer.run(rank, bias)
    select = layer.bind(lambda mod, bias: mod.select(bias, seg, True, bs, ranks))
    thr, thr_pos, tiles, _ = layer.run(select, bias)

    def arrange(p, k, v, bias):  # the layer's key layout (sorted_chunks), as the layer calls it
      if sort:
        return sorted_chunks.sorted_chunk_layout(
            k, v, bias, ranks[0], thr, thr_pos, tiles, num_heads=m.num_heads, block=bs,
            sort_chunk=m.opts.sort_chunk, segment_ids=seg,
            ranges_exact=top_w.contiguous_runs(seg))
      return sorted_chunks.token_layout(k, v, bias, tiles, num_heads=m.num_heads,
                                        segment_ids=seg)
    lay = layer.run(arrange, k, v, bias)
    kernel = lambda p, q, k, v, bias: block_sparse_attention(  # noqa: E731
        q, k, v, lay.kv_indices, lay.kv_counts, block_q=bs, block_k=bs, causal=True,
        kv_positions=lay.kv_positions, q_segment_ids=seg, kv_segment_ids=lay.kv_segment_ids,
        kv_bias=bias, q_threshold=thr, q_threshold_pos=thr_pos,
        impl=m.op_impl("block_sparse"))[0]

    def gathers(p, k, v, bias):  # the layout's differentiated outputs
      out = arrange(p, k, v, bias)
      return out.k, out.v, out.kv_bias
    rows = [_stage("projections", project, (x,), (0, 1)),
            _stage("key ranking", rank, (bias,))]
    rows.append(_stage(f"top-w selection ({m.opts.select_impl})", select, (bias,),
                       changed=True))
    rows += [_stage(f"key layout ({'sorted' if sort else 'token'}), fwd+bwd of its gathers",
                    gathers, (k, v, bias), (1, 2, 3)),
             _stage("block-sparse kernel", kernel, (q, lay.k, lay.v, lay.kv_bias), (1, 2, 3, 4))]
    return rows
  if group == "landmark":
    from effattn.attention.landmark import block_groups, kernel_tile
    from effattn.kernels import grouped_softmax
    gid = block_groups(pos, seg, m.opts.block_len)
    split = lambda mod, x: (mod._rope(base_split(mod.q_proj(x), mod), pos),  # noqa: E731
                            base_split(mod.k_proj(x), mod), base_split(mod.v_proj(x), mod))
    q, k_raw, v = layer.run(layer.bind(split), x)
    keys = layer.bind(lambda mod, k_raw: mod.landmark_keys(k_raw, pos, gid))
    k_land = layer.run(keys, k_raw)
    k = layer.run(layer.bind(lambda mod, k_raw: mod._rope(k_raw, pos)), k_raw)
    attend = lambda p, q, k, v, k_land: grouped_softmax.grouped_softmax(  # noqa: E731
        q, k, v, k_land, gid, seg, block_len=m.opts.block_len,
        impl=m.op_impl("grouped_softmax"), chunk=m.opts.query_chunk, tile=kernel_tile(m.opts),
        max_groups=m.opts.max_groups or None)
    return [_stage("landmark keys", keys, (k_raw,), (0, 1)),
            _stage("grouped softmax", attend, (q, k, v, k_land), (1, 2, 3, 4))]
  if group == "neural_memory":
    streams = layer.bind(lambda mod, x: mod.memory.streams(x, seg)[:4])
    q, k, v, gates = layer.run(streams, x)
    update = layer.bind(lambda mod, q, k, v, gates: mod.memory.update(
        q, k, v, gates, seg, mod.memory.initial_state(q.shape[0]))[0])
    rows = [_stage("memory streams", streams, (x,), (0, 1)),
            _stage("memory update", update, (q, k, v, gates), (1, 2, 3, 4))]
    if m.variant in ("mag", "mal"):
      rows.append(_stage(f"attention branch ({m.opts.swa_impl})",
                         layer.bind(lambda mod, z: mod._swa(z, pos, seg)), (x,), (0, 1),
                         changed=True))
    return rows
  if group == "moh":
    from effattn.kernels.head_routing import head_routed_attention
    from effattn.kernels.head_routing.common import compact, gather_tokens
    from effattn.kernels.softmax import softmax_attention
    q, k, v = layer.run(layer.bind(lambda mod, x: mod.project(x, pos)), x)
    route = layer.bind(lambda mod, x: mod.route(x, seg != 0))
    gates, _ = layer.run(route, x)
    hs, hs_kv = m.num_shared, m.num_shared // (m.num_heads // m.num_kv_heads)
    routed_q, routed_gates = q[:, :, hs:], gates[..., hs:].astype(q.dtype)

    def round_trip(p, rq, g):  # what the routed path moves around its kernel
      c = compact(g != 0)
      return gather_tokens(gather_tokens(rq, c.perm), c.slot)
    return [
        _stage("router", route, (x,), (0, 1)),
        _stage("compaction and gathers", round_trip, (routed_q, routed_gates), (1,)),
        _stage("shared heads (softmax op)", lambda p, q, k, v: softmax_attention(
            q, k, v, causal=True, segment_ids=seg, impl=m.op_impl("softmax")),
            (q[:, :, :hs], k[:, :, :hs_kv], v[:, :, :hs_kv]), (1, 2, 3)),
        _stage("routed heads (kernel)", lambda p, q, k, v, g: head_routed_attention(
            q, k, v, g, causal=True, segment_ids=seg, block_q=m.opts.block_q,
            block_k=m.opts.block_k, impl=m.op_impl("head_routing")),
            (routed_q, k[:, :, hs_kv:], v[:, :, hs_kv:], routed_gates), (1, 2, 3, 4))]
  raise ValueError(group)


def base_split(x, mod):
  from effattn.attention import base
  return base.split_heads(x, mod.num_heads)


# -- measuring ---------------------------------------------------------------------------------


def measure(fn, args, diff, reps: int, estimate: bool = False) -> tuple[dict, object]:
  """Compile fn (fwd+bwd over `diff` when given), time it; the row's numbers and the forward
  output of one call (estimate: XLA's cost figures instead of a time, and no call)."""
  import jax

  from effattn.evaluate import timing

  if diff is not None:
    fb = timing.forward_and_grads(fn, argnums=diff)
    call_args = (*args, timing.cotangent_like(fn, *args))
  else:
    fb, call_args = fn, args
  compiled, names, compile_s = timing.compile_counted(fb, *call_args)
  memory = compiled.memory_analysis()
  row = {"kernels": len(names), "kernel_names": names, "compile_s": compile_s,
         "temp_gib": memory.temp_size_in_bytes / 2**30 if memory else None,
         "argument_gib": memory.argument_size_in_bytes / 2**30 if memory else None}
  if estimate:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
    row.update(ms=None, gflop=cost.get("flops", 0.0) / 1e9,
               gbytes=cost.get("bytes accessed", 0.0) / 1e9)
    return row, None
  row["ms"] = timing.median_ms(compiled, *call_args, reps=reps)
  out = compiled(*call_args)
  forward = out[0] if diff is not None else out
  return row, jax.tree.leaves(forward)[0]


def profile_entry(args, group: str, label: str, spec: str, keep_row, outputs: dict):
  """Rows of one entry: the layer, its stages, and (--steps) the train step."""
  import jax
  import jax.numpy as jnp

  from effattn.evaluate import timing

  layer = Layer(args, spec)
  rows = []
  todo = [("layer", dict(fn=layer.forward(), args=(layer.x,), diff=(0, 1)))]
  old = label.endswith(" old")  # the stages an old variant shares with the new one: once
  todo += [(s["stage"], s) for s in stages(group, label, layer) if s["changed"] or not old]
  for name, s in todo:
    if not keep_row(f"{label} {name}"):
      continue
    before = timing.device_peak_bytes()
    row, y = measure(s["fn"], (layer.params, *s["args"]), s["diff"], args.reps, args.estimate)
    peak = timing.device_peak_bytes()
    row.update(group=group, entry=label, spec=spec, row=name, seq_len=args.seq_len,
               batch=layer.x.shape[0], error=None, diff=None,
               peak_gib=peak / 2**30 if peak else None,
               peak_is_this_row=bool(peak and (before or 0) < peak))
    if name == "layer" and y is not None:
      base_label = label.rsplit(" ", 1)[0]
      if label.endswith(" old"):
        outputs[base_label] = y
      elif label.endswith(" new") and base_label in outputs:
        old = outputs.pop(base_label).astype(jnp.float32)
        row["diff"] = float(jnp.max(jnp.abs(old - y.astype(jnp.float32)))
                            / jnp.maximum(jnp.max(jnp.abs(old)), 1e-30))
    rows.append(row)
    cost = (f"{row['gflop']:9.1f} GFLOP {row['gbytes']:7.2f} GB" if args.estimate
            else f"{row['ms']:9.3f} ms")
    print(f"{label:>22} | {name:<34} {cost}  kernels {row['kernels']:>2}  "
          f"temp {row['temp_gib'] or 0:6.2f} GiB  compile {row['compile_s']:.0f}s", flush=True)
    del y
  del layer
  if args.steps and not args.estimate and keep_row(f"{label} step"):
    step = bench_train.bench_one(bench_args(args), spec, args.seq_len)
    rows.append(dict(group=group, entry=label, spec=spec, row="step", seq_len=args.seq_len,
                     batch=step["batch"], ms=step["step_ms"], kernels=step["kernels"],
                     compile_s=step["compile_s"], temp_gib=None,
                     argument_gib=None, peak_gib=step["peak_gib"],
                     peak_is_this_row=step["peak_is_this_row"], diff=None, error=None))
  jax.clear_caches()
  return rows


def bench_args(args):
  """bench_train's arguments with this run's model and batch (its defaults for the rest)."""
  bench = bench_train.parse_args([])
  for key in ("tokens_per_batch", "d_model", "num_layers", "num_heads", "vocab_size", "dtype"):
    setattr(bench, key, getattr(args, key))
  bench.warmup, bench.steps = 1, args.reps
  return bench


# -- reporting ---------------------------------------------------------------------------------


def markdown(rows: list[dict], args, device: str) -> str:
  head = (f"Device: {device}. One layer of the bench_train model ({args.num_layers} layers, "
          f"d_model {args.d_model}, {args.num_heads} heads, {args.dtype}, SwiGLU, RoPE; "
          f"{args.tokens_per_batch} tokens per step) at T = {args.seq_len}; median of "
          f"{args.reps} calls; fwd+bwd where a stage is differentiated.")
  if args.estimate:
    head = head.replace(f"median of {args.reps} calls", "XLA cost_analysis of the compiled "
                        "program on this backend (no timing)")
    lines = [head, "", "| entry | row | GFLOP | GB accessed | kernels | temp GiB | args GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
      if r.get("error"):
        lines.append(f"| {r['entry']} | {r['row']} | failed: {r['error'][:100]} | | | | |")
      else:
        lines.append(f"| {r['entry']} | {r['row']} | {r['gflop']:.2f} | {r['gbytes']:.2f} | "
                     f"{r['kernels']} | {r['temp_gib']:.3f} | {r['argument_gib']:.3f} |")
    return "\n".join(lines) + "\n"
  lines = [head, "", "| entry | row | ms | of layer | kernels | temp GiB | args GiB | peak GiB "
           "| diff | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
  layer_ms = {r["entry"]: r["ms"] for r in rows if r.get("row") == "layer" and not r["error"]}
  f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
  for r in rows:
    if r.get("error"):
      lines.append(f"| {r['entry']} | {r['row']} | failed: {r['error'][:100]} |" + " |" * 7)
      continue
    peak = f(r["peak_gib"], ".2f")
    if peak and not r["peak_is_this_row"]:
      peak = "<= " + peak
    share = (f"{r['ms'] / layer_ms[r['entry']]:.0%}"
             if r["row"] not in ("layer", "step") and layer_ms.get(r["entry"]) else "")
    lines.append(f"| {r['entry']} | {r['row']} | {r['ms']:.3f} | {share} | {r['kernels']} | "
                 f"{f(r['temp_gib'], '.3f')} | {f(r['argument_gib'], '.3f')} | {peak} | "
                 f"{f(r['diff'], '.1e')} | {r['compile_s']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  import jax

  device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
  words = [w.strip() for w in args.rows.split(",") if w.strip()]
  keep_row = lambda name: not words or any(w in name for w in words)  # noqa: E731
  plan = entries(args)
  print(f"{device}: T={args.seq_len}, {len(plan)} entries", flush=True)
  rows, outputs, start = [], {}, time.perf_counter()

  def save():
    bench_train.write_results(args, "profile", device, rows, markdown(rows, args, device))

  for group, label, spec in plan:
    if args.max_seconds and time.perf_counter() - start > args.max_seconds:
      rows.append(dict(group=group, entry=label, spec=spec, row="-",
                       error=f"not run: --max_seconds={args.max_seconds:g} reached"))
      continue
    try:
      rows += profile_entry(args, group, label, spec, keep_row, outputs)
    except Exception as e:  # noqa: BLE001 -- report and go on with the other entries
      traceback.print_exc(limit=4)
      rows.append(dict(group=group, entry=label, spec=spec, row="-",
                       error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    save()
  print(markdown(rows, args, device))
  return rows


if __name__ == "__main__":
  main()
