"""delta_rule: every path (the chunked WY/UT jnp path, the Triton and Mosaic TPU kernels in
interpret mode) equals reference.recurrent, forward, final state and gradients; the recurrence
against the paper's literal update, the closed form, the spec's oracles (b = 0 only decays;
a = b = 1 with orthonormal keys recalls exactly), the decode step, and the chunked path carried
across calls. Argument checks and lowering: test_delta_rule_api.py.

Gradients go through jax.vjp with random cotangents on o AND the final state (never `.sum()`),
for q, k, v, log_gate, beta and the initial state; the reference side is autodiff of the token
recurrence, computed once per case.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels.delta_rule import delta_rule, delta_rule_step, pallas_gpu, reference
from effattn.testing import assert_close

GRADS = ("o", "final_state", "dq", "dk", "dv", "dlog_gate", "dbeta", "ds0")


def packed(b, t):
  """Row 0: three runs and trailing padding (id 0); the others one sequence."""
  ids = np.ones((b, t), np.int32)
  ids[0, t // 4:] = 2
  ids[0, (2 * t) // 3:] = 3
  ids[0, t - 3:] = 0
  return jnp.asarray(ids)


def make_inputs(name, b, t, h, dk, dv, *, dtype, gate, segments, state):
  """Unit-norm q and k, gates around `gate` per token (log a_t <= 0), b_t in (0, 1).

  Drawn with numpy (eager jax.random compiles a program per shape: seconds per test on CPU).
  """
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = jnp.asarray(unit(normal(b, t, h, dk)), dtype)
  k = jnp.asarray(unit(normal(b, t, h, dk)), dtype)
  v = jnp.asarray(normal(b, t, h, dv), dtype)
  log_gate = jnp.asarray(gate * rng.uniform(0.2, 1.8, (b, t, h)), jnp.float32)
  beta = jnp.asarray(1 / (1 + np.exp(-normal(b, t, h))), jnp.float32)
  s0 = jnp.asarray(0.5 * normal(b, h, dk, dv)) if state else None
  seg = packed(b, t) if segments else None
  do = jnp.asarray(normal(b, t, h, dv), dtype)
  ds = jnp.asarray(normal(b, h, dk, dv))
  return (q, k, v, log_gate, beta, s0), seg, (do, ds)


def run_path(impl, interpret, chunk, args, seg, cotangents, block_sizes=None):
  """(o, final_state) and the gradients of every input, in one jit."""
  has_state = args[-1] is not None

  def f(*xs):
    s0 = xs[5] if has_state else None
    return delta_rule(*xs[:5], initial_state=s0, segment_ids=seg, impl=impl, chunk_size=chunk,
                      interpret=interpret, block_sizes=block_sizes)

  @jax.jit
  def run(xs, cts):
    xs = xs if has_state else xs[:5]
    out, vjp = jax.vjp(f, *xs)
    return out + tuple(vjp(cts))
  return run(args, cotangents)


@functools.lru_cache(maxsize=None)
def _reference(case):
  name, dims, _, dtype, gate, segments, state = case
  args, seg, cts = make_inputs(name, *dims, dtype=dtype, gate=gate, segments=segments,
                               state=state)
  return run_path("reference", False, 16, args, seg, cts), (args, seg, cts)


# name, (B, T, H, Dk, Dv), chunk, dtype, log-gate scale, segments, initial state. Chunks of 32
# and 64 exercise the GPU inverse's block merge (16-row blocks); 16 is a single block.
CASES = {c[0]: c for c in [
    ("f32-ragged-segments-state", (2, 37, 2, 16, 32), 16, jnp.float32, -0.3, True, True),
    ("f32-strong-gates-chunk64", (2, 70, 1, 16, 16), 64, jnp.float32, -6.0, True, False),
    ("bf16-weak-gates-chunk32", (1, 40, 2, 32, 16), 32, jnp.bfloat16, -0.02, False, True),
    ("shorter-than-a-chunk", (1, 5, 1, 16, 16), 16, jnp.float32, -0.5, False, True),
]}


# The cases each path runs by default (to keep CI short); the others run with -m slow.
PATH_CASES = {
    "xla": ("f32-ragged-segments-state",),
    "pallas_gpu": ("f32-strong-gates-chunk64", "bf16-weak-gates-chunk32"),
    "pallas_tpu": ("f32-ragged-segments-state",),
}
MATCH_CASES = [pytest.param(impl, name, id=f"{impl}{'' if impl == 'xla' else '-interpret'}-{name}",
                            marks=() if name in chosen else pytest.mark.slow)
               for impl, chosen in PATH_CASES.items() for name in CASES]


@pytest.mark.parametrize("impl,case_name", MATCH_CASES)
def test_matches_reference(impl, case_name):
  case = CASES[case_name]
  want, (args, seg, cts) = _reference(case)
  dtype, t = case[3], case[1][1]
  got = run_path(impl, impl != "xla", case[2], args, seg, cts)
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32
  for label, w, g in zip(GRADS, want, got):
    assert_close(label, w, g, dtype=dtype, reduction=t)


# pallas_gpu's backward="split" (the forward keeps Delta; the per-chunk gradients in a scores
# half over blocks of key columns and a WY half): 16-wide key and value blocks, so the cases
# split Dk (bf16: Dk=32) and Dv (ragged: Dv=32) into blocks whose partial sums add up.
SPLIT_CASES = ("f32-ragged-segments-state", "bf16-weak-gates-chunk32")


@pytest.mark.parametrize("case_name", [
    pytest.param(name, marks=() if name in SPLIT_CASES else pytest.mark.slow) for name in CASES])
def test_split_backward_matches_reference(case_name):
  case = CASES[case_name]
  want, (args, seg, cts) = _reference(case)
  dtype, t = case[3], case[1][1]
  split = pallas_gpu.BlockSizes(backward="split", block_k=16, block_v=16)
  got = run_path("pallas_gpu", True, case[2], args, seg, cts, block_sizes=split)
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32
  for label, w, g in zip(GRADS, want, got):
    assert_close(label, w, g, dtype=dtype, reduction=t)


# BlockSizes launch options: the defaults since the H200 sweeps of 2026-12-04 are keep_w (the
# forward keeps W, bwd_prep writes only P^T dO), dk_partial="compute" (dk_a handed over in the
# compute dtype), num_stages_parallel=2 (the parallel kernels' loop over value blocks as a real
# loop) but bwd_dqk unrolled, and walk_form="scaled_values"; the earlier settings (each one, and
# all of them: W recomputed, f32 dk_a, the unrolled loop, the scaled-keys walks) stay forced
# paths. 16-wide blocks as above, so the value loops run 2 blocks (ragged: Dv=32) and dk_a adds
# over 2 key blocks (bf16: Dk=32); bf16 checks dk_a's rounding.
EARLIER = dict(keep_w=False, dk_partial="float32", num_stages_parallel=None, num_warps_bwd=8)
OPTION_CASES = [
    ("recompute_w", dict(keep_w=False), "f32-ragged-segments-state", False),
    ("keep_w-fused", dict(backward="fused"), "f32-ragged-segments-state", False),
    ("recompute_w", dict(keep_w=False), "bf16-weak-gates-chunk32", True),
    ("dk_partial-f32", dict(dk_partial="float32"), "bf16-weak-gates-chunk32", False),
    ("dk_partial-f32", dict(dk_partial="float32"), "f32-ragged-segments-state", True),
    ("unrolled", dict(num_stages_parallel=None), "f32-ragged-segments-state", False),
    ("unrolled", dict(num_stages_parallel=None), "bf16-weak-gates-chunk32", True),
    ("stages3", dict(num_stages_parallel=3), "bf16-weak-gates-chunk32", True),
    ("pipelined-dqk", dict(unrolled=()), "bf16-weak-gates-chunk32", False),
    ("earlier", EARLIER, "bf16-weak-gates-chunk32", False),
    ("earlier", EARLIER, "f32-strong-gates-chunk64", True),
    ("earlier", EARLIER, "shorter-than-a-chunk", True),
    # walk_form="scaled_keys" (the earlier walks): both walks scale the [C, Dk] operands
    # ((omega K)^T Delta, (omega K) dS, (gq Q)^T (scale dO)), G_last by a masked reduction.
    ("scaled_keys", dict(walk_form="scaled_keys"), "f32-ragged-segments-state", False),
    ("scaled_keys", dict(walk_form="scaled_keys"), "bf16-weak-gates-chunk32", False),
    ("scaled_keys-fused", dict(walk_form="scaled_keys", backward="fused"),
     "f32-strong-gates-chunk64", False),
    ("scaled_keys", dict(walk_form="scaled_keys"), "shorter-than-a-chunk", True),
    ("earlier-scaled_keys", dict(EARLIER, walk_form="scaled_keys", unrolled=()),
     "bf16-weak-gates-chunk32", False),
    ("earlier-scaled_keys", dict(EARLIER, walk_form="scaled_keys", unrolled=()),
     "f32-ragged-segments-state", True),
    # wy_form="dense": delta_rule_wy on the whole chunk (A by one K K^T dot with the strict,
    # runs masks; one forward substitution on [C, C]; W and U one dot each) against the
    # blocked merge: chunk 64 (4 blocks) with segments and ragged T, chunk 32 bf16 with a state.
    ("wy_dense", dict(wy_form="dense"), "f32-strong-gates-chunk64", False),
    ("wy_dense-recompute_w", dict(wy_form="dense", keep_w=False), "bf16-weak-gates-chunk32",
     False),
    ("wy_dense", dict(wy_form="dense"), "f32-ragged-segments-state", True),
    ("wy_dense", dict(wy_form="dense"), "shorter-than-a-chunk", True),
    # wy_form="split": the blocked inverse stores only T, delta_rule_wu forms W and U from it
    # (test_wy_split_matches_the_reference_and_the_blocked_form runs the default-CI cases).
    ("wy_split-recompute_w", dict(wy_form="split", keep_w=False), "bf16-weak-gates-chunk32",
     True),
    ("wy_split-fused", dict(wy_form="split", backward="fused"), "f32-strong-gates-chunk64",
     True),
    ("wy_split", dict(wy_form="split"), "f32-ragged-segments-state", True),
    ("wy_split", dict(wy_form="split"), "shorter-than-a-chunk", True),
]


@pytest.mark.parametrize("options,case_name", [
    pytest.param(opts, name, id=f"{label}-{name}", marks=pytest.mark.slow if slow else ())
    for label, opts, name, slow in OPTION_CASES])
def test_block_size_options_match_reference(options, case_name):
  case = CASES[case_name]
  want, (args, seg, cts) = _reference(case)
  dtype, t = case[3], case[1][1]
  sizes = pallas_gpu.BlockSizes(**dict(dict(block_k=16, block_v=16), **options))
  got = run_path("pallas_gpu", True, case[2], args, seg, cts, block_sizes=sizes)
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32
  for label, w, g in zip(GRADS, want, got):
    assert_close(label, w, g, dtype=dtype, reduction=t)


def test_walk_forms_agree_to_rounding():
  """walk_form="scaled_values" (the default) is the earlier walk math regrouped (K^T diag(omega) Delta either
  way; e^x = 2^(x log2 e)): in float32 (segments, an initial state, two value blocks) both
  forms' outputs and gradients agree to float32 rounding, far inside the reference tolerance."""
  case = CASES["f32-ragged-segments-state"]
  _, (args, seg, cts) = _reference(case)
  base = dict(block_k=16, block_v=16)
  keys, values = (run_path("pallas_gpu", True, case[2], args, seg, cts,
                           block_sizes=pallas_gpu.BlockSizes(**base, walk_form=form))
                  for form in pallas_gpu.WALK_FORMS)
  for label, a, b in zip(GRADS, keys, values):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-5 * float(
        jnp.max(jnp.abs(a))), err_msg=label)


