"""memory_chunk: the reference against the literal equations, every path against the
reference, forward, final states and gradients (jax.vjp with random cotangents), and the deep
(MLP) memory against the linear one and its own recurrence."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels import dispatch
from effattn.kernels.memory_chunk import deep, memory_update, pallas_gpu, reference
from effattn.testing import assert_close, assert_trees_close, kernels
from effattn.testing.inputs import case_key


def make_inputs(name, b, t, h, dk, dv, *, dtype=jnp.float32, segments=False, states=True):
  keys = jax.random.split(case_key(name), 8)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(keys[0], (b, t, h, dk))).astype(dtype)
  k = unit(jax.random.normal(keys[1], (b, t, h, dk))).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, h, dv)).astype(dtype)
  gates = jax.random.normal(keys[3], (3, b, t, h))
  theta = 0.5 * jax.nn.sigmoid(gates[0])
  alpha = jax.nn.sigmoid(gates[1] - 2.0)
  eta = jax.nn.sigmoid(gates[2] + 1.0)
  w0 = 0.3 * jax.random.normal(keys[4], (b, h, dk, dv)) if states else None
  s0 = 0.3 * jax.random.normal(keys[5], (b, h, dk, dv)) if states else None
  seg = None
  if segments:
    ids = np.ones((b, t), np.int32)
    ids[0, t // 3:] = 2
    ids[0, (2 * t) // 3:] = 5
    seg = jnp.asarray(ids)
  return (q, k, v, theta, alpha, eta, w0, s0), seg


def test_recurrence_is_the_papers():
  """reference.recurrent against a numpy loop of Titans eqs. 9-14 (gradient by jax.grad)."""
  (q, k, v, theta, alpha, eta, w0, s0), _ = make_inputs("literal", 1, 6, 1, 4, 3)
  w, s = np.asarray(w0[0, 0]), np.asarray(s0[0, 0])
  want = []
  token_grad = jax.jit(jax.grad(lambda m, kt, vt: jnp.sum((kt @ m - vt) ** 2)))
  for t in range(6):
    kt, vt = k[0, t, 0], v[0, t, 0]
    grad = np.asarray(token_grad(jnp.asarray(w), kt, vt))
    s = float(eta[0, t, 0]) * s - float(theta[0, t, 0]) * grad
    w = (1 - float(alpha[0, t, 0])) * w + s
    want.append(np.asarray(q[0, t, 0]) @ w)
  y, (w_t, s_t) = jax.jit(reference.recurrent)(q, k, v, theta, alpha, eta, w0, s0)
  assert_close("y", np.stack(want), y[0, :, 0], reduction=6)
  assert_close("W_T", w, w_t[0, 0], reduction=6)
  assert_close("S_T", s, s_t[0, 0], reduction=6)


def test_chunk_of_one_is_the_recurrence_and_larger_chunks_are_minibatches():
  args, seg = make_inputs("b1", 2, 19, 2, 8, 8, segments=True)
  chunk_loop = jax.jit(reference.chunk_loop, static_argnames="chunk_size")
  y_rec, state_rec = jax.jit(reference.recurrent)(*args, seg)
  y_one, state_one = chunk_loop(*args, seg, chunk_size=1)
  assert_close("y", y_rec, y_one, reduction=19)
  assert_close("W_T", state_rec[0], state_one[0], reduction=19)
  assert_close("S_T", state_rec[1], state_one[1], reduction=19)
  y_four, _ = chunk_loop(*args, seg, chunk_size=4)
  # Tokens after the first of each chunk see gradients at stale weights: different numbers.
  assert float(jnp.abs(y_four[:, 1:4] - y_rec[:, 1:4]).max()) > 1e-3
  assert_close("first token", y_rec[:, :1], y_four[:, :1], reduction=19)


def test_segments_restart_the_memory():
  """A packed second segment equals the same tokens run alone from zero state."""
  args, _ = make_inputs("seg", 1, 24, 2, 8, 8, states=False)
  seg = jnp.asarray(np.repeat([[1, 2]], 12, axis=1))
  update = jax.jit(functools.partial(memory_update, chunk_size=4, impl="xla"))
  y, _ = update(*args[:6], segment_ids=seg)
  y2, _ = update(*(x[:, 12:] for x in args[:6]))
  assert_close("segment 2", y2, y[:, 12:], reduction=24)


CASES = [
    # name, (B, T, H, Dk, Dv), chunk, dtype, segments, states
    ("ragged-segments-states", (2, 37, 2, 16, 16), 8, jnp.float32, True, True),
    ("bf16-chunk16", (1, 40, 2, 16, 32), 16, jnp.bfloat16, False, True),
    ("shorter-than-a-chunk", (1, 5, 1, 16, 16), 16, jnp.float32, False, False),
]


@pytest.mark.parametrize("impl,interpret", [("xla", False), ("pallas_gpu", True),
                                            ("pallas_tpu", True)])
@pytest.mark.parametrize("name,dims,chunk,dtype,segments,states", CASES, ids=[c[0] for c in CASES])
def test_path_matches_reference(impl, interpret, name, dims, chunk, dtype, segments, states):
  _check_against_reference((name, dims, chunk, dtype, segments, states), impl, interpret)


def _check_against_reference(case, impl, interpret, **options):
  """memory_update on `impl` (with `options`) against the reference: y, the final states and
  every gradient for one random cotangent, in the case's dtype."""
  name, dims, chunk, dtype, segments, states = case
  (y_r, (w_r, s_r)), grads_r = _reference_case(*case)
  (y, (w, s)), grads = _outputs_and_grads(impl, interpret, *case, **options)
  assert y.dtype == dtype and w.dtype == s.dtype == jnp.float32
  for label, want, got in (("y", y_r, y), ("W_T", w_r, w), ("S_T", s_r, s)):
    assert_close(label, want, got, dtype=dtype, reduction=dims[1])
  names = ["dq", "dk", "dv", "dtheta", "dalpha", "deta", "dW0", "dS0"][:6 + 2 * states]
  assert len(grads) == len(grads_r) == len(names)
  for name_, g_r, g in zip(names, grads_r, grads):
    assert g.dtype == g_r.dtype, name_
    assert_close(name_, g_r, g, dtype=dtype, reduction=dims[1])


