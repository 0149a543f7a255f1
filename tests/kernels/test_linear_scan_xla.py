"""The chunked jnp path against the reference, including chunk sizes that do not divide T."""

import jax
import jax.numpy as jnp
import pytest

from effattn.kernels.linear_scan import reference, segment_runs, xla
from tests.kernels.linear_scan_test_base import LinearScanSuite, assert_close, two_segments


class TestXla(LinearScanSuite):
  IMPL = "xla"
  CHUNK = 8


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_any_chunk_size(chunk):
  """Chunks of 1 (the recurrence), not dividing T, and longer than T; both directions."""
  keys = jax.random.split(jax.random.key(chunk), 4)
  b, t, h, d = 2, 16, 2, 4
  q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in keys[:3])
  s0 = jax.random.normal(keys[3], (b, h, d, d))
  g = jnp.array([-0.1, -4.0])
  seg = two_segments(b, t, 7)

  @jax.jit
  def run(q, k, v, s0):
    out = []
    for reverse in (False, True):
      out.append(reference.scan_quadratic(q, k, v, g, reverse=reverse, initial_state=s0,
                                          segment_ids=seg))
      out.append(xla.scan_chunked(q, k, v, g, s0, segment_runs(seg), reverse=reverse,
                                  chunk_size=chunk))
    return out
  for want, got in zip(*[iter(run(q, k, v, s0))] * 2):
    assert_close("o", want[0], got[0], jnp.float32, t)
    assert_close("final_state", want[1], got[1], jnp.float32, t)


def test_chunk_coefficients_mask_padding():
  decay, w_q, w_k, keep = xla.chunk_coefficients(jnp.float32(-1.0), 3, 5, reverse=False)
  assert float(decay[:, 3:].max()) == 0.0 and float(w_k[3:].max()) == 0.0
  assert abs(float(keep) - float(jnp.exp(-3.0))) < 1e-6