# Chunk 64 (four 16-row blocks, so W and U sum over up to four column blocks in the blocked form)
# with packed runs, ragged T (150: three chunks, the last one padded) and an initial state.
WY_SPLIT_CASES = {c[0]: c for c in [
    ("f32-chunk64-segments-state", (2, 150, 1, 32, 32), 64, jnp.float32, -0.3, True, True),
    ("bf16-chunk64-segments-state", (2, 150, 1, 32, 32), 64, jnp.bfloat16, -0.3, True, True),
]}


@pytest.mark.parametrize("case_name", list(WY_SPLIT_CASES))
def test_wy_split_matches_the_reference_and_the_blocked_form(case_name):
  """wy_form="split" (delta_rule_wy stores only T; delta_rule_wu forms W = T diag(b gq) K and
  U = T diag(b) V as one [C, C] x [C, D] dot each) equals the reference, forward and every
  gradient, and the blocked form (the default) up to the order of float32 sums: both round T
  and the right-hand sides to the compute dtype before the dots (on CPU they agree to ~1e-7
  in float32 and bitwise in bf16)."""
  case = WY_SPLIT_CASES[case_name]
  want, (args, seg, cts) = _reference(case)
  dtype, t = case[3], case[1][1]
  blocked, split = (run_path("pallas_gpu", True, case[2], args, seg, cts,
                             block_sizes=pallas_gpu.BlockSizes(block_k=16, block_v=16,
                                                               wy_form=form))
                    for form in ("blocked", "split"))
  assert split[0].dtype == dtype and split[1].dtype == jnp.float32
  rtol = 2e-5 if dtype == jnp.float32 else 1e-2
  for label, w, a, b in zip(GRADS, want, blocked, split):
    assert_close(label, w, b, dtype=dtype, reduction=t)
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * float(np.max(np.abs(a))),
                               err_msg=label)


