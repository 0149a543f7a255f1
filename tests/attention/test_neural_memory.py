"""neural_memory (Titans): the common oracles for the variants besides the default MAG (MAC, MAL,
the memory alone, a deep memory), memory carried across calls, the window's ring cache, chunk 1 is
the paper's recurrence, MAC's segment loop, and config checks. The default's common oracles are in
test_mechanisms.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effattn.attention import registry
from effattn.kernels import dispatch
from effattn.kernels.memory_chunk import reference
from effattn.testing import assert_close, assert_trees_close, oracles
from effattn.testing.inputs import random_inputs
from effattn.testing.kernels import assert_kernels_ran
from effattn.testing.mechanisms import Jitted, params_and_rest
from effattn.testing.mechanisms import build as build_mechanism

SMALL = dict(chunk_size=4, segment_len=8, num_persistent=2, conv_size=3)


def build(variant, depth=1, impl="xla", **opts):
  window = 5 if variant in ("mag", "mal") else None  # MAC and the memory alone have no window
  return build_mechanism("neural_memory", d_model=16, num_heads=2, window=window, impl=impl,
                       neural_memory=dict(SMALL, variant=variant, depth=depth, **opts))


@pytest.mark.parametrize("variant,depth,opts", [("mac", 1, {}), ("mac", 1, {"store_norm": False}),
                                                ("mal", 1, {}), ("lmm", 1, {}), ("mag", 2, {})])
def test_decode_matches_forward_and_is_causal(variant, depth, opts):
  module = build(variant, depth, **opts)
  x, pos = random_inputs(2, 13, d_model=16)
  y, aux = Jitted(module)(x, positions=pos)  # the compiled forward the oracles below reuse
  assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
  assert 0.0 < float(aux["memory_lr"]) < module.opts.max_lr
  oracles.check_decode_matches_forward(Jitted(module), x, pos, prompt_len=6)
  oracles.check_causality(Jitted(module), x, pos, t=6, exact=False)


def test_memory_carries_across_calls():
  """Two decode calls (cut inside a chunk) equal one forward pass on the concatenation."""
  module = Jitted(build("mag"))
  x, pos = random_inputs(1, 14, d_model=16, seed=3)
  y, _ = module(x, positions=pos)
  cache = module.init_cache(1, 14)
  y1, cache = module.decode(x[:, :6], positions=pos[:, :6], cache=cache)
  y2, cache = module.decode(x[:, 6:], positions=pos[:, 6:], cache=cache)
  assert_close("y", y, jnp.concatenate([y1, y2], 1), reduction=14)
  assert int(cache["memory"]["fill"]) == 14 % SMALL["chunk_size"]


@pytest.mark.parametrize("variant", ["mag", "mal"])
def test_windowed_decode_keeps_a_ring_of_window_slots(variant):
  """MAG's and MAL's window (5): the attention cache is a ring of 5 slots whatever max_len,
  and decoding a prompt longer than the window (not a multiple of it), then token by token
  around the ring, equals the forward pass. (Decode scans a prompt token by token: the ring's
  chunk path is softmax's, test_softmax.py.)"""
  module = build(variant)
  x, pos = random_inputs(2, 13, d_model=16, seed=4)
  cache = oracles.check_decode_in_chunks(Jitted(module), x, pos, (7,), max_len=500)
  assert cache["k"].shape[1] == 5 and int(cache["index"]) == 13
  shapes = lambda n: jax.tree.map(jnp.shape, module.init_cache(2, n))  # noqa: E731
  assert shapes(3) == shapes(4096)
  with pytest.raises(ValueError, match="window=5 keeps a ring of 5 cache slots, this cache has 9"):
    module.decode(x[:, :2], positions=pos[:, :2],
                  cache=dict(cache, k=jnp.zeros((2, 9, 2, 8)), v=jnp.zeros((2, 9, 2, 8))))


def _decode_step_temp_bytes(module, capacity, batch=2):
  """Compiled temporaries of one jitted one-token decode step (cache donated) at `capacity`,
  and the bytes of the cache's attention keys and values."""
  from flax import nnx
  graphdef, state = nnx.split(module)
  cache = jax.eval_shape(lambda: module.init_cache(batch, capacity, jnp.float32))
  x = jax.ShapeDtypeStruct((batch, 1, module.d_model), jnp.float32)
  pos = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  step = jax.jit(lambda s, c, x, p: nnx.merge(graphdef, s).decode(x, positions=p, cache=c),
                 donate_argnums=(1,))
  compiled = step.lower(state, cache, x, pos).compile()
  kv_bytes = sum(cache[name].size * cache[name].dtype.itemsize for name in ("k", "v"))
  return compiled.memory_analysis().temp_size_in_bytes, kv_bytes


@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_full_cache_decode_step_temporaries_do_not_grow_like_the_cache(num_kv_heads):
  """MAG without a window attends to every cached token: going from 2k to 32k tokens of cache,
  one decode step's temporaries grow by far less than the cache (a transposed or f32 copy of
  the cache, or an update that is not in place, would grow by at least as much), with its
  heads sharing key/value heads or not. What may grow: the f32 scores, [B, S, H] each, 1/D of
  the keys' f32 bytes (head dim 64 here)."""
  module = build_mechanism("neural_memory", d_model=128, num_heads=2, window=None, impl="xla",
                           num_kv_heads=num_kv_heads, neural_memory=dict(SMALL, variant="mag"))
  temp_small, kv_small = _decode_step_temp_bytes(module, 2048)
  temp_large, kv_large = _decode_step_temp_bytes(module, 32768)
  assert temp_large - temp_small < 0.05 * (kv_large - kv_small), (
      temp_small, temp_large, kv_small, kv_large)


def test_chunk_of_one_is_the_papers_recurrence():
  """The memory layer with chunk_size=1 retrieves exactly what the token recurrence does."""
  module = build("lmm", chunk_size=1)
  x, _ = random_inputs(1, 9, d_model=16)
  q, k, v, gates, _ = module.memory.streams(x, None)
  r, _ = module.memory.update(q, k, v, gates, None, module.memory.initial_state(1))
  r_ref, _ = reference.recurrent(q, k, v, *gates)
  assert_close("retrieval", r_ref, r, reduction=9)


@pytest.mark.parametrize("variant,depth", [("mac", 1), ("mal", 2)])
def test_packed_segments_are_isolated(variant, depth):
  # Segments start at 0 and 8: chunk (4) and MAC segment (8) boundaries, where packing is exact.
  module = build(variant, depth)
  x, _ = random_inputs(1, 16, d_model=16, seed=2)
  oracles.check_segments_isolated(Jitted(module), x)


def test_gradients_reach_every_parameter():
  module = build("mac", depth=2)
  x, pos = random_inputs(1, 12, d_model=16)
  oracles.check_gradients_finite(module, x, pos)


def test_mac_gradients_do_not_grow_with_the_number_of_segments():
  """Each MAC segment reads the memory the previous one wrote; a retrieval that is rescaled
  (e.g. normalized while near zero) multiplies the gradient at every segment boundary."""
  from flax import nnx

  def grad_norm(num_segments):
    module = build("mac")
    x, pos = random_inputs(2, SMALL["segment_len"] * num_segments, d_model=16, seed=1)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def last_token_energy(p):
      return jnp.sum(nnx.merge(graphdef, p, rest)(x, positions=pos)[0][:, -1] ** 2)

    grads = jax.jit(jax.grad(last_token_energy))(params)
    return float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))

  one, four = grad_norm(1), grad_norm(4)
  assert four < 1.6 * one, (one, four)


