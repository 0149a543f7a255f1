r"""One-token decode after long prompts, every mechanism against softmax: tokens/s, cache bytes.

    python scripts/bench_decode.py --out $OUT                    # GPU: 4k / 16k / 64k, batch 8
    python scripts/bench_decode.py --smoke --out /tmp/decode     # CPU self-test at tiny sizes

The model's real decode path, as effattn/evaluate/generate.py runs it: Transformer.decode (each
layer's attention `decode` on its cache), the greedy next token, and the cache carried through
a lax.scan of --steps one-token steps in one jitted call whose carry is donated (caches are
updated in place). For each (mechanism, prompt length P): compile, one warm-up call, --reps
timed calls; ms/token = median call / steps, tokens/s = batch x steps / median call. The model
is bench_train.py's (4 layers, d_model 1024, 8 heads, SwiGLU, RoPE, bf16), every mechanism with
its default options (`name:option=value` as in bench_train.py sets one).

The prompt's cache is not computed by a prefill: its leaves are init_cache's at capacity
P + steps x (reps + 1), every float leaf replaced by random normal values, the `index` leaves
set to P, the other integer leaves kept as init_cache made them (neural_memory's chunk fill 0:
P is a multiple of its chunk; routing's cluster ids 0). Why: a real 64k prefill through every
decode path would take far longer than this run (softmax's prefill builds a [B, 1, t, max_len]
mask, neural_memory's decodes token by token), and no decode step's cost depends on the cached
values: every cache-based decode (softmax, sqa, moh, dynamic_mask, routing, neural_memory
mag / mal, landmark's block scores) computes over the whole cache capacity under a mask built
from `index`, the linear family and the memory carry fixed-size states, and no step branches on
a cached value (neural_memory commits its chunk with jnp.where). A sliding window's cache
(softmax / sqa / neural_memory mag / mal with `window`) is a ring of its W slots whose slot
positions follow from `index` alone (effattn/attention/kv_cache.py), so it too is a valid cache
after P tokens, of W slots whatever P. So the time is that of a decode after P tokens; the tokens
it emits mean nothing. The capacity is P plus the slots the timed steps fill, since a full
cache-based decode pays for its whole capacity from the first token.

Columns: tokens/s and its ratio to mha (softmax, H KV heads) at the same P; cache MiB per
sequence (leaves of init_cache(B, P) with a batch axis, / B); kernels = custom kernels in the
compiled decode (effattn/kernels/hlo.py); temp MiB = the compiled call's temporaries (a decode
step whose temporaries grow as P^2 shows here). Results: decode.json and decode.md under --out,
the table printed last. --max_seconds stops starting new rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(SCRIPTS))
sys.path.insert(0, SCRIPTS)

import bench_train  # noqa: E402  (the model config and mechanism specs of the train benchmark)

SMOKE = dict(prompt_lens="32,64", batch=2, d_model=64, num_layers=2, num_heads=4,
             vocab_size=128, dtype="float32", steps=2, reps=2)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mechanisms", default="default",
                 help="comma list of names or name:option=value; 'default' = mha and every "
                      "registered mechanism; 'all' adds bench_train's gqa and swa")
  p.add_argument("--prompt_lens", default="4096,16384,65536",
                 help="run in this order (longest first keeps the 64k rows under --max_seconds)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--d_model", type=int, default=1024)
  p.add_argument("--num_layers", type=int, default=4)
  p.add_argument("--num_heads", type=int, default=8)
  p.add_argument("--vocab_size", type=int, default=32768)
  p.add_argument("--window", type=int, default=512, help="swa's window")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--steps", type=int, default=8, help="decode steps per timed call")
  p.add_argument("--reps", type=int, default=5, help="timed calls (median)")
  p.add_argument("--max_seconds", type=float, default=0.0, help="0: no limit")
  p.add_argument("--out", default=None, help="directory for decode.json and decode.md")
  p.add_argument("--smoke", action="store_true", help="CPU self-test: " + str(SMOKE))
  if "--smoke" in (sys.argv[1:] if argv is None else argv):
    p.set_defaults(**SMOKE)  # flags given still win
  args = p.parse_args(argv)
  args.remat, args.tokens_per_batch = False, args.batch  # fields bench_train.make_config reads
  return args


def mechanism_list(arg: str) -> list[str]:
  from effattn import attention
  if arg == "default":
    return ["mha", *(n for n in attention.names() if n != "softmax")]
  return bench_train.mechanism_names(arg)


def build_model(args, mechanism: str):
  from flax import nnx

  from effattn.config import validate
  from effattn.model import Transformer

  # The decode model does not depend on data.seq_len (rope positions): the longest prompt names
  # the context the model is checked for.
  longest = max(int(p) for p in args.prompt_lens.split(","))
  config = bench_train.make_config(args, mechanism, longest)
  validate(config)
  return nnx.split(Transformer(config.model, rngs=nnx.Rngs(0)))


def _leaf_name(path) -> str:
  last = path[-1] if path else None
  return str(getattr(last, "key", getattr(last, "name", "")))


def cache_shapes(graphdef, state, batch: int, capacity: int):
  """init_cache(batch, capacity) as ShapeDtypeStructs (traced, not computed)."""
  import jax
  from flax import nnx
  return jax.eval_shape(lambda s: nnx.merge(graphdef, s).init_cache(batch, capacity), state)


def filled_cache(shapes, prompt_len: int, seed: int = 0):
  """The cache of `shapes` as after a prompt_len-token prompt: float leaves random normal,
  `index` leaves prompt_len, other integer leaves 0 as init_cache makes them (see the
  docstring; tests/scripts/test_bench_decode.py checks init_cache's integers are 0)."""
  import jax
  import jax.numpy as jnp

  paths, tree = jax.tree_util.tree_flatten_with_path(shapes)

  def make(key):  # one jitted call; the RngBitGenerator keys compile in a fraction of threefry's
    leaves = []
    for key, (path, leaf) in zip(jax.random.split(key, max(len(paths), 1)), paths):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        leaves.append(jax.random.normal(key, leaf.shape, jnp.float32).astype(leaf.dtype))
      else:
        value = prompt_len if _leaf_name(path) == "index" else 0
        leaves.append(jnp.full(leaf.shape, value, leaf.dtype))
    return jax.tree.unflatten(tree, leaves)

  return jax.jit(make)(jax.random.key(seed, impl="unsafe_rbg"))


def cache_indices(cache) -> list[int]:
  import jax
  return [int(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]
          if _leaf_name(path) == "index"]


def cache_bytes_per_sequence(graphdef, state, batch: int, prompt_len: int) -> float:
  """Bytes per sequence of the leaves with a batch axis in init_cache(batch, prompt_len)."""
  import jax
  import numpy as np

  shapes = cache_shapes(graphdef, state, batch, prompt_len)
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(shapes)
             if x.ndim and x.shape[0] == batch) / batch


