r"""End-to-end train-step throughput per mechanism and sequence length (tokens/s, MFU, memory).

    python scripts/bench_train.py --out /tmp/bench_train
    python scripts/bench_train.py --mechanisms=mha,gqa,linear --seq_lens=2048,8192 --steps=20

The whole train step as train.py runs it (forward, backward, AdamW update, one jit, donated
state) on a decoder of --num_layers x --d_model in bf16, fed synthetic token batches of
--tokens_per_batch tokens (no dataset needed, so it runs on an image without TFDS). For each
(mechanism, T): compile, --warmup steps, then --steps steps timed as a whole (dispatch is async:
one block_until_ready at the end). Reported:

  tokens/s     batch tokens x steps / seconds
  MFU          tokens/s x train FLOPs per token / (peak bf16 FLOP/s x devices), with the
               trainer's FLOP count (6 N + 6 L T d: dense causal attention, whatever the
               mechanism really does, so sub-quadratic mechanisms may exceed "100%" of it)
  memory       the compiled step's footprint (arguments + outputs + temporaries - aliased)
  peak         the device's peak bytes in use (memory_stats; GPU/TPU). The allocator's peak is
               a running maximum over the process: a row whose peak did not rise above the
               rows before it shows "<= X"; --isolate runs each row in its own process for an
               exact figure per row
  kernels      custom kernels (Pallas/Triton, Mosaic, cuDNN attention) in the compiled step
               (effattn/kernels/hlo.py): a kernel that fell back or was dropped shows here

Mechanisms: `mha`, `gqa` (num_kv_heads = H / 4) and `swa` (window --window) are softmax
baselines; any other name is a registered mechanism with its default options ("all" = the
baselines plus every registered mechanism). `name:option=value:...` sets options of that
mechanism (model.attention.<name>.<option>) or shared attention fields (window, num_kv_heads,
head_dim, impl), e.g. `neural_memory:variant=lmm` or `moh:top_k=2`. A configuration that fails
(shape limits, memory) is reported with its error and the rest still run; --max_seconds stops
starting new ones.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BASELINES = {
    "mha": {},
    "gqa": {"num_kv_heads": "H/4"},
    "swa": {"window": "W"},
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mechanisms", default="all", help="comma list, or 'all'")
  p.add_argument("--seq_lens", default="1024,4096")
  p.add_argument("--tokens_per_batch", type=int, default=32768)
  p.add_argument("--d_model", type=int, default=1024)
  p.add_argument("--num_layers", type=int, default=4)
  p.add_argument("--num_heads", type=int, default=8)
  p.add_argument("--vocab_size", type=int, default=32768)
  p.add_argument("--window", type=int, default=512)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--segments", choices=("ones", "packed", "none"), default="ones",
                 help="ones: segment_ids of ones, as every pipeline batch has (mechanisms see a "
                      "packed-sequence batch); packed: four documents of random lengths per "
                      "row; none: no segment_ids (unpacked rows)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--max_seconds", type=float, default=0.0, help="0: no limit")
  p.add_argument("--isolate", action="store_true",
                 help="one process per row, so each row's peak memory is its own")
  p.add_argument("--out", default=None, help="directory for bench_train.json and .md")
  return p.parse_args(argv)


SHARED_FIELDS = ("window", "num_kv_heads", "head_dim", "impl")


def split_spec(spec: str) -> tuple[str, dict]:
  """'name:option=value:...' -> (name, {option: value}); values are Python literals or strings."""
  name, *options = spec.split(":")
  fields = {}
  for option in options:
    key, sep, raw = option.partition("=")
    if not sep or not key:
      raise ValueError(f"--mechanisms entry {spec!r}: {option!r} is not option=value")
    try:
      fields[key] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      fields[key] = raw
  return name, fields


def mechanism_names(arg: str) -> list[str]:
  from effattn import attention

  if arg == "all":
    return [*BASELINES, *(n for n in attention.names() if n != "softmax")]
  names = [n.strip() for n in arg.split(",") if n.strip()]
  unknown = [n for n in names
             if split_spec(n)[0] not in BASELINES and split_spec(n)[0] not in attention.names()]
  if unknown:
    raise ValueError(f"--mechanisms: {unknown} are neither baselines {list(BASELINES)} nor "
                     f"registered mechanisms {attention.names()}")
  return names


def make_config(args, mechanism: str, seq_len: int):
  from configs import base

  config = base.get_config()
  m = config.model
  m.d_model, m.num_layers, m.num_heads = args.d_model, args.num_layers, args.num_heads
  m.vocab_size, m.dtype, m.remat = args.vocab_size, args.dtype, args.remat
  m.mlp, m.position = "gated", "rope"
  name, options = split_spec(mechanism)
  if name in BASELINES:
    m.attention.name = "softmax"
    for key, value in BASELINES[name].items():
      m.attention[key] = {"H/4": max(args.num_heads // 4, 1), "W": args.window}[value]
  else:
    m.attention.name = name
  section = m.attention[m.attention.name]
  for key, value in options.items():
    if key in section:
      section[key] = value
    elif key in SHARED_FIELDS:
      m.attention[key] = value
    else:
      raise ValueError(f"--mechanisms entry {mechanism!r}: {key!r} is neither an option of "
                       f"{m.attention.name} ({sorted(section)}) nor one of {SHARED_FIELDS}")
  config.data.seq_len = seq_len
  config.train.batch_size = max(args.tokens_per_batch // seq_len, 1)
  config.optimizer.warmup_steps = 1
  return config


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int = 0, *,
                    segments: str = "ones") -> dict:
  """Random tokens; segments "ones" | "none" | "packed" (4 documents per row, positions
  restarting at each)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (batch, seq_len + 1), dtype=np.int32)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()
  segment_ids = None if segments == "none" else np.ones((batch, seq_len), np.int32)
  if segments == "packed":
    for row in range(batch):
      cuts = np.sort(rng.choice(np.arange(1, seq_len), 3, replace=False))
      for doc, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, seq_len])):
        segment_ids[row, lo:hi] = doc + 1
        positions[row, lo:hi] = np.arange(hi - lo)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": np.ones((batch, seq_len), np.float32),
          "segment_ids": segment_ids, "positions": positions}


