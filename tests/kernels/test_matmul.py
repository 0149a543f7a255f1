"""matmul.dot's float32 precision: HIGHEST while jax_default_matmul_precision is unset, else
jax's setting, in XLA code and kernel bodies alike (jit re-traces when the setting changes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels import matmul
from effattn.kernels.linear_scan import linear_scan

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
TF32 = (jax.lax.Precision.HIGH, jax.lax.Precision.HIGH)  # "tensorfloat32"


def precisions(fn, *args) -> list:
  """The precision of every dot_general in fn's jaxpr, kernel bodies included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(eqn.params["precision"])
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_unset_is_exact_and_a_setting_is_followed():
  a = jnp.ones((8, 16), jnp.float32)
  dot = lambda a: matmul.dot(a, a, trans_b=True)  # noqa: E731
  assert jax.config.jax_default_matmul_precision is None
  assert precisions(dot, a) == [HIGHEST]
  with jax.default_matmul_precision("tensorfloat32"):
    assert precisions(dot, a) == [TF32]
  with jax.default_matmul_precision("float32"):
    assert precisions(dot, a) == [HIGHEST]
  # bf16 operands, and exact_f32=False, take the backend's default whatever the setting
  assert precisions(dot, a.astype(jnp.bfloat16)) == [None]
  assert precisions(lambda a: matmul.dot(a, a.T, exact_f32=False), a) == [None]


def test_the_setting_reaches_the_kernels_and_leaves_cpu_values_alone():
  """The Pallas GPU linear scan (interpret mode) takes the setting in its kernel body; on the
  CPU every precision is full float32, so the values agree to rounding."""
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (1, 40, 2, 16), jnp.float32) for kk in ks)
  run = lambda q, k, v: linear_scan(q, k, v, impl="pallas_gpu", interpret=True)[0]  # noqa: E731
  exact = precisions(run, q, k, v)
  assert exact and all(p == HIGHEST for p in exact)
  with jax.default_matmul_precision("tensorfloat32"):
    fast = precisions(run, q, k, v)
    got = run(q, k, v)
  assert len(fast) == len(exact) and all(p == TF32 for p in fast)
  np.testing.assert_allclose(np.asarray(got), np.asarray(run(q, k, v)), rtol=1e-5, atol=1e-5)


def test_precision_scope_is_the_configs_setting():
  """model.matmul_precision's context: "" changes nothing, a name is jax's setting, a bad
  name is refused in one line naming the field."""
  a = jnp.ones((8, 16), jnp.float32)
  dot = lambda a: matmul.dot(a, a, trans_b=True)  # noqa: E731
  with matmul.precision_scope(""):
    assert jax.config.jax_default_matmul_precision is None
    assert precisions(dot, a) == [HIGHEST]
  with matmul.precision_scope("tensorfloat32"):
    assert precisions(dot, a) == [TF32]
  assert jax.config.jax_default_matmul_precision is None
  with pytest.raises(ValueError, match=r"model.matmul_precision='tf32' must be one of"):
    matmul.precision_scope("tf32")
