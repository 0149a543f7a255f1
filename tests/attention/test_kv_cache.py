"""The ring KV cache of sliding-window decoding (effattn/attention/kv_cache.py): slot positions
from `index` alone, a ring filled from outside (random contents, index = P) attended as the
sequence it stands for, chunks longer than the window, and the one-line errors. The mechanisms
that use it are checked in test_softmax.py and test_neural_memory.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.attention import kv_cache
from effattn.kernels.softmax import attention_mask, reference_attention, sequence_index
from effattn.testing import assert_close

W, B, H, H_KV, D = 5, 2, 4, 2, 8


def test_slot_positions_come_from_the_index():
  # After 7 tokens: positions 5, 6 in slots 0, 1 (wrapped), 2, 3, 4 in slots 2..4.
  np.testing.assert_array_equal(kv_cache.slot_positions(jnp.int32(7), W), [5, 6, 2, 3, 4])
  got = np.asarray(kv_cache.slot_positions(jnp.int32(3), W))  # slots 3, 4 still empty
  np.testing.assert_array_equal(got[:3], [0, 1, 2])
  assert (got[3:] < 0).all()
  assert (np.asarray(kv_cache.slot_positions(jnp.int32(0), W)) < 0).all()


@jax.jit
def _ring_call(q, k, v, ring):
  return kv_cache.window_attend(q, k, v, ring, window=W,
                                attend=lambda q, k, v, mask: reference_attention(q, k, v, mask))


@pytest.mark.parametrize("p,t", [(0, 1), (3, 1), (13, 1), (0, 3), (3, 4), (13, 3), (12, 8)])
def test_a_ring_filled_from_outside_is_the_sequence_it_stands_for(p, t):
  """Random ring contents with index = p are the keys at positions p-W .. p-1 (position s in
  slot s % W; slots of negative positions empty, their contents never seen). t new tokens
  attend causally within the window over them and each other, and the ring after holds the
  last W positions of the p + t."""
  keys = jax.random.split(jax.random.key(p * 31 + t), 5)
  ring = {"k": jax.random.normal(keys[0], (B, W, H_KV, D)),
          "v": jax.random.normal(keys[1], (B, W, H_KV, D)), "index": jnp.int32(p)}
  q = jax.random.normal(keys[2], (B, t, H, D))
  k, v = (jax.random.normal(kk, (B, t, H_KV, D)) for kk in keys[3:])
  n = p + t
  full_k, full_v = np.zeros((B, n, H_KV, D), np.float32), np.zeros((B, n, H_KV, D), np.float32)
  for s in range(max(0, p - W), p):
    full_k[:, s], full_v[:, s] = ring["k"][:, s % W], ring["v"][:, s % W]
  full_k[:, p:], full_v[:, p:] = k, v
  mask = attention_mask(sequence_index(B, t, p), sequence_index(B, n), causal=True, window=W)
  want = reference_attention(q, jnp.asarray(full_k), jnp.asarray(full_v), mask)
  got, after = _ring_call(q, k, v, ring)
  assert_close("ring attention", want, got, reduction=W)
  assert int(after["index"]) == n
  for s in range(max(0, n - W), n):
    np.testing.assert_array_equal(np.asarray(after["k"][:, s % W]), full_k[:, s])
    np.testing.assert_array_equal(np.asarray(after["v"][:, s % W]), full_v[:, s])


def test_a_cache_that_does_not_fit_is_one_error_line():
  ring = kv_cache.init(B, W, H_KV, D, jnp.float32)
  attend = lambda q, k, v, mask: q  # noqa: E731  (never reached)
  q, k = jnp.zeros((B, 2, H, D)), jnp.zeros((B, 2, H_KV, D))
  with pytest.raises(ValueError, match="window=4 keeps a ring of 4 cache slots, this cache has 5"):
    kv_cache.window_attend(q, k, k, ring, window=4, attend=attend)
  with pytest.raises(ValueError, match=r"new keys \[B, t, H_kv, D\] = \[2, 2, 1, 8\]"):
    kv_cache.window_attend(q, k[:, :, :1], k[:, :, :1], ring, window=W, attend=attend)
  with pytest.raises(ValueError, match="6 tokens do not fit a cache of max_len=5"):
    kv_cache.check(ring, (B, 6, H_KV, D), what="softmax", window=None)