def decode_steps(graphdef, steps: int):
  """(state, (cache, token [B], position [B])) -> the carry after `steps` greedy decode steps."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  def run(state, carry):
    model = nnx.merge(graphdef, state)

    def step(carry, _):
      cache, token, position = carry
      logits, cache = model.decode(token[:, None], positions=position[:, None], cache=cache)
      return (cache, jnp.argmax(logits[:, -1], -1).astype(jnp.int32), position + 1), None

    return jax.lax.scan(step, carry, None, length=steps)[0]

  return run


def bench_one(args, mechanism: str, prompt_len: int, model) -> dict:
  import jax
  import jax.numpy as jnp

  from effattn.evaluate import timing

  graphdef, state = model
  b, steps = args.batch, args.steps
  capacity = prompt_len + steps * (args.reps + 1)
  t0 = time.perf_counter()
  cache = filled_cache(cache_shapes(graphdef, state, b, capacity), prompt_len)
  token = jax.random.randint(jax.random.key(1), (b,), 3, args.vocab_size, jnp.int32)
  carry = (cache, token, jnp.full((b,), prompt_len, jnp.int32))
  jax.block_until_ready(carry)
  fill_s = time.perf_counter() - t0
  compiled, kernel_names, compile_s = timing.compile_counted(
      decode_steps(graphdef, steps), state, carry, donate_argnums=(1,))
  footprint = timing.footprint_bytes(compiled)
  times, carry = timing.carried_ms(lambda c: compiled(state, c), carry, reps=args.reps)
  index = cache_indices(carry[0])
  del carry
  call_ms = statistics.median(times)
  return {"mechanism": mechanism, "prompt_len": prompt_len, "batch": b, "capacity": capacity,
          "ms_per_token": call_ms / steps, "tokens_per_sec": b * steps / call_ms * 1e3,
          "mean_ms_per_token": statistics.mean(times) / steps,
          "cache_mib_per_seq": cache_bytes_per_sequence(graphdef, state, b, prompt_len) / 2**20,
          "kernels": len(kernel_names), "kernel_names": kernel_names,
          "temp_mib": footprint["temp"] / 2**20 if footprint else None,
          "compile_s": compile_s, "fill_s": fill_s,
          "final_index": sorted(set(index)), "error": None}


def markdown(rows: list[dict], args, device: str) -> str:
  head = (f"Device: {device}. {bench_train.model_description(args)}. Batch {args.batch}; "
          f"one-token greedy decode after a prompt of P tokens (cache filled with random values "
          f"at its real shapes, index = P); median of {args.reps} calls of {args.steps} steps "
          f"in a lax.scan, carry donated.")
  lines = [head, "", "| mechanism | P | ms/token | tokens/s | vs mha | cache MiB/seq | kernels "
           "| temp MiB | compile (s) |", "|---|---|---|---|---|---|---|---|---|"]
  mha = {r["prompt_len"]: r["tokens_per_sec"] for r in rows
         if r["mechanism"] == "mha" and not r["error"]}
  for r in rows:
    if r["error"]:
      lines.append(f"| {r['mechanism']} | {r['prompt_len']} | failed: {r['error'][:120]} |"
                   + " |" * 6)
      continue
    ratio = (f"{r['tokens_per_sec'] / mha[r['prompt_len']]:.2f}x"
             if r["prompt_len"] in mha else "")
    temp = "" if r["temp_mib"] is None else f"{r['temp_mib']:.1f}"
    lines.append(f"| {r['mechanism']} | {r['prompt_len']} | {r['ms_per_token']:.3f} | "
                 f"{r['tokens_per_sec']:,.0f} | {ratio} | {r['cache_mib_per_seq']:.2f} | "
                 f"{r['kernels']} | {temp} | {r['compile_s']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  import jax

  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  mechanisms = mechanism_list(args.mechanisms)
  prompt_lens = [int(p) for p in args.prompt_lens.split(",")]
  print(f"{device}: mechanisms {mechanisms}, P {prompt_lens}, batch {args.batch}", flush=True)
  models = {}  # params built once per mechanism, reused across lengths
  start = time.perf_counter()

  def run_one(mechanism, prompt_len):
    if mechanism not in models:
      models[mechanism] = build_model(args, mechanism)
    return bench_one(args, mechanism, prompt_len, models[mechanism])

  def line(row):
    return (f"{row['tokens_per_sec']:>10,.0f} tok/s  {row['ms_per_token']:.3f} ms/token  "
            f"cache {row['cache_mib_per_seq']:.2f} MiB/seq  kernels {row['kernels']}  "
            f"temp {row['temp_mib'] or 0:.1f} MiB  compile {row['compile_s']:.1f}s  "
            f"fill {row['fill_s']:.1f}s")

  def save(rows):
    bench_train.write_results(args, "decode", device, rows, markdown(rows, args, device))

  rows = bench_train.run_grid(prompt_lens, mechanisms, run_one, length_key="prompt_len",
                              max_seconds=args.max_seconds, line=line, save=save)
  print(f"total {time.perf_counter() - start:.0f}s\n")
  print(markdown(rows, args, device))
  return rows


if __name__ == "__main__":
  main()
