"""lightning, its own oracles: the official decay schedules, the whole block equals its recurrent
form, strong decay forgets the past. The common oracles are in test_mechanisms.py."""

import numpy as np
import pytest

from effattn.attention import lightning
from effattn.testing import assert_close
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import build


def test_slopes_and_schedules_match_the_official_code():
  np.testing.assert_allclose(lightning.alibi_slopes(8), [2.0 ** (-i) for i in range(1, 9)])
  # Non power of two: the 4 slopes of H=4, then every other slope of H=8.
  np.testing.assert_allclose(lightning.alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8,
                                                         2 ** -1, 2 ** -3])
  tnl = lightning.decay_schedule("tnl", 4, layer_idx=1, num_layers=3)
  np.testing.assert_allclose(tnl, -np.array([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]) * (0.5 + 1e-5))
  assert np.all(np.isfinite(lightning.decay_schedule("tnl", 4, 0, 1)))
  np.testing.assert_allclose(lightning.decay_schedule("fla", 4, 1, 2), [0, -1, -2, -3])


def test_block_equals_its_recurrent_form():
  """o_t = q_t S_t, S_t = lambda S_{t-1} + k_t^T v_t; y = W_o(SRMSNorm(o) * u), in numpy."""
  attn = build("lightning", num_heads=2, d_model=16,
               lightning={"log_decay": (-0.3, -0.02)})
  x, pos = random_inputs(length=7, d_model=16)
  y, _ = attn(x, positions=pos)
  w = {n: np.asarray(getattr(attn, n).kernel.value, np.float64)
       for n in ("q_proj", "k_proj", "v_proj", "u_proj", "o_proj")}
  silu = lambda a: a / (1 + np.exp(-a))
  xn = np.asarray(x, np.float64)
  b, t, _ = xn.shape
  q, k = silu(xn @ w["q_proj"]).reshape(b, t, 2, 8), silu(xn @ w["k_proj"]).reshape(b, t, 2, 8)
  v = (xn @ w["v_proj"]).reshape(b, t, 2, 8)
  lam = np.exp([-0.3, -0.02])[None, :, None, None]
  s = np.zeros((b, 2, 8, 8))
  o = np.zeros((b, t, 2, 8))
  for i in range(t):
    s = lam * s + np.einsum("bhd,bhe->bhde", k[:, i], v[:, i])
    o[:, i] = np.einsum("bhd,bhde->bhe", q[:, i], s)
  o = o.reshape(b, t, 16)
  o = o / np.sqrt((o ** 2).mean(-1, keepdims=True) + 1e-6) * (xn @ w["u_proj"])
  assert_close("y", o @ w["o_proj"], y, reduction=t)


def test_strong_decay_forgets_the_past():
  attn = build("lightning", lightning={"log_decay": (-60.0,) * 4})
  x, pos = random_inputs()
  y, _ = attn(x, positions=pos)
  y2, _ = attn(x.at[:, :5].add(1.0), positions=pos)
  assert_close("outputs after the change", y[:, 6:], y2[:, 6:])


@pytest.mark.parametrize("options,match", [({"log_decay": (0.1, 0, 0, 0)}, "log_decay needs 4"),
                                           ({"decay": "alibi"}, "lightning.decay='alibi'"),
                                           ({"act": "gelu"}, "lightning.act='gelu'")])
def test_bad_options_name_the_field(options, match):
  with pytest.raises(ValueError, match=match):
    build("lightning", lightning=options)
