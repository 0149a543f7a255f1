"""Shared suite: a delta-rule path equals reference.recurrent, forward, final state, gradients.

Each test_delta_rule_<impl>.py subclasses `DeltaRuleSuite`, sets IMPL / INTERPRET / CASE_NAMES
(the cases it runs, to keep CI short) and imports `pytest_generate_tests` (which parametrizes
the cases by name).
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

from effattn.kernels.delta_rule import delta_rule

# Absolute tolerance per dtype, times the reference's magnitude (f32: the chunked form reorders
# sums; bf16: matmul operands and the saved states are rounded to bf16).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
GRADS = ("o", "final_state", "dq", "dk", "dv", "dlog_gate", "dbeta", "ds0")


def assert_close(name, want, got, dtype):
  want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
  assert want.shape == got.shape, f"{name}: shape {got.shape} != {want.shape}"
  atol = TOL[dtype] * max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


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


def run_path(impl, interpret, chunk, args, seg, cotangents):
  """(o, final_state) and the gradients of every input, in one jit."""
  has_state = args[-1] is not None

  def f(*xs):
    s0 = xs[5] if has_state else None
    return delta_rule(*xs[:5], initial_state=s0, segment_ids=seg, impl=impl, chunk_size=chunk,
                      interpret=interpret)

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


class DeltaRuleSuite:
  IMPL = "reference"
  INTERPRET = False
  CASE_NAMES: tuple[str, ...] = tuple(CASES)  # the cases CI runs
  # The other cases run with -m slow (the default run leaves them out to keep CI short).

  def test_matches_reference(self, case_name):
    case = CASES[case_name]
    want, (args, seg, cts) = _reference(case)
    dtype = case[3]
    got = run_path(self.IMPL, self.INTERPRET, case[2], args, seg, cts)
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    for label, w, g in zip(GRADS, want, got):
      assert_close(label, w, g, dtype)


def pytest_generate_tests(metafunc):
  """Parametrizes `case_name` over every case: the subclass's CASE_NAMES as they are, the
  others marked slow."""
  if "case_name" in metafunc.fixturenames:
    chosen = metafunc.cls.CASE_NAMES
    metafunc.parametrize("case_name", [
        pytest.param(n, marks=() if n in chosen else pytest.mark.slow) for n in CASES])