@functools.lru_cache(maxsize=None)
def _reference_case(name, dims, chunk, dtype, segments, states):
  """The reference's outputs and gradients, computed once per case."""
  return _outputs_and_grads("reference", False, name, dims, chunk, dtype, segments, states)


def _cotangents(dims, dtype):
  """Random cotangents of (y, (W_T, S_T)) for a case's dims."""
  b, t, h, dk, dv = dims
  keys = jax.random.split(jax.random.key(11), 3)
  return (jax.random.normal(keys[0], (b, t, h, dv)).astype(dtype),
          (jax.random.normal(keys[1], (b, h, dk, dv)), jax.random.normal(keys[2], (b, h, dk, dv))))


def test_value_blocks_split_the_columns_exactly():
  """BlockSizes.block_v: the Triton kernel over Dv / block_v programs per (row, head), its
  forward and every gradient (the column sums of dq, dk and the gates) against the reference."""
  _check_against_reference(("ragged-segments-states", (2, 37, 2, 16, 64), 8, jnp.float32, True,
                            True), "pallas_gpu", True,
                           block_sizes=pallas_gpu.BlockSizes(block_v=16))
  with pytest.raises(ValueError, match="block_v=24 must be a power of two >= 16"):
    pallas_gpu.BlockSizes(block_v=24)
  with pytest.raises(ValueError, match="block_v=128 must divide Dv=64"):
    pallas_gpu.BlockSizes(block_v=128).value_blocks(64)
  chosen = pallas_gpu.BlockSizes(block_v=0).value_blocks  # halved until 64 programs
  assert (chosen(128, 16), chosen(128, 64), chosen(128, 256), chosen(64, 2)) == (4, 1, 1, 4)


