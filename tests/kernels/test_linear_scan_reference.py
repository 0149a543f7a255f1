"""reference.py checked against itself and a literal numpy loop (the oracle of the oracles)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels.linear_scan import reference, segment_runs
from effattn.testing import assert_close
from effattn.testing.inputs import two_segments


def inputs(b=2, t=13, h=3, dk=4, dv=5, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, h, dk))
  k = jax.random.normal(keys[1], (b, t, h, dk))
  v = jax.random.normal(keys[2], (b, t, h, dv))
  s0 = jax.random.normal(keys[3], (b, h, dk, dv))
  return q, k, v, s0


def numpy_loop(q, k, v, g, s0, causal=True):
  """o_t = sum_{s<=t} e^{g(t-s)} (q_t . k_s) v_s + e^{g(t+1)} q_t S0, written out literally."""
  q, k, v, s0 = (np.asarray(x, np.float64) for x in (q, k, v, s0))
  b, t, h, _ = q.shape
  o = np.zeros(v.shape)
  for bi in range(b):
    for hi in range(h):
      for ti in range(t):
        for si in range(t):
          if causal and si > ti:
            continue
          score = q[bi, ti, hi] @ k[bi, si, hi]
          o[bi, ti, hi] += np.exp(g[hi] * abs(ti - si)) * score * v[bi, si, hi]
        if causal:
          o[bi, ti, hi] += np.exp(g[hi] * (ti + 1)) * q[bi, ti, hi] @ s0[bi, hi]
  return o


@pytest.mark.parametrize("causal", [True, False])
def test_quadratic_equals_numpy_loop(causal):
  q, k, v, s0 = inputs(b=1, t=7, h=2)
  g = np.array([0.0, -0.7])
  o, _ = reference.scan_quadratic(q, k, v, jnp.asarray(g), causal=causal,
                                  initial_state=s0 if causal else None)
  assert_close("o", numpy_loop(q, k, v, g, s0, causal), o, reduction=7)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("segments", [False, True])
def test_recurrent_equals_quadratic(reverse, segments):
  q, k, v, s0 = inputs()
  g = jnp.array([0.0, -0.3, -8.0])  # none, mild, strong
  seg = two_segments(2, 13, 5) if segments else None
  kw = dict(reverse=reverse, initial_state=s0, segment_ids=seg, scale=0.7)
  o1, s1 = reference.scan_quadratic(q, k, v, g, **kw)
  o2, s2 = reference.scan_recurrent(q, k, v, g, **kw)
  assert_close("o", o1, o2, reduction=13)
  assert_close("final_state", s1, s2, reduction=13)


def test_bidirectional_is_causal_plus_reverse_minus_diagonal():
  q, k, v, _ = inputs()
  g = jnp.array([0.0, -0.3, -2.0])
  seg = two_segments(2, 13, 6)
  forward = reference.scan_quadratic(q, k, v, g, segment_ids=seg)[0]
  backward = reference.scan_quadratic(q, k, v, g, reverse=True, segment_ids=seg)[0]
  both = reference.scan_quadratic(q, k, v, g, causal=False, segment_ids=seg)[0]
  diagonal = jnp.sum(q * k, -1, keepdims=True) * v
  assert_close("bidirectional", both, forward + backward - diagonal, reduction=13)


def test_reverse_is_the_transpose_of_causal():
  """<causal(q, k, v), w> = <v, reverse(k, q, w)>: the identity the custom VJP relies on."""
  q, k, v, _ = inputs(seed=1)
  w = jax.random.normal(jax.random.key(9), v.shape)
  g = jnp.array([0.0, -0.5, -1.5])
  lhs = jnp.vdot(reference.scan_quadratic(q, k, v, g)[0], w)
  rhs = jnp.vdot(v, reference.scan_quadratic(k, q, w, g, reverse=True)[0])
  np.testing.assert_allclose(float(lhs), float(rhs), rtol=1e-5)


def test_segments_do_not_interact_and_state_is_the_last_runs():
  q, k, v, s0 = inputs(b=1)
  seg = jnp.array([[4] * 5 + [9] * 8])
  g = jnp.array([0.0, -0.3, -1.0])
  o, s = reference.scan_quadratic(q, k, v, g, initial_state=s0, segment_ids=seg)
  o1, _ = reference.scan_quadratic(q[:, :5], k[:, :5], v[:, :5], g, initial_state=s0)
  o2, s2 = reference.scan_quadratic(q[:, 5:], k[:, 5:], v[:, 5:], g)
  assert_close("first", o1, o[:, :5], reduction=13)
  assert_close("second", o2, o[:, 5:], reduction=13)
  assert_close("final_state", s2, s, reduction=13)


def test_segment_runs_split_reused_ids():
  runs = segment_runs(jnp.array([[1, 1, 2, 2, 1, 0, 0]]))
  np.testing.assert_array_equal(np.asarray(runs), [[0, 0, 1, 1, 2, 3, 3]])


@pytest.mark.parametrize("causal", [True, False])
def test_log_decay_gradient_equals_finite_differences_of_the_numpy_loop(causal):
  """The oracle differentiates g: jax.grad of scan_quadratic equals central differences of the
  float64 loop (initial state included where causal)."""
  q, k, v, s0 = inputs(b=1, t=7, h=2)
  w = np.asarray(jax.random.normal(jax.random.key(4), v.shape), np.float64)
  g = np.array([-0.2, -0.9])
  grad = jax.jit(jax.grad(lambda g: jnp.vdot(reference.scan_quadratic(
      q, k, v, g, causal=causal, initial_state=s0 if causal else None)[0], w)))(jnp.asarray(g))
  eps = 1e-6
  numeric = [(np.vdot(numpy_loop(q, k, v, g + eps * e, s0, causal), w)
              - np.vdot(numpy_loop(q, k, v, g - eps * e, s0, causal), w)) / (2 * eps)
             for e in np.eye(2)]
  assert_close("d log_decay", np.array(numeric), grad, reduction=7 * 7)


@pytest.mark.parametrize("reverse", [False, True])
def test_log_decay_gradient_of_quadratic_equals_recurrent(reverse):
  """Both forms give the same g gradient with segments, an initial state and cotangents on the
  output and the final state."""
  q, k, v, s0 = inputs()
  g = jnp.array([0.0, -0.3, -4.0])
  seg = two_segments(2, 13, 5)
  w = jax.random.normal(jax.random.key(5), v.shape)
  ws = jax.random.normal(jax.random.key(6), s0.shape)

  def grad(scan):
    def loss(g):
      o, s = scan(q, k, v, g, reverse=reverse, initial_state=s0, segment_ids=seg, scale=0.7)
      return jnp.vdot(o, w) + jnp.vdot(s, ws)
    return jax.jit(jax.grad(loss))(g)
  assert_close("d log_decay", grad(reference.scan_recurrent), grad(reference.scan_quadratic),
               reduction=2 * 13)