def bench_one(args, mechanism: str, seq_len: int) -> dict:
  import jax
  from flax import nnx

  from effattn.config import validate
  from effattn.evaluate import timing
  from effattn.kernels import hlo
  from effattn.model import Transformer
  from effattn.train.loop import peak_flops_per_device, train_flops_per_token
  from effattn.train.optimizer import make_optimizer
  from effattn.train.state import count_params, create
  from effattn.train.step import make_train_step

  config = make_config(args, mechanism, seq_len)
  validate(config)
  model = Transformer(config.model, rngs=nnx.Rngs(0))
  tx, schedule = make_optimizer(config.optimizer, 1000)
  graphdef, state = create(model, tx)
  del model
  num_params = count_params(state.params)
  batch = jax.device_put(synthetic_batch(config.train.batch_size, seq_len, args.vocab_size,
                                         segments=args.segments))
  peak_before = timing.device_peak_bytes()
  step = jax.jit(make_train_step(graphdef, tx, schedule), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  kernels = hlo.count_kernels(compiled.as_text())
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch)
  loss = float(jax.block_until_ready(metrics)["loss"])
  seconds = (time.perf_counter() - t0) / args.steps
  tokens_per_sec = config.train.batch_size * seq_len / seconds
  peak = peak_flops_per_device()
  flops = train_flops_per_token(config.model, num_params, seq_len)
  peak_after = timing.device_peak_bytes()
  footprint = timing.footprint_bytes(compiled)
  return {"mechanism": mechanism, "seq_len": seq_len, "batch": config.train.batch_size,
          "params_m": num_params / 1e6, "step_ms": seconds * 1e3,
          "tokens_per_sec": tokens_per_sec,
          "mfu": tokens_per_sec * flops / (peak * jax.device_count()) if peak else None,
          "compiled_gib": footprint["total"] / 2**30 if footprint else None,
          "peak_gib": peak_after / 2**30 if peak_after else None,
          # The allocator's peak is a running maximum: it is this row's only if it rose here.
          "peak_is_this_row": bool(peak_after and (peak_before or 0) < peak_after),
          "kernels": kernels, "compile_s": compile_s, "loss": loss, "error": None}


def peak_cell(row: dict) -> str:
  if row.get("peak_gib") is None:
    return ""
  return f"{row['peak_gib']:.2f}" if row["peak_is_this_row"] else f"<= {row['peak_gib']:.2f}"


def model_description(args) -> str:
  return (f"Model: {args.num_layers} layers, d_model {args.d_model}, {args.num_heads} heads, "
          f"vocab {args.vocab_size}, {args.dtype}, SwiGLU, RoPE, remat={args.remat}")


