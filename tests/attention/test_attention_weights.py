"""attention_weights of the mechanisms that expose it (softmax, linear, mala): the weights give
the mechanism's own output, o = W_o sum_j a_ij v_j, on its real path (segments, GQA, a window,
options), and equal a direct numpy computation of the paper's formula on a tiny case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.attention import base
from effattn.testing import assert_close
from effattn.testing.inputs import random_inputs, two_segments
from effattn.testing.mechanisms import build

T = 7


def _inputs():
  x, _ = random_inputs(batch=2, length=T, d_model=32, seed=3)
  seg = two_segments(2, T, 4)
  positions = jnp.asarray(np.where(np.asarray(seg) == 2, np.arange(T) - 4, np.arange(T)),
                          jnp.int32)  # positions restart with the second segment
  return x, positions, seg


@pytest.mark.parametrize("name, fields", [
    ("softmax", {}),
    ("softmax", {"num_kv_heads": 2, "window": 3}),
    ("linear", {}),
    ("linear", {"linear": {"feature_map": "identity"}}),
    ("mala", {}),
    ("mala", {"mala": {"rope": True}}),
], ids=["mha", "gqa-window", "linear", "linear-identity", "mala", "mala-rope"])
def test_weights_give_the_mechanism_output(name, fields):
  module = build(name, impl="xla", **fields)
  x, positions, seg = _inputs()
  y, _ = module(x, positions=positions, segment_ids=seg)
  a = module.attention_weights(x, positions=positions, segment_ids=seg)
  assert a.shape == (2, 4, T, T) and a.dtype == jnp.float32
  # Nothing crosses the segment boundary of row 0 or looks ahead.
  assert float(jnp.abs(a[0, :, 4:, :4]).max()) == 0.0
  assert float(jnp.abs(jnp.triu(a, 1)).max()) == 0.0
  v = base.repeat_kv(base.split_heads(module.v_proj(x), module.num_kv_heads), module.num_heads)
  o = jnp.einsum("bhij,bjhd->bihd", a, v.astype(jnp.float32))
  assert_close("o_proj(sum_j a_ij v_j)", y, module.o_proj(base.merge_heads(o)), reduction=T)


def _project(module, x):
  """q, k [T, H, D] of batch row 0 in float64."""
  h = module.num_heads
  q = np.asarray(module.q_proj(x)[0], np.float64).reshape(T, h, -1)
  k = np.asarray(module.k_proj(x)[0], np.float64).reshape(T, h, -1)
  return q, k


def _elu1(z):
  return np.where(z > 0, z + 1.0, np.exp(z))


def _direct(name, q, k):
  """The paper's causal weights of one row, written loop by loop: [H, T, T]."""
  h, d = q.shape[1], q.shape[2]
  a = np.zeros((h, T, T))
  for n in range(h):
    for i in range(T):
      keys = range(i + 1)
      if name == "softmax":
        s = np.array([q[i, n] @ k[j, n] / np.sqrt(d) for j in keys])
        a[n, i, :i + 1] = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
      elif name == "linear":
        s = np.array([_elu1(q[i, n]) @ _elu1(k[j, n]) for j in keys])
        a[n, i, :i + 1] = s / (s.sum() + 1e-6)
      else:  # mala: beta_i s_ij - gamma_i with s_ij = phi(q_i) . phi(k_j) / (sqrt(D) N_i)
        s = np.array([_elu1(q[i, n]) @ _elu1(k[j, n]) for j in keys]) / (np.sqrt(d) * (i + 1))
        z = s.sum()
        a[n, i, :i + 1] = (1 + 1 / (z + 1e-6)) * s - z / (i + 1)
  return a


@pytest.mark.parametrize("name", ["softmax", "linear", "mala"])
def test_weights_equal_the_formula(name):
  # No RoPE: the softmax formula above has none (its RoPE path is covered by the output test).
  module = build(name, impl="xla")
  module.rope_theta = None
  x, positions, _ = _inputs()
  got = module.attention_weights(x, positions=positions)
  want = _direct(name, *_project(module, x))
  assert_close(f"{name} weights", want, got[0], reduction=T)
  if name != "mala":  # MALA's rows sum to 1 too, but with negative entries
    assert float(got.min()) >= 0.0
  assert_close("row sums", 1.0, jnp.sum(got, -1), reduction=T)


def test_mechanisms_without_weights_say_so():
  module = build("lightning")
  x, positions, _ = _inputs()
  with pytest.raises(ValueError, match="lightning does not expose"):
    module.attention_weights(x, positions=positions)


def test_model_weights_per_layer():
  """The model hands each layer the input its forward pass gives it."""
  from flax import nnx

  from effattn.model.transformer import Transformer
  from effattn.testing.configs import base_config

  config = base_config().model
  config.update(d_model=32, num_heads=4, num_layers=2, mlp="none", vocab_size=16)
  config.attention.impl = "xla"
  model = Transformer(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, T), 0, 16)
  weights = model.attention_weights(tokens)
  assert len(weights) == 2
  positions = jnp.broadcast_to(jnp.arange(T), (2, T))
  x = model.embed_tokens(tokens, positions)
  for block, w in zip(model.blocks, weights):
    want = block.attn.attention_weights(block.attn_norm(x), positions=positions)
    assert_close("layer weights", want, w, reduction=T)
    x, _ = block(x, positions=positions, segment_ids=None, causal=True, train=False)
