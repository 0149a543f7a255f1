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



def test_backward_keeps_only_the_input_not_a_copy_per_tap(capsys):
  """The conv is rematerialized: its gradient saves x (and the taps, ids), never the K
  shifted, masked [B, T, C] copies autodiff would keep."""
  from jax.ad_checkpoint import print_saved_residuals
  x = jnp.ones((2, 16, 8), jnp.float32)
  taps, seg = jnp.ones((4, 8), jnp.float32), jnp.ones((2, 16), jnp.int32)
  print_saved_residuals(lambda x, taps: jnp.sum(short_conv(x, taps, segment_ids=seg)[0] ** 2),
                        x, taps)
  saved = capsys.readouterr().out.splitlines()
  wide = [line for line in saved if "[2,16,8]" in line]
  assert len(wide) <= 2, saved  # x, and the conv's output for the square's gradient