def test_value_blocks_lower_for_cuda():
  """The split kernels lower to Triton at the bench shape (D 128, block_v 32: 4 programs per
  row and head), the backward with one share of dq per value block."""
  x = jax.ShapeDtypeStruct((1, 64, 2, 128), jnp.bfloat16)
  gate = jax.ShapeDtypeStruct((1, 64, 2), jnp.float32)

  def loss(q, k, v, theta):
    y, (w, _) = memory_update(q, k, v, theta, theta, theta, chunk_size=16, impl="pallas_gpu",
                              block_sizes=pallas_gpu.BlockSizes(block_v=32))
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(w)

  with dispatch.lower_for("gpu"):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(x, x, x, gate).lower(
        lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
  assert len(calls) == 2  # forward and backward
  assert "tensor<4x1x64x2x128xf32>" in calls[1]  # dq's four shares


# (case, block_v, forward, backward): the split backward with each forward over every case;
# the hoisted loops together (block_v None: f32, segments, ragged T, initial states; 16: bf16,
# two value blocks of D 32) and each alone beside the fused other.
LOOP_FORMS = ([(case, block_v, forward, "split") for case in CASES
               for block_v, forward in ((None, "split"), (16, "fused"), (16, "split"))]
              + [(CASES[0], None, "hoisted", "hoisted"), (CASES[1], 16, "hoisted", "hoisted"),
                 (CASES[1], 16, "hoisted", "fused"), (CASES[1], 16, "fused", "hoisted")])


@pytest.mark.parametrize("case,block_v,forward,backward", LOOP_FORMS,
                         ids=[f"{c[0]}-{bv}-{f}-{b}" for c, bv, f, b in LOOP_FORMS])
def test_split_loops_match_reference(case, block_v, forward, backward):
  """BlockSizes.backward="split" (the chunk loop carries only the state cotangents, then
  every chunk's gradients come at once), forward="split" (the loop makes only the states,
  then y of every chunk at once) and "hoisted" ("split" with the loops' state-independent
  terms computed for all chunks first): forward, final states and every gradient against the
  reference (segments, ragged T, initial states, value blocks)."""
  _check_against_reference(case, "pallas_gpu", True, block_sizes=pallas_gpu.BlockSizes(
      block_v=block_v, forward=forward, backward=backward))


@pytest.mark.parametrize("loops", ["split", "hoisted"])
def test_split_loops_lower_for_cuda(loops):
  """The split and hoisted loops lower at the bench shape: the state loop and the cotangent
  loop are Triton kernels (y and the per-token gradients are XLA), value blocks of 32."""
  x = jax.ShapeDtypeStruct((1, 64, 2, 128), jnp.bfloat16)
  gate = jax.ShapeDtypeStruct((1, 64, 2), jnp.float32)

  def loss(q, k, v, theta):
    y, (w, _) = memory_update(q, k, v, theta, theta, theta, chunk_size=16, impl="pallas_gpu",
                              block_sizes=pallas_gpu.BlockSizes(block_v=32, forward=loops,
                                                                backward=loops))
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(w)

  with dispatch.lower_for("gpu"):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(x, x, x, gate).lower(
        lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
  suffix = "_hoisted" if loops == "hoisted" else ""
  assert len(calls) == 2
  assert f"memory_chunk_dstate{suffix}" in text and f"memory_chunk_states{suffix}" in text
  assert ("_hoisted" in text) == (loops == "hoisted")
  for field in ("forward", "backward"):
    with pytest.raises(ValueError, match=f"{field}='loop' must be one of"):
      pallas_gpu.BlockSizes(**{field: "loop"})


@pytest.mark.parametrize("loops", ["split", "hoisted"])
def test_split_forward_applies_under_differentiation_only(loops):
  """forward="split" (and "hoisted") is the training forward's form (it saves the states a
  backward reads); a forward alone runs the fused loop, the faster one without a backward."""
  x = jax.ShapeDtypeStruct((1, 64, 2, 128), jnp.bfloat16)
  gate = jax.ShapeDtypeStruct((1, 64, 2), jnp.float32)
  sizes = pallas_gpu.BlockSizes(block_v=32, forward=loops, backward=loops)

  def outputs(q, k, v, theta):
    return memory_update(q, k, v, theta, theta, theta, chunk_size=16, impl="pallas_gpu",
                         block_sizes=sizes)[0]

  with dispatch.lower_for("gpu"):
    text = jax.jit(outputs).trace(x, x, x, gate).lower(lowering_platforms=("cuda",)).as_text()
  assert "memory_chunk_fwd" in text and "memory_chunk_states" not in text


@pytest.mark.parametrize("impl,interpret", [("xla", False), ("pallas_gpu", True)])
def test_rematerialized_pieces_equal_one_call(impl, interpret):
  """remat_chunks=2 over 5 chunks (pieces of 2, 2 and 1): outputs, final states and every
  gradient as one call, with segments, initial states and a ragged T."""
  case = ("ragged-segments-states", (2, 37, 2, 16, 16), 8, jnp.float32, True, True)
  _check_against_reference(case, impl, interpret, remat_chunks=2)
  with pytest.raises(ValueError, match="remat_chunks=0 must be a whole number >= 1"):
    _outputs_and_grads(impl, interpret, *case, remat_chunks=0)


def test_rematerialized_pieces_keep_fewer_states():
  """The compiled backward of 64 chunks holds far less with the chunk states kept for 8 chunks
  at a time than for all 64 (the residual the option exists to cut)."""
  x = jax.ShapeDtypeStruct((1, 1024, 2, 32), jnp.float32)
  gate = jax.ShapeDtypeStruct((1, 1024, 2), jnp.float32)

  def temp_bytes(remat_chunks):
    def loss(q, k, v, theta):
      y, _ = memory_update(q, k, v, theta, theta, theta, chunk_size=16, impl="xla",
                           remat_chunks=remat_chunks)
      return jnp.sum(y)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, x, x, gate).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  states = 64 * 2 * 2 * 32 * 32 * 4  # 64 chunk starts of (W, S), 2 heads, f32: 1 MiB
  plain, pieces = temp_bytes(None), temp_bytes(8)
  assert plain - pieces > states / 2, (plain, pieces)


def _outputs_and_grads(path, interpret, name, dims, chunk, dtype, segments, states,
                       block_sizes=None, remat_chunks=None):
  """memory_update on `path`: its outputs and the vjp of the case's random cotangents with
  respect to every given input (None: no grad), in one compiled program."""
  args, seg = make_inputs(name, *dims, dtype=dtype, segments=segments, states=states)
  diff = [i for i, a in enumerate(args) if a is not None]

  def f(*xs):
    full = list(args)
    for i, x in zip(diff, xs):
      full[i] = x
    q, k, v, theta, alpha, eta, w0, s0 = full
    return memory_update(q, k, v, theta, alpha, eta, initial_memory=w0, initial_momentum=s0,
                         segment_ids=seg, chunk_size=chunk, impl=path, interpret=interpret,
                         block_sizes=block_sizes, remat_chunks=remat_chunks)

  @jax.jit
  def run(xs, cts):
    out, vjp = jax.vjp(f, *xs)
    return out, vjp(cts)
  return run(tuple(args[i] for i in diff), _cotangents(dims, dtype))


def test_state_carries_across_calls():
  """Two calls chained through (W, S) equal one call, when cut at a chunk boundary."""
  args, _ = make_inputs("carry", 1, 30, 2, 16, 16)
  q, k, v, theta, alpha, eta, w0, s0 = args
  update = jax.jit(functools.partial(memory_update, chunk_size=8, impl="xla"))
  run = lambda sl, w, s: update(*(x[:, sl] for x in (q, k, v, theta, alpha, eta)),  # noqa: E731
                                initial_memory=w, initial_momentum=s)
  y, (w_t, s_t) = run(slice(None), w0, s0)
  y1, (w1, s1) = run(slice(0, 16), w0, s0)
  y2, (w2, s2) = run(slice(16, None), w1, s1)
  assert_close("y", y, jnp.concatenate([y1, y2], 1), reduction=30)
  assert_close("W_T", w_t, w2, reduction=30)
  assert_close("S_T", s_t, s2, reduction=30)


@pytest.mark.parametrize("impl,names", [("pallas_gpu", ("memory_chunk_fwd", "memory_chunk_bwd")),
                                        ("pallas_tpu", ("memory_chunk_tpu_fwd",
                                                        "memory_chunk_tpu_bwd"))])
def test_kernel_really_runs(impl, names):
  args, _ = make_inputs("ran", 1, 16, 1, 16, 16)

  def loss(q):
    y, (w, _) = memory_update(q, *args[1:6], initial_memory=args[6], chunk_size=16, impl=impl,
                              interpret=True)
    return jnp.sum(y * y) + jnp.sum(w)

  kernels.assert_kernels_ran(names, jax.grad(loss), args[0])


def test_arguments_are_checked():
  args, _ = make_inputs("check", 1, 8, 1, 16, 16)
  with pytest.raises(ValueError, match="theta must be"):
    memory_update(*args[:3], args[3][..., None], *args[4:6])
  with pytest.raises(ValueError, match="impl="):
    memory_update(*args[:6], impl="cuda")
  with pytest.raises(ValueError, match="initial_memory must be"):
    memory_update(*args[:6], initial_memory=args[6][0])
  with pytest.raises(ValueError, match="chunk_size"):
    memory_update(*args[:6], chunk_size=0)


# -- the deep (MLP) memory: one layer equals the linear kernel; chunk 1 equals the recurrence --


def test_one_layer_is_the_linear_memory():
  args, seg = make_inputs("deep1", 2, 21, 2, 8, 8, segments=True)
  q, k, v, theta, alpha, eta, w0, s0 = args
  y, (w, s) = jax.jit(functools.partial(memory_update, chunk_size=4, impl="xla"))(
      q, k, v, theta, alpha, eta, initial_memory=w0, initial_momentum=s0, segment_ids=seg)
  # The linear kernel restarts new segments (here inside chunks) at zero.
  y_d, ((w_d,), (s_d,)) = jax.jit(functools.partial(deep.chunked, chunk_size=4))(
      (w0,), (s0,), q, k, v, theta, alpha, eta, seg, reset_to=(jnp.zeros_like(w0),))
  assert_close("y", y, y_d, reduction=21)
  assert_close("W_T", w, w_d, reduction=21)
  assert_close("S_T", s, s_d, reduction=21)


def test_two_layers_chunk_of_one_is_the_recurrence():
  args, seg = make_inputs("deep2", 1, 13, 2, 8, 8, segments=True, states=False)
  q, k, v, theta, alpha, eta, _, _ = args
  theta = 0.1 * theta  # a deep memory needs a smaller step than the unit-key linear one
  keys = jax.random.split(jax.random.key(4), 2)
  p0 = (0.3 * jax.random.normal(keys[0], (1, 2, 8, 16)),
        0.3 * jax.random.normal(keys[1], (1, 2, 16, 8)))
  m0 = jax.tree.map(lambda x: 0.1 * x, p0)

  def run(fn):
    @jax.jit  # a compiled forward and a compiled backward
    def f(p0, k, theta):
      y, state = fn(p0, m0, q, k, v, theta, alpha, eta, seg)
      return y, state
    return jax.vjp(f, p0, k, theta)

  (y_r, st_r), vjp_r = run(deep.recurrent)
  (y_c, st_c), vjp_c = run(lambda *a: deep.chunked(*a, chunk_size=1))
  assert_close("y", y_r, y_c, reduction=13)
  assert_trees_close("state", st_r, st_c, reduction=13)
  ct = jax.tree.map(lambda x: jax.random.normal(jax.random.key(9), x.shape), (y_r, st_r))
  assert_trees_close("grad", vjp_r(ct), vjp_c(ct), reduction=13)
  y4, _ = jax.jit(functools.partial(deep.chunked, chunk_size=4))(p0, m0, q, k, v, theta, alpha,
                                                                  eta, seg)
  assert not np.allclose(np.asarray(y4), np.asarray(y_r), atol=1e-4)


def test_new_segments_restart_from_the_initial_weights():
  """Chunked with resets to p_init (and chunk 1 = recurrence) for a 2-layer memory."""
  args, seg = make_inputs("deep-reset", 1, 14, 1, 8, 8, segments=True, states=False)
  q, k, v, theta, alpha, eta, _, _ = args
  theta = 0.1 * theta
  keys = jax.random.split(jax.random.key(5), 4)
  p_init = (0.3 * jax.random.normal(keys[0], (1, 1, 8, 16)),
            0.3 * jax.random.normal(keys[1], (1, 1, 16, 8)))
  p0 = jax.tree.map(lambda x, kk: x + 0.2 * jax.random.normal(kk, x.shape), p_init,
                    (keys[2], keys[3]))  # a carried state that differs from the initial one
  m0 = jax.tree.map(jnp.zeros_like, p0)
  chunked = jax.jit(deep.chunked, static_argnames="chunk_size")
  y_r, st_r = jax.jit(deep.recurrent)(p0, m0, q, k, v, theta, alpha, eta, seg, reset_to=p_init)
  y_c, st_c = chunked(p0, m0, q, k, v, theta, alpha, eta, seg, reset_to=p_init, chunk_size=1)
  assert_close("y chunk 1", y_r, y_c, reduction=14)
  # Chunk 3: segments start at 4 (inside a chunk) and 9 (a chunk start); the last segment
  # equals itself run alone from p_init.
  y3, _ = chunked(p0, m0, q, k, v, theta, alpha, eta, seg, reset_to=p_init, chunk_size=3)
  cut = int(np.argmax(np.asarray(seg[0]) == 5))
  assert cut % 3 == 0
  y_alone, _ = chunked(p_init, m0, *(x[:, cut:] for x in (q, k, v, theta, alpha, eta)),
                       chunk_size=3)
  assert_close("last segment alone", y_alone, y3[:, cut:], reduction=14)
