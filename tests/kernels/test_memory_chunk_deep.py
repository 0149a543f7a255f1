"""The deep (MLP) memory: one layer equals the linear kernel; chunk 1 equals the recurrence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effattn.kernels.memory_chunk import deep, memory_update
from tests.kernels.test_memory_chunk import assert_close, make_inputs


def test_one_layer_is_the_linear_memory():
  args, seg = make_inputs("deep1", 2, 21, 2, 8, 8, segments=True)
  q, k, v, theta, alpha, eta, w0, s0 = args
  y, (w, s) = memory_update(q, k, v, theta, alpha, eta, initial_memory=w0, initial_momentum=s0,
                            segment_ids=seg, chunk_size=4, impl="xla")
  # The linear kernel restarts new segments (here inside chunks) at zero.
  y_d, ((w_d,), (s_d,)) = deep.chunked((w0,), (s0,), q, k, v, theta, alpha, eta, seg,
                                       reset_to=(jnp.zeros_like(w0),), chunk_size=4)
  assert_close("y", y, y_d, jnp.float32)
  assert_close("W_T", w, w_d, jnp.float32)
  assert_close("S_T", s, s_d, jnp.float32)


def test_two_layers_chunk_of_one_is_the_recurrence():
  args, seg = make_inputs("deep2", 1, 13, 2, 8, 8, segments=True, states=False)
  q, k, v, theta, alpha, eta, _, _ = args
  theta = 0.1 * theta  # a deep memory needs a smaller step than the unit-key linear one
  keys = jax.random.split(jax.random.key(4), 2)
  p0 = (0.3 * jax.random.normal(keys[0], (1, 2, 8, 16)),
        0.3 * jax.random.normal(keys[1], (1, 2, 16, 8)))
  m0 = jax.tree.map(lambda x: 0.1 * x, p0)

  def run(fn):
    def f(p0, k, theta):
      y, state = fn(p0, m0, q, k, v, theta, alpha, eta, seg)
      return y, state
    return jax.vjp(f, p0, k, theta)

  (y_r, st_r), vjp_r = run(deep.recurrent)
  (y_c, st_c), vjp_c = run(lambda *a: deep.chunked(*a, chunk_size=1))
  assert_close("y", y_r, y_c, jnp.float32)
  for a, b in zip(jax.tree.leaves(st_r), jax.tree.leaves(st_c)):
    assert_close("state", a, b, jnp.float32)
  ct = jax.tree.map(lambda x: jax.random.normal(jax.random.key(9), x.shape), (y_r, st_r))
  for a, b in zip(jax.tree.leaves(vjp_r(ct)), jax.tree.leaves(vjp_c(ct))):
    assert_close("grad", a, b, jnp.float32)
  y4, _ = deep.chunked(p0, m0, q, k, v, theta, alpha, eta, seg, chunk_size=4)
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
  y_r, st_r = deep.recurrent(p0, m0, q, k, v, theta, alpha, eta, seg, reset_to=p_init)
  y_c, st_c = deep.chunked(p0, m0, q, k, v, theta, alpha, eta, seg, reset_to=p_init,
                           chunk_size=1)
  assert_close("y chunk 1", y_r, y_c, jnp.float32)
  # Chunk 3: segments start at 4 (inside a chunk) and 9 (a chunk start); the last segment
  # equals itself run alone from p_init.
  y3, _ = deep.chunked(p0, m0, q, k, v, theta, alpha, eta, seg, reset_to=p_init, chunk_size=3)
  cut = int(np.argmax(np.asarray(seg[0]) == 5))
  assert cut % 3 == 0
  y_alone, _ = deep.chunked(p_init, m0, *(x[:, cut:] for x in (q, k, v, theta, alpha, eta)),
                            chunk_size=3)
  assert_close("last segment alone", y_alone, y3[:, cut:], jnp.float32)