def test_recurrence_is_the_papers():
  """S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T with S [Dv, Dk], o_t = S_t q_t, in
  float64 numpy; our state is its transpose."""
  (q, k, v, g, beta, s0), _, _ = make_inputs("literal", 1, 9, 1, 5, 3, dtype=jnp.float32,
                                             gate=-0.4, segments=False, state=True)
  qn, kn, vn, gn, bn = (np.asarray(x[0, :, 0], np.float64) for x in (q, k, v, g, beta))
  s = np.asarray(s0[0, 0], np.float64).T
  want = []
  for t in range(9):
    s = (np.exp(gn[t]) * s @ (np.eye(5) - bn[t] * np.outer(kn[t], kn[t]))
         + bn[t] * np.outer(vn[t], kn[t]))
    want.append(s @ qn[t] * 5 ** -0.5)
  o, final = reference.recurrent(q, k, v, g, beta, initial_state=s0)
  np.testing.assert_allclose(np.asarray(o[0, :, 0]), np.stack(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(final[0, 0]), s.T, rtol=1e-5, atol=1e-6)


def test_closed_form_equals_recurrence_forward_and_gradients():
  args, seg, cts = make_inputs("closed", 2, 14, 1, 6, 5, dtype=jnp.float32, gate=-0.5,
                               segments=True, state=True)

  @jax.jit
  def both(args, cts):
    out = []
    for form in (reference.recurrent, reference.quadratic):
      f = lambda *a, form=form: form(*a[:5], initial_state=a[5], segment_ids=seg)
      o, vjp = jax.vjp(f, *args)
      out.append(o + vjp(cts))
    return out
  rec, quad = both(args, cts)
  for name, a, b in zip(("o", "final", "dq", "dk", "dv", "dg", "dbeta", "ds0"), rec, quad):
    assert_close(name, a, b, reduction=14)


def test_no_write_only_decays():
  """b = 0: the state only decays, S_t = e^{G_t} S0, o_t = scale q_t e^{G_t} S0."""
  (q, k, v, g, beta, s0), _, _ = make_inputs("nowrite", 1, 7, 2, 4, 3, dtype=jnp.float32,
                                             gate=-0.3, segments=False, state=True)
  o, final = jax.jit(reference.recurrent, static_argnames="scale")(
      q, k, v, g, jnp.zeros_like(beta), initial_state=s0, scale=1.0)
  decay = jnp.exp(jnp.cumsum(g, axis=1))                                     # [B, T, H]
  want = decay[..., None] * jnp.einsum("bthk,bhkv->bthv", q, s0)
  assert_close("o", want, o, reduction=7)
  assert_close("final", decay[:, -1][..., None, None] * s0, final, reduction=7)


def test_full_writes_recall_orthonormal_keys():
  """a = b = 1 and one-hot keys: reading key j returns the last value written to it, exactly,
  on the chunked path too."""
  t, d = 12, 4
  which = np.array([0, 1, 2, 1, 3, 0, 2, 2, 1, 3, 0, 1])
  k = jnp.asarray(np.eye(d, dtype=np.float32)[which])[None, :, None]        # [1, T, 1, D]
  v = jnp.asarray(np.random.default_rng(0).standard_normal((1, t, 1, 3)), jnp.float32)
  ones, zeros = jnp.ones((1, t, 1)), jnp.zeros((1, t, 1))
  for impl in ("reference", "xla"):
    o, _ = delta_rule(k, k, v, zeros, ones, scale=1.0, impl=impl, chunk_size=5)
    np.testing.assert_allclose(np.asarray(o), np.asarray(v), atol=1e-6, err_msg=impl)
  # Querying key 2 after the whole sequence returns its last value (token 7).
  _, final = delta_rule(k, k, v, zeros, ones, impl="xla", chunk_size=5)
  np.testing.assert_allclose(np.asarray(final[0, 0, 2]), np.asarray(v[0, 7, 0]), atol=1e-6)


def test_decode_steps_equal_the_sequence():
  (q, k, v, g, beta, s0), _, _ = make_inputs("steps", 2, 6, 2, 8, 4, dtype=jnp.float32,
                                             gate=-0.2, segments=False, state=True)

  @jax.jit
  def both(q, k, v, g, beta, s0):
    state, outs = s0, []
    for t in range(6):
      o_t, state = delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
      outs.append(o_t)
    return reference.recurrent(q, k, v, g, beta, initial_state=s0), (jnp.stack(outs, 1), state)
  (o, final), (o_steps, state) = both(q, k, v, g, beta, s0)
  assert_close("o", o, o_steps, reduction=6)
  assert_close("state", final, state, reduction=6)


def test_state_carries_across_calls():
  """Two chunked calls chained through the state equal one call on the concatenation."""
  (q, k, v, g, beta, _), _, _ = make_inputs("carry", 1, 26, 2, 8, 8, dtype=jnp.float32,
                                            gate=-0.2, segments=False, state=False)
  cut = 13  # two calls of one shape: one compile for both
  run = lambda sl, s0=None: delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl],
                                       initial_state=s0, impl="xla", chunk_size=8)
  o_full, s_full = run(slice(None))
  o1, s1 = run(slice(0, cut))
  o2, s2 = run(slice(cut, None), s1)
  assert_close("o", o_full, jnp.concatenate([o1, o2], 1), reduction=26)
  assert_close("final_state", s_full, s2, reduction=26)
