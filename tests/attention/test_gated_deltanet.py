"""gated_deltanet: the whole layer against a float64 numpy transcription of the paper's block,
the short convolutions' segment and decode boundaries, the common oracles, the kernel path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.attention import gated_deltanet
from effattn.kernels import dispatch
from tests.attention import oracles
from tests.kernels.test_delta_rule_api import STAGES
from tests.kernels.test_linear_scan_pallas_gpu import pallas_call_names


@pytest.fixture(scope="module")
def attn():
  return oracles.build("gated_deltanet", impl="xla")


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
  x, pos = oracles.random_inputs()  # the oracles' shape: eager ops compiled once for both
  y, aux = attn(x, positions=pos)
  np.testing.assert_allclose(np.asarray(y), numpy_layer(attn, x), rtol=2e-4, atol=2e-5)
  assert 0 < float(aux["delta_write"]) < 1 and float(aux["delta_log_decay"]) < 0


def test_short_conv_stops_at_segment_starts_and_continues_from_its_tail():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 10, 3)), jnp.float32)
  taps = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
  seg = jnp.asarray([[1] * 6 + [2] * 4])
  y, _ = gated_deltanet.short_conv(x, taps, segment_ids=seg)
  alone = [gated_deltanet.short_conv(x[:, s], taps)[0] for s in (slice(0, 6), slice(6, 10))]
  np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.concatenate(alone, 1)), atol=1e-6)
  # Decoding: the conv over a prompt's tail and the next tokens equals the conv over both.
  full, _ = gated_deltanet.short_conv(x, taps)
  _, tail = gated_deltanet.short_conv(x[:, :7], taps)
  rest, _ = gated_deltanet.short_conv(x[:, 7:], taps, tail)
  np.testing.assert_allclose(np.asarray(rest), np.asarray(full[:, 7:]), atol=1e-6)


def test_common_oracles(attn):
  x, pos = oracles.random_inputs()
  oracles.check_causality(attn, x, pos)
  oracles.check_decode_matches_forward(attn, x, pos, prompt_len=5)
  oracles.check_segments_isolated(attn, x)
  oracles.check_gradients_finite(attn, x, pos)


def test_cache_is_constant_in_the_length(attn):
  small, large = attn.init_cache(2, 16), attn.init_cache(2, 4096)
  assert jax.tree.map(jnp.shape, small) == jax.tree.map(jnp.shape, large)
  assert small["state"].shape == (2, 4, 8, 16) and small["conv"].shape == (2, 3, 2 * 32 + 64)


def test_runs_on_the_kernels_where_they_exist():
  """On a GPU (here simulated) the layer's forward and backward are the delta-rule kernels
  (their numerics: tests/kernels/test_delta_rule_*.py)."""
  attn = oracles.build("gated_deltanet", impl="auto", head_dim=16)
  x, pos = oracles.random_inputs(length=20)

  def loss(x):
    return jnp.sum(attn(x, positions=pos)[0] ** 2)
  with dispatch.interpret_kernels("gpu"):
    names = pallas_call_names(jax.grad(loss), x)
  assert sorted(names) == [f"delta_rule_{s}" for s in STAGES]
  assert pallas_call_names(jax.grad(loss), x) == []  # auto on this CPU: the xla path


@pytest.mark.parametrize("fields,match", [
    (dict(gated_deltanet={"expand_v": 0.3}), "gated_deltanet.expand_v=0.3"),
    (dict(gated_deltanet={"conv_size": 0}), "conv_size=0"),
    (dict(num_kv_heads=2), "num_kv_heads"),
    (dict(window=8), "window"),
])
def test_bad_options_name_the_field(fields, match):
  with pytest.raises(ValueError, match=match):
    oracles.build("gated_deltanet", **fields)


def test_bidirectional_is_refused(attn):
  x, pos = oracles.random_inputs(length=4)
  with pytest.raises(ValueError, match="model.causal=True"):
    attn(x, positions=pos, causal=False)