def markdown(rows: list[dict], args, device: str) -> str:
  head = (f"Device: {device}. {model_description(args)}; segment_ids={args.segments}; "
          f"{args.tokens_per_batch} tokens per step; AdamW; mean step time over "
          f"{args.steps} steps timed together after {args.warmup} warm-up steps.")
  lines = [head, "",
           "| mechanism | T | batch | params (M) | step (ms) | tokens/s | MFU | compiled mem "
           "(GiB) | peak (GiB) | kernels | compile (s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]

  def f(v, fmt):
    return "" if v is None else format(v, fmt)

  for r in rows:
    if r["error"]:
      lines.append(f"| {r['mechanism']} | {r['seq_len']} | failed: {r['error'][:120]} |"
                   + " |" * 8)
      continue
    lines.append(f"| {r['mechanism']} | {r['seq_len']} | {r['batch']} | {r['params_m']:.1f} | "
                 f"{r['step_ms']:.1f} | {r['tokens_per_sec']:,.0f} | {f(r['mfu'], '.1%')} | "
                 f"{f(r['compiled_gib'], '.2f')} | {peak_cell(r)} | {r['kernels']} | "
                 f"{r['compile_s']:.1f} |")
  return "\n".join(lines) + "\n"


def run_isolated(args, mechanism: str, seq_len: int) -> tuple[dict, str | None]:
  """(row, device) from a fresh process (its own allocator, so its own peak memory)."""
  skip = {"mechanisms", "seq_lens", "out", "isolate", "max_seconds"}
  argv = [f"--{k}" if v is True else f"--{k}={v}" for k, v in vars(args).items()
          if k not in skip and v is not False and v is not None]
  with tempfile.TemporaryDirectory() as tmp:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv,
                           f"--mechanisms={mechanism}", f"--seq_lens={seq_len}", f"--out={tmp}"],
                          capture_output=True, text=True, check=False)
    path = os.path.join(tmp, "bench_train.json")
    if os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
      return result["rows"][0], result["device"]
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
  return {"mechanism": mechanism, "seq_len": seq_len,
          "error": f"process exited {proc.returncode}: {tail[0][:200]}"}, None


def write_results(args, stem: str, device: str, rows: list[dict], table: str) -> None:
  """--out/<stem>.json (device, args, rows) and --out/<stem>.md (the table), if --out is set."""
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
      json.dump({"device": device, "args": vars(args), "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
      f.write(table)


def run_grid(lengths, mechanisms, run_one, *, length_key: str, max_seconds: float, line,
             save) -> list[dict]:
  """Every mechanism at each length in turn through run_one(mechanism, length) -> row. A row
  that raises is reported with its error and the others still run; after max_seconds (0: no
  limit) the rows left are marked not run. Each row is printed (line(row) when it ran) and
  save(rows) follows it, so a run stopped from outside keeps the rows it has."""
  import jax

  rows = []
  start = time.perf_counter()
  for length in lengths:  # every mechanism at the first length before the next length
    for mechanism in mechanisms:
      if max_seconds and time.perf_counter() - start > max_seconds:
        rows.append({"mechanism": mechanism, length_key: length,
                     "error": f"not run: --max_seconds={max_seconds:g} reached"})
        continue
      try:
        row = run_one(mechanism, length)
      except Exception as e:  # noqa: BLE001 -- report and go on with the other configurations
        traceback.print_exc(limit=3)
        row = {"mechanism": mechanism, length_key: length,
               "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
      rows.append(row)
      print(f"{mechanism:>14} {length_key}={length:<6} {row['error'] or line(row)}", flush=True)
      jax.clear_caches()
      save(rows)
  return rows


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  import jax

  # --isolate: the parent must not take the device (its allocator would starve the children).
  device = ["(from the row processes)" if args.isolate else
            f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"]
  mechanisms = mechanism_names(args.mechanisms)
  seq_lens = [int(t) for t in args.seq_lens.split(",")]
  print(f"{device[0]}: mechanisms {mechanisms}, T {seq_lens}", flush=True)

  def run_one(mechanism, seq_len):
    if not args.isolate:
      return bench_one(args, mechanism, seq_len)
    row, child_device = run_isolated(args, mechanism, seq_len)
    device[0] = child_device or device[0]
    return row

  def line(row):
    return (f"{row['tokens_per_sec']:>12,.0f} tok/s  step {row['step_ms']:.1f} ms  "
            f"MFU {row['mfu'] or 0:.1%}  mem {row['compiled_gib'] or 0:.2f} GiB  "
            f"peak {peak_cell(row) or '-'} GiB  kernels {row['kernels']}  "
            f"compile {row['compile_s']:.0f}s")

  def save(rows):
    write_results(args, "bench_train", device[0], rows, markdown(rows, args, device[0]))

  rows = run_grid(seq_lens, mechanisms, run_one, length_key="seq_len",
                  max_seconds=args.max_seconds, line=line, save=save)
  print(markdown(rows, args, device[0]))
  return rows


if __name__ == "__main__":
  main()