def test_mac_store_norm_cuts_the_segment_loop():
  """MAC writes the memory with the attention output and attends to the memory's retrieval in
  the next segment. With raw y (the paper) a gain in the attention's value and output
  projections compounds through that loop; with store_norm it must not reach the memory."""

  def memory_scale(gain, store_norm):
    module = build("mac", store_norm=store_norm)
    for proj in (module.v_proj, module.o_proj):
      proj.kernel.value = proj.kernel.value * gain
    x, pos = random_inputs(2, SMALL["segment_len"] * 10, d_model=16, seed=1)
    _, cache = Jitted(module).decode(x, positions=pos, cache=module.init_cache(2, x.shape[1]))
    return float(jnp.sqrt(jnp.mean(cache["memory"]["weights"][0] ** 2)))

  base_scale, amplified = memory_scale(1.0, True), memory_scale(12.0, True)
  assert amplified < 2.0 * base_scale, (base_scale, amplified)
  raw_base, raw_amplified = memory_scale(1.0, False), memory_scale(12.0, False)
  assert raw_amplified > 100 * raw_base, (raw_base, raw_amplified)  # the loop the norm cuts


def test_registered_and_checked():
  assert "neural_memory" in registry.names()
  with pytest.raises(ValueError, match="variant"):
    build("mat")
  with pytest.raises(ValueError, match="segment_len"):
    build("mac", segment_len=6)
  with pytest.raises(ValueError, match="depth"):
    build("mag", depth=0)
  with pytest.raises(ValueError, match="memory_block_v=24 must be a power of two >= 16"):
    build("lmm", memory_block_v=24)
  with pytest.raises(ValueError, match="memory_remat_chunks applies to the linear memory"):
    build("mag", depth=2, memory_remat_chunks=4)
  with pytest.raises(ValueError, match="memory_backward='loop' must be one of"):
    build("mag", memory_backward="loop")
  with pytest.raises(ValueError, match="memory_forward applies to the linear memory.*'auto'"):
    build("mag", depth=2, memory_forward="split")


