"""mala, its own oracles: scores sum to 1, query magnitude sharpens them, the official formula,
and the official extras (RoPE, lepe, output gate) through the common oracles. The common oracles
of the paper's form are in test_mechanisms.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.attention import mala
from effattn.testing import assert_close, oracles
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import Jitted, build


def features(seed=0, b=2, t=9, h=2, d=8):
  keys = jax.random.split(jax.random.key(seed), 3)
  q, k = (jax.nn.elu(jax.random.normal(kk, (b, t, h, d))) + 1 for kk in keys[:2])
  return q, k, jax.random.normal(keys[2], (b, t, h, d))


@pytest.mark.parametrize("causal", [True, False])
def test_scores_sum_to_one_and_give_the_output(causal):
  q, k, v = features()
  scores = mala.mala_scores(q, k, causal=causal)
  assert_close("score row sums", 1.0, scores.sum(-1), reduction=q.shape[1])
  assert float(scores.min()) < 0  # the offset makes some scores negative
  want = jnp.einsum("bhij,bjhd->bihd", mala.mala_scores(q, k, causal=causal, eps=1e-6), v)
  got, _ = mala.mala_attention(q, k, v, causal=causal, impl="xla")
  assert_close("o", want, got, reduction=q.shape[1])


def test_query_magnitude_sharpens_mala_but_not_linear_attention():
  q, k, _ = features(seed=1)
  peaks, linear_peaks = [], []
  for c in (1.0, 2.0, 4.0):
    peaks.append(float(mala.mala_scores(c * q, k, causal=False).max()))
    s = jnp.einsum("bihd,bjhd->bhij", c * q, k)
    linear_peaks.append(float((s / s.sum(-1, keepdims=True)).max()))
  assert peaks[0] < peaks[1] < peaks[2]
  assert_close("linear attention's peaks", linear_peaks[0], np.asarray(linear_peaks),
               reduction=q.shape[1])


def test_bidirectional_equals_the_official_code():
  """qhfan/MALA AddLinearAttention (without RoPE/lepe/gate), transcribed in numpy."""
  q, k, v = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in features(seed=2))
  n, d = q.shape[2], q.shape[3]
  scale = d ** -0.5
  z = q @ k.mean(axis=2, keepdims=True).swapaxes(-1, -2) * scale
  kv = (k.swapaxes(-1, -2) * (scale / n) ** 0.5) @ (v * (scale / n) ** 0.5)
  want = q @ kv * (1 + 1 / (z + 1e-6)) - z * v.mean(axis=2, keepdims=True)
  got, _ = mala.mala_attention(*features(seed=2), causal=False, impl="xla")
  assert_close("o", want.transpose(0, 2, 1, 3), got, reduction=n)


def test_segment_cumsum_restarts_per_run():
  x = jnp.arange(1.0, 8.0)[None, :, None]
  runs = jnp.array([[0, 0, 0, 1, 1, 2, 2]])
  np.testing.assert_array_equal(np.asarray(mala.segment_cumsum(x, runs))[0, :, 0],
                                [1, 3, 6, 4, 9, 6, 13])
  np.testing.assert_array_equal(np.asarray(mala.segment_cumsum(x, runs, reverse=True))[0, :, 0],
                                [6, 5, 3, 9, 5, 13, 7])


def test_official_extras_keep_the_common_oracles():
  """RoPE on the numerator, the lepe convolution of v (a tail in the decode state), the gate."""
  module = build("mala", mala={"rope": True, "lepe_kernel": 3, "output_gate": True})
  attn = Jitted(module)
  x, pos = random_inputs()
  oracles.check_causality(attn, x, pos)
  oracles.check_decode_matches_forward(attn, x, pos)
  oracles.check_decode_matches_forward(attn, x, pos, prompt_len=5)
  oracles.check_segments_isolated(attn, x)
  oracles.check_segments_isolated(attn, x, causal=False)
  oracles.check_gradients_finite(module, x, pos)
