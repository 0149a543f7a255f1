"""The short causal depthwise conv: against a float64 numpy loop, at segment starts, and
continued from a decoding tail (its split over mesh.sequence is in test_context_parallel.py)."""

import jax.numpy as jnp
import numpy as np

from effattn.kernels.short_conv import short_conv
from effattn.testing import assert_close


def test_matches_the_definition():
  rng = np.random.default_rng(1)
  x, taps = rng.standard_normal((2, 9, 5)), rng.standard_normal((3, 5))
  want = np.zeros_like(x)
  for t in range(9):
    for lag in range(3):
      if t - lag >= 0:
        want[:, t] += taps[2 - lag] * x[:, t - lag]
  y, tail = short_conv(jnp.asarray(x, jnp.float32), jnp.asarray(taps, jnp.float32))
  assert_close("conv", want, y, reduction=3)
  np.testing.assert_array_equal(np.asarray(tail), np.asarray(x[:, -2:], np.float32))


def test_short_conv_stops_at_segment_starts_and_continues_from_its_tail():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 10, 3)), jnp.float32)
  taps = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
  seg = jnp.asarray([[1] * 6 + [2] * 4])
  y, _ = short_conv(x, taps, segment_ids=seg)
  alone = [short_conv(x[:, s], taps)[0] for s in (slice(0, 6), slice(6, 10))]
  assert_close("segments", jnp.concatenate(alone, 1), y, reduction=4)
  # Decoding: the conv over a prompt's tail and the next tokens equals the conv over both.
  full, _ = short_conv(x, taps)
  _, tail = short_conv(x[:, :7], taps)
  rest, _ = short_conv(x[:, 7:], taps, tail)
  assert_close("decoded tail", full[:, 7:], rest, reduction=4)
