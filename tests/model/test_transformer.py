"""The shared transformer: shapes, heads, causality, decode, remat and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from effattn.model import Transformer


def model_config(**overrides):
  cfg = base.get_config().model
  cfg.vocab_size = 40
  cfg.d_model = 32
  cfg.num_heads = 4
  cfg.num_layers = 2
  cfg.attention.impl = "xla"
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def tokens(b=2, t=10, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 40)


@pytest.mark.parametrize("position", ["rope", "learned", "none"])
@pytest.mark.parametrize("tie", [False, True])
def test_lm_shapes(position, tie):
  model = Transformer(model_config(position=position, tie_embeddings=tie), rngs=nnx.Rngs(0))
  logits, aux = model(tokens())
  assert logits.shape == (2, 10, 40) and logits.dtype == jnp.float32
  assert aux == {}
  assert np.all(np.isfinite(np.asarray(logits)))


def test_tied_embeddings_have_no_head():
  model = Transformer(model_config(tie_embeddings=True), rngs=nnx.Rngs(0))
  assert not hasattr(model, "lm_head")


def test_classifier_head_pools_real_tokens():
  model = Transformer(model_config(head="classifier", num_classes=10, causal=False),
                      rngs=nnx.Rngs(0))
  toks = tokens()
  seg = jnp.array([[1] * 7 + [0] * 3, [1] * 10])
  logits, _ = model(toks, segment_ids=seg)
  assert logits.shape == (2, 10)
  # Padding tokens change nothing.
  logits2, _ = model(toks.at[0, 8].set(3), segment_ids=seg)
  np.testing.assert_allclose(np.asarray(logits2[0]), np.asarray(logits[0]), atol=1e-5)


def test_lm_is_causal():
  model = Transformer(model_config(), rngs=nnx.Rngs(0))
  toks = tokens()
  a, _ = model(toks)
  b, _ = model(toks.at[:, 6:].set(1))
  np.testing.assert_array_equal(np.asarray(a[:, :6]), np.asarray(b[:, :6]))


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_decode_matches_forward(position):
  model = Transformer(model_config(position=position, attention=dict(
      base.get_config().model.attention, num_kv_heads=2, impl="xla")), rngs=nnx.Rngs(1))
  toks = tokens(t=9)
  full, _ = jax.jit(lambda t: model(t))(toks)
  cache = model.init_cache(2, 12)
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  # Jitted (the prompt and the one-token step are two programs), not op-by-op dispatch.
  decode = jax.jit(lambda t, p, c: model.decode(t, positions=p, cache=c))
  out, cache = decode(toks[:, :4], pos[:, :4], cache)
  outs = [out]
  for t in range(4, 9):
    out, cache = decode(toks[:, t:t + 1], pos[:, t:t + 1], cache)
    outs.append(out)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-4)


def test_remat_gives_same_gradients():
  toks = tokens()

  def grads(remat):
    model = Transformer(model_config(remat=remat), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(toks)[0] ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss))(params)  # one program, not op-by-op dispatch

  g0, g1 = grads(False), grads(True)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_f32_params():
  model = Transformer(model_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
  logits, _ = model(tokens())
  assert logits.dtype == jnp.float32
  params = nnx.state(model, nnx.Param)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_bad_dtype_named():
  with pytest.raises(ValueError, match="model.dtype"):
    Transformer(model_config(dtype="float8"), rngs=nnx.Rngs(0))
