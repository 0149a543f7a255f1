"""The shared benchmark timing helpers (effattn/evaluate/timing.py), cheaply on CPU."""

import jax
import jax.numpy as jnp
import numpy as np

from effattn.evaluate import timing
from effattn.kernels import hlo


def _f(x, w):
  return jnp.tanh(x @ w), jnp.sum(w * w)


def test_forward_and_grads_returns_the_forward_with_the_vjp():
  x, w = jax.random.normal(jax.random.key(0), (3, 4)), jax.random.normal(jax.random.key(1), (4, 5))
  ct = timing.cotangent_like(_f, x, w, seed=3)
  assert jax.tree.map(jnp.shape, ct) == ((3, 5), ())
  out, grads = timing.forward_and_grads(_f, argnums=(0, 1))(x, w, ct)
  want_out, vjp = jax.vjp(_f, x, w)
  for got, want in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((want_out, vjp(ct)))):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # An int argnums gives one gradient; a scalar loss takes 1.0 as its cotangent.
  loss = lambda x, w: jnp.sum(_f(x, w)[0] ** 2)  # noqa: E731
  value, g = timing.forward_and_grads(loss, argnums=1)(x, w, 1.0)
  np.testing.assert_allclose(value, loss(x, w), rtol=1e-6)
  np.testing.assert_allclose(g, jax.grad(loss, argnums=1)(x, w), rtol=1e-6)


def test_forward_survives_where_gradients_alone_drop_it():
  """A backward that needs only the inputs: timing its gradients alone compiles no forward."""
  @jax.custom_vjp
  def f(a):
    return jnp.linalg.cholesky(a)  # a LAPACK custom call on CPU, countable in the HLO

  f.defvjp(lambda a: (jnp.linalg.cholesky(a), a), lambda a, ct: (ct * a,))
  a = jnp.eye(4) * 2.0
  grad_only = lambda a, ct: jax.vjp(f, a)[1](ct)  # noqa: E731
  assert hlo.custom_calls(hlo.compiled_text(grad_only, a, a)) == []
  fb = timing.forward_and_grads(f)
  assert len(hlo.custom_calls(hlo.compiled_text(fb, a, a))) == 1


def test_measure_counts_kernels_and_times_the_compiled_program():
  x, w = jnp.ones((8, 8)), jnp.ones((8, 8))
  row = timing.measure(timing.forward_and_grads(_f, (0, 1)), x, w,
                       timing.cotangent_like(_f, x, w), reps=2, budget_s=0.01)
  assert row["ms"] > 0 and row["compile_s"] > 0 and row["kernels"] == 0  # no kernels on CPU


def test_carried_ms_threads_a_donated_carry():
  step = jax.jit(lambda c: {"n": c["n"] + 1, "buf": c["buf"] * 1.0}, donate_argnums=0)
  times, carry = timing.carried_ms(step, {"n": jnp.int32(0), "buf": jnp.ones(16)}, reps=3)
  assert len(times) == 3 and all(t > 0 for t in times)
  assert int(carry["n"]) == 4  # warm-up + 3 timed calls
