"""linear, its own oracles: the masked quadratic form (the spec's), the unnormalized map's decode
and segments, a constant-size decode state. The common oracles (default elu+1 map) are in
test_mechanisms.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.attention import linear
from effattn.testing import assert_close, oracles
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import Jitted, build


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
  assert_close("o", want, got, reduction=t)


def test_identity_map_without_normalizer_decodes_and_packs():
  """feature_map='identity' drops the normalizer: its own forward and decode path."""
  attn = Jitted(build("linear", linear={"feature_map": "identity"}, num_kv_heads=2))
  x, pos = random_inputs()
  oracles.check_causality(attn, x, pos)
  oracles.check_decode_matches_forward(attn, x, pos, prompt_len=5)
  oracles.check_segments_isolated(attn, x)
  oracles.check_segments_isolated(attn, x, causal=False)


def test_decode_state_is_constant_size():
  attn = build("linear")
  assert jax.tree.map(jnp.shape, attn.init_cache(2, 10)) == jax.tree.map(
      jnp.shape, attn.init_cache(2, 100_000))


def test_unknown_feature_map_names_the_field():
  with pytest.raises(ValueError, match="linear.feature_map='cos'"):
    build("linear", linear={"feature_map": "cos"})