def test_memory_launch_defaults():
  """None: the value split chosen from the grid and pieces of 64 chunks (measured faster and
  smaller, docs/benchmarks.md); 0 keeps every chunk state; the deep memory gets neither."""
  launch = registry.get("neural_memory").memory_launch
  assert launch(build("mag").opts) == {"block_v": 0, "forward": "split", "backward": "split",
                                       "remat_chunks": 64}
  assert launch(build("mag", memory_backward="fused").opts)["backward"] == "fused"
  assert launch(build("mag", memory_forward="fused").opts)["forward"] == "fused"
  assert launch(build("mag", memory_remat_chunks=0).opts)["remat_chunks"] is None
  assert launch(build("mag", memory_remat_chunks=3).opts)["remat_chunks"] == 3
  assert launch(build("mag", depth=2).opts) == {"block_v": None, "forward": None,
                                                "backward": None, "remat_chunks": None}


def _output_and_grads(module, x, pos, seg):
  """The layer's output and the gradients of sum(sin(output)) by its parameters (jitted)."""
  graphdef, params, rest = params_and_rest(module)

  def loss(p):
    y, _ = nnx.merge(graphdef, p, rest)(x, positions=pos, segment_ids=seg)
    return jnp.sum(jnp.sin(y)), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return y, grads


def test_memory_remat_chunks_changes_nothing():
  """MAG with its memory in rematerialized pieces of 2 chunks (of 4 tokens, T = 21): the same
  output and parameter gradients, with packed segments."""
  x, pos = random_inputs(2, 21, d_model=16, seed=6)
  seg = jnp.asarray(np.repeat([[1, 2, 2], [3, 3, 3]], 7, axis=1), jnp.int32)
  (y, g), (y_r, g_r) = (_output_and_grads(build("mag", memory_remat_chunks=r), x, pos, seg)
                        for r in (0, 2))  # 0: every chunk state kept
  assert_close("y", y, y_r, reduction=21)
  assert_trees_close("grads", g, g_r, reduction=21)


def test_memory_launch_options_reach_the_kernel_and_change_nothing():
  """The layer on the memory's Triton kernel (interpreted) with its value columns in two
  programs per row and head, and with both loops split or hoisted, gives the one-program fused
  layer's output and gradients."""
  x, pos = random_inputs(2, 40, d_model=64, seed=5)
  results = []
  # head_dim 32: block_v 32 is one program per row and head.
  for block_v, loops in ((32, "fused"), (16, "fused"), (16, "split"), (16, "hoisted")):
    module = build_mechanism("neural_memory", d_model=64, num_heads=2, impl="auto",
                             neural_memory=dict(variant="lmm", chunk_size=16,
                                                memory_block_v=block_v, memory_forward=loops,
                                                memory_backward=loops))
    graphdef, params, rest = params_and_rest(module)

    def loss(p, x):
      y, _ = nnx.merge(graphdef, p, rest)(x, positions=pos)
      return jnp.sum(jnp.sin(y)), y

    grads_of = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    # Each context gets its own function: jit caches a trace by function, paths included.
    with dispatch.lower_for("gpu"):  # the option reaches the kernel: dq in 2 shares, or whole
      text = jax.jit(lambda *a: grads_of(*a)).trace(params, x).lower(
          lowering_platforms=("cuda",)).as_text()
    assert ("tensor<2x2x48x2x32xf32>" in text) == (block_v == 16 and loops == "fused")
    step = jax.jit(grads_of)
    with dispatch.interpret_kernels("gpu"):
      names = {"fused": {"memory_chunk_fwd", "memory_chunk_bwd"},
               "split": {"memory_chunk_states", "memory_chunk_dstate"},
               "hoisted": {"memory_chunk_states_hoisted", "memory_chunk_dstate_hoisted"}}[loops]
      assert_kernels_ran(names, step, params, x)
      (_, y), grads = step(params, x)
    results.append((y, grads))
  (y, g), *others = results
  for y_other, g_other in others:
    assert_close("y", y, y_other, reduction=40)
    assert_trees_close("grads", g, g_other, reduction=40)


