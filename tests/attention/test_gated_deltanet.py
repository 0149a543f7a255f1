"""gated_deltanet: the whole layer against a float64 numpy transcription of the paper's block,
the short convolutions' segment and decode boundaries, the O(1) cache, config checks. The common
oracles and the kernel path (interpreted, against the reference) are in test_mechanisms.py; the
kernels' numerics in tests/kernels/test_delta_rule.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.attention import gated_deltanet
from effattn.testing import assert_close
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import Jitted, build


@pytest.fixture(scope="module")
def attn():
  return build("gated_deltanet", impl="xla")


def numpy_layer(attn, x):
  """The block of the module docstring in float64 numpy, token by token, from attn's params."""
  p = lambda a: np.asarray(a, np.float64)  # noqa: E731
  x = p(x)
  b, t, _ = x.shape
  h, dk, dv = attn.num_heads, attn.head_dim, attn.value_dim
  mixed = x @ p(attn.qkv_proj.kernel.value)
  taps = p(attn.conv.value)
  width = taps.shape[0]
  padded = np.concatenate([np.zeros((b, width - 1, mixed.shape[-1])), mixed], 1)
  conv = sum(padded[:, i:i + t] * taps[i] for i in range(width))
  silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
  act = silu(conv)
  q, k = act[..., :h * dk].reshape(b, t, h, dk), act[..., h * dk:2 * h * dk].reshape(b, t, h, dk)
  v = act[..., 2 * h * dk:].reshape(b, t, h, dv)
  q, k = (z / np.sqrt((z * z).sum(-1, keepdims=True) + 1e-6) for z in (q, k))
  gates = x @ p(attn.gate_proj.kernel.value)
  a, beta = gates[..., :h], 1 / (1 + np.exp(-gates[..., h:]))
  g = -np.exp(p(attn.A_log.value)) * np.log1p(np.exp(a + p(attn.dt_bias.value)))
  s = np.zeros((b, h, dv, dk))  # the paper's S in R^{Dv x Dk}
  o = np.zeros((b, t, h, dv))
  eye = np.eye(dk)
  for i in range(t):
    kk = k[:, i]
    proj = eye - beta[:, i, :, None, None] * kk[..., :, None] * kk[..., None, :]
    s = (np.exp(g[:, i])[..., None, None] * s @ proj
         + beta[:, i, :, None, None] * v[:, i, ..., :, None] * kk[..., None, :])
    o[:, i] = np.einsum("bhvk,bhk->bhv", s, q[:, i]) * dk ** -0.5
  o = o / np.sqrt((o * o).mean(-1, keepdims=True) + 1e-5) * p(attn.norm_scale.value)
  o = o * silu((x @ p(attn.out_gate_proj.kernel.value)).reshape(b, t, h, dv))
  return o.reshape(b, t, h * dv) @ p(attn.o_proj.kernel.value)


def test_layer_is_the_papers_block(attn):
  x, pos = random_inputs()
  y, aux = Jitted(attn)(x, positions=pos)  # one compile, not one per eager op
  assert_close("layer vs float64 numpy", numpy_layer(attn, x), y, reduction=x.shape[1])
  assert 0 < float(aux["delta_write"]) < 1 and float(aux["delta_log_decay"]) < 0


def test_init_is_flas():
  """fla's GatedDeltaNet init: A ~ U(0, 16), softplus(dt_bias) = dt ~ logU(1e-3, 1e-1), conv taps
  U(-1/sqrt(K), 1/sqrt(K)), norm scale 1; so at init the write strength b is about 1/2 and the
  decay a = exp(-A dt) lies in (exp(-1.6), 1]. A decay or write strength far from these (e.g. a
  softplus^-1 slip that makes dt ~ 1, a = e^-8 per token) leaves the layer a memory of a token or
  two, which on MQAR sits at chance."""
  layer = build("gated_deltanet", d_model=64, num_heads=64, head_dim=16, impl="xla")
  a = np.exp(np.asarray(layer.A_log.value, np.float64))
  dt = np.log1p(np.exp(np.asarray(layer.dt_bias.value, np.float64)))
  assert np.all((a > 0) & (a <= 16)) and a.max() > 8 and a.min() < 8
  assert np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 1e-1 * (1 + 1e-5)))
  assert dt.min() < 1e-2 < dt.max()
  taps = np.asarray(layer.conv.value)
  assert np.abs(taps).max() <= taps.shape[0] ** -0.5 and np.abs(taps).max() > 0.4
  np.testing.assert_array_equal(layer.norm_scale.value, 1.0)
  x, pos = random_inputs(length=32, d_model=64)
  _, aux = Jitted(layer)(x, positions=pos)
  assert 0.4 < float(aux["delta_write"]) < 0.6
  assert -0.6 < float(aux["delta_log_decay"]) < -0.05


def test_cache_is_constant_in_the_length(attn):
  small, large = attn.init_cache(2, 16), attn.init_cache(2, 4096)
  assert jax.tree.map(jnp.shape, small) == jax.tree.map(jnp.shape, large)
  assert small["state"].shape == (2, 4, 8, 16) and small["conv"].shape == (2, 3, 2 * 32 + 64)


@pytest.mark.parametrize("fields,match", [
    (dict(gated_deltanet={"expand_v": 0.3}), "gated_deltanet.expand_v=0.3"),
    (dict(gated_deltanet={"conv_size": 0}), "conv_size=0"),
    (dict(num_kv_heads=2), "num_kv_heads"),
    (dict(window=8), "window"),
])
def test_bad_options_name_the_field(fields, match):
  with pytest.raises(ValueError, match=match):
    build("gated_deltanet", **fields)


def test_bidirectional_is_refused(attn):
  x, pos = random_inputs(length=4)
  with pytest.raises(ValueError, match="model.causal=True"):
    attn(x, positions=pos, causal=False)
