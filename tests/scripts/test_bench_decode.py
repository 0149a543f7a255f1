"""scripts/bench_decode.py on CPU: its filled cache is a real cache, and a --smoke run reports."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from effattn import attention
from effattn.testing.scripts import load_script


@pytest.fixture(scope="module")
def bench():
  return load_script("bench_decode")


@pytest.mark.parametrize("mechanism", ["mha", "swa", "neural_memory:window=8",
                                       *(n for n in attention.names() if n != "softmax")])
def test_filled_cache_has_the_structure_of_a_real_prefill(bench, mechanism):
  args = bench.parse_args(["--smoke", "--num_layers=1", "--window=8"])
  graphdef, state = bench.build_model(args, mechanism)
  b, p, capacity = 2, 16, 24
  shapes = bench.cache_shapes(graphdef, state, b, capacity)
  filled = bench.filled_cache(shapes, p)

  def prefill(state, tokens):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    return model.decode(tokens, positions=positions, cache=model.init_cache(b, capacity))[1]

  real = jax.eval_shape(prefill, state, jnp.zeros((b, p), jnp.int32))
  assert jax.tree.structure(real) == jax.tree.structure(filled)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), real) == jax.tree.map(
      lambda x: (x.shape, x.dtype), filled)
  has_index = bool(bench.cache_indices(filled))
  assert bench.cache_indices(filled) == [p] * len(bench.cache_indices(filled))
  o1_states = ("linear", "lightning", "mala", "gated_deltanet")  # O(1) states only
  assert has_index == (mechanism not in o1_states)
  # The integer leaves other than `index` start at 0 in init_cache, as filled_cache keeps them.
  init = nnx.merge(graphdef, state).init_cache(b, capacity)
  for path, leaf in jax.tree_util.tree_flatten_with_path(init)[0]:
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      assert int(jnp.abs(leaf).max()) == 0, path


@pytest.mark.parametrize("mechanism", ["swa", "neural_memory:window=8"])
def test_a_window_caches_its_window_whatever_the_prompt(bench, mechanism):
  """A sliding window's cache is a ring of W slots: the reported bytes do not grow with P."""
  args = bench.parse_args(["--smoke", "--num_layers=1", "--window=8"])
  graphdef, state = bench.build_model(args, mechanism)
  sizes = [bench.cache_bytes_per_sequence(graphdef, state, 2, p) for p in (16, 4096)]
  assert sizes[0] == sizes[1]
  if mechanism == "swa":  # k and v: 8 slots, 4 heads of 16, float32
    assert sizes[0] == 2 * 8 * 4 * 16 * 4


def test_smoke_run_reports_every_row(bench, tmp_path):
  rows = bench.main(["--smoke", "--mechanisms=mha,linear", "--prompt_lens=16,32",
                     "--num_layers=1", f"--out={tmp_path}"])
  assert [(r["mechanism"], r["prompt_len"]) for r in rows] == [
      (m, p) for p in (16, 32) for m in ("mha", "linear")]
  for r in rows:
    assert r["error"] is None and r["tokens_per_sec"] > 0 and r["kernels"] == 0
    steps = bench.SMOKE["steps"] * (bench.SMOKE["reps"] + 1)
    assert r["capacity"] == r["prompt_len"] + steps
    # The timed calls advanced the cache: index = prompt + every decoded token.
    assert r["final_index"] == ([] if r["mechanism"] == "linear" else [r["capacity"]])
  by = {(r["mechanism"], r["prompt_len"]): r["cache_mib_per_seq"] for r in rows}
  # Softmax: k and v, 1 layer, P slots, 4 heads of 16, float32. Linear: O(1) in P.
  assert by[("mha", 32)] * 2**20 == 2 * 32 * 4 * 16 * 4
  assert by[("linear", 16)] == by[("linear", 32)] < by[("mha", 16)]
  table = (tmp_path / "decode.md").read_text()
  assert "| mha | 32 |" in table and "1.00x" in table