@pytest.mark.parametrize("variant,window", [("mag", 5), ("mal", None)])
def test_fused_attention_branch_equals_the_dense_mask(variant, window):
  """swa_impl fused (no [T, T] mask) and dense (the oracle) give one output and one gradient,
  with packed segments and padding."""
  x, pos = random_inputs(2, 14, d_model=16, seed=4)
  seg = jnp.asarray(np.repeat([[1, 2], [3, 0]], 7, axis=1), jnp.int32)
  (y, g), (y_d, g_d) = (_output_and_grads(build_mechanism(
      "neural_memory", d_model=16, num_heads=2, window=window, impl="xla",
      neural_memory=dict(SMALL, variant=variant, swa_impl=swa_impl)), x, pos, seg)
      for swa_impl in ("fused", "dense"))
  assert_close("y", y_d, y, reduction=14)
  assert_trees_close("grads", g_d, g, reduction=14)


def test_bad_swa_impl_named():
  x, pos = random_inputs(1, 8, d_model=16)
  with pytest.raises(ValueError, match="swa_impl"):
    build("mag", swa_impl="flash")(x, positions=pos)


def _recurrence(q, k, v, theta, alpha, eta, *, chunk, momentum, weight_decay):
  """The linear memory's recurrence written without the switched-off terms (numpy, one row):
  gradients at each chunk's starting weights; no S at all without momentum, no (1 - alpha)
  without weight decay. Returns y [T, H, D]."""
  q, k, v, theta, alpha, eta = (np.asarray(a, np.float64)[0] for a in (q, k, v, theta, alpha, eta))
  t, h, d = q.shape
  y = np.zeros((t, h, d))
  for n in range(h):
    w, s = np.zeros((d, d)), np.zeros((d, d))
    for start in range(0, t, chunk):
      w_ref = w.copy()
      for i in range(start, min(start + chunk, t)):
        grad = 2.0 * np.outer(k[i, n], k[i, n] @ w_ref - v[i, n])
        if momentum:
          s = eta[i, n] * s - theta[i, n] * grad
          step = s
        else:
          step = -theta[i, n] * grad
        w = ((1.0 - alpha[i, n]) * w if weight_decay else w) + step
        y[i, n] = q[i, n] @ w
  return y


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("momentum,weight_decay", [(False, True), (True, False), (False, False)])
def test_ablations_equal_the_recurrence_without_them(chunk, momentum, weight_decay):
  """momentum=False / weight_decay=False (the paper's ablations) zero eta / alpha: the memory
  then retrieves what the recurrence without momentum / forgetting gives, on the chunked xla
  path (whose closed form takes log-gates, clamped at eta = 0)."""
  full = build("lmm", chunk_size=chunk)
  ablated = build("lmm", chunk_size=chunk, momentum=momentum, weight_decay=weight_decay)
  x, _ = random_inputs(1, 10, d_model=16, seed=4)
  q, k, v, gates, _ = full.memory.streams(x, None)  # same parameters: the same seed
  q2, k2, v2, (theta, alpha, eta), _ = ablated.memory.streams(x, None)
  assert_close("theta", gates[0], theta)
  assert momentum or float(jnp.abs(eta).max()) == 0.0
  assert weight_decay or float(jnp.abs(alpha).max()) == 0.0
  r, _ = ablated.memory.update(q2, k2, v2, (theta, alpha, eta), None,
                               ablated.memory.initial_state(1))
  want = _recurrence(q, k, v, *gates, chunk=chunk, momentum=momentum, weight_decay=weight_decay)
  assert_close("retrieval", want, r[0], reduction=10)
  assert not np.allclose(want, _recurrence(q, k, v, *gates, chunk=chunk, momentum=True,
                                           weight_decay=True), atol=1e-4)
