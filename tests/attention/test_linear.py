"""linear: the masked quadratic form (the spec's oracle), every feature map, paths, decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effattn.attention import linear
from tests.attention import oracles


def features(seed=0, b=2, t=10, h=2, d=8):
  keys = jax.random.split(jax.random.key(seed), 3)
  q, k = (jax.nn.elu(jax.random.normal(kk, (b, t, h, d))) + 1 for kk in keys[:2])
  return q, k, jax.random.normal(keys[2], (b, t, h, d))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_equals_masked_quadratic_form(causal, normalize):
  """(phi(Q) phi(K)^T * M) V / (rowsum + eps), written out per head in numpy."""
  q, k, v = features()
  got, _ = linear.linear_attention(q, k, v, causal=causal, normalize=normalize, eps=1e-6,
                                   scale=0.5, impl="xla")
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  t = q.shape[1]
  mask = np.tril(np.ones((t, t))) if causal else np.ones((t, t))
  want = np.zeros_like(vn)
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      a = (qn[:, :, h][b] @ kn[:, :, h][b].T) * 0.5 * mask
      want[b, :, h] = a @ vn[b, :, h]
      if normalize:
        want[b, :, h] /= a.sum(-1, keepdims=True) + 1e-6
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("feature_map", ["elu+1", "relu", "softmax", "identity"])
def test_oracles(feature_map):
  attn = oracles.build("linear", linear={"feature_map": feature_map}, num_kv_heads=2)
  x, pos = oracles.random_inputs()
  oracles.check_causality(attn, x, pos)
  oracles.check_decode_matches_forward(attn, x, pos, prompt_len=5)
  oracles.check_segments_isolated(attn, x)
  oracles.check_segments_isolated(attn, x, causal=False)
  if feature_map == "elu+1":
    oracles.check_decode_matches_forward(attn, x, pos)
    oracles.check_gradients_finite(attn, x, pos)


def test_chunked_path_equals_reference_with_grads():
  ref = oracles.build("linear", impl="reference", seed=5)
  fast = oracles.build("linear", impl="xla", seed=5)
  x, pos = oracles.random_inputs(length=21)
  seg = jnp.asarray(np.repeat([[1] * 9 + [2] * 12], 2, 0), jnp.int32)

  def loss(m, x):
    y, _ = m(x, positions=pos, segment_ids=seg)
    return jnp.vdot(y, jnp.sin(y)), y
  (_, y_ref), g_ref = nnx.value_and_grad(loss, has_aux=True)(ref, x)
  (_, y_fast), g_fast = nnx.value_and_grad(loss, has_aux=True)(fast, x)
  np.testing.assert_allclose(np.asarray(y_fast), np.asarray(y_ref), atol=2e-5)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_fast)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=5e-5)


def test_decode_state_is_constant_size():
  attn = oracles.build("linear")
  assert jax.tree.map(jnp.shape, attn.init_cache(2, 10)) == jax.tree.map(
      jnp.shape, attn.init_cache(2, 100_000))


def test_unknown_feature_map_names_the_field():
  with pytest.raises(ValueError, match="linear.feature_map='cos'"):
    oracles.build("linear", linear={"feature_map": "cos"})
