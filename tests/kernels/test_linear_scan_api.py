"""linear_scan's argument checks, path choice and gradient contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels.linear_scan import FAMILY, linear_scan


def ones(*shape):
  return jnp.ones(shape, jnp.float32)


def test_auto_uses_xla_on_cpu_and_pallas_needs_a_device():
  x = ones(1, 4, 1, 16)
  choose = lambda impl, **kw: FAMILY.choose(impl, Dk=16, Dv=16, dtype=x.dtype, **kw)  # noqa
  assert choose("auto").path == "xla"
  assert choose("pallas", interpret=True) == ("pallas_gpu", True)
  with pytest.raises(ValueError, match="impl='pallas' cannot run: no Pallas kernel"):
    choose("pallas")
  with pytest.raises(ValueError, match="impl='pallas' cannot run"):
    linear_scan(x, x, x, impl="pallas")
  with pytest.raises(ValueError, match="impl='fast' is not one of"):
    choose("fast")


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=ones(1, 5, 2, 8)), "q and k must both be"),
    (dict(v=ones(1, 4, 1, 8)), "v must be"),
    (dict(v=jnp.ones((1, 4, 2, 8), jnp.bfloat16)), "share one dtype"),
    (dict(log_decay=ones(3)), r"log_decay must be \[H\]"),
    (dict(initial_state=ones(1, 2, 8, 4)), r"initial_state must be \[B, H, Dk, Dv\]"),
    (dict(initial_state=ones(1, 2, 8, 8), causal=False), "initial_state needs causal=True"),
    (dict(segment_ids=jnp.ones((1, 5), jnp.int32)), r"segment_ids must be \[B, T\]"),
])
def test_bad_arguments_name_the_field(kwargs, match):
  args = dict(q=ones(1, 4, 2, 8), k=ones(1, 4, 2, 8), v=ones(1, 4, 2, 8))
  args.update(kwargs)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  with pytest.raises(ValueError, match=match):
    linear_scan(q, k, v, impl="xla", **args)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_log_decay_is_differentiable_and_stop_gradient_fixes_it(impl):
  """A learned decay trains (tests/kernels/test_linear_scan.py compares the values with the
  reference); a mechanism that fixes its decays stops the gradient itself."""
  x = jax.random.normal(jax.random.key(0), (1, 6, 1, 4))
  loss = lambda g: linear_scan(x, x, x, g, impl=impl)[0].sum()  # noqa: E731
  g = jnp.array([-0.5])
  assert np.all(np.asarray(jax.grad(loss)(g)) != 0.0)
  fixed = jax.grad(lambda g: loss(jax.lax.stop_gradient(g)))(g)
  np.testing.assert_array_equal(np.asarray(fixed), [0.0])


def test_out_dtype_and_state_dtype():
  x = jnp.ones((1, 6, 1, 4), jnp.bfloat16)
  o, s = linear_scan(x, x, x, impl="xla", out_dtype=jnp.float32)
  assert o.dtype == jnp.float32 and s.dtype == jnp.float32
  o, _ = linear_scan(x, x, x, impl="xla")
  assert o.dtype == jnp.bfloat16
