"""softmax (MHA/GQA/MQA) against a naive per-head loop, the cuDNN packed path (emulated) and its
fallback, the sliding window's decode (a ring cache of W slots). The common oracles are in
test_mechanisms.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.attention import base
from effattn.kernels.softmax import api as ops
from effattn.kernels.softmax import cudnn, reference_attention
from effattn.testing import assert_close, oracles
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import Jitted, build


def naive_attention(q, k, v, mask):
  """Per-head numpy loop with explicit repeat of K/V heads: the most literal form."""
  q, k, v, mask = map(np.asarray, (q, k, v, mask))
  b, t, h, d = q.shape
  group = h // k.shape[2]
  out = np.zeros_like(q, dtype=np.float64)
  for bi in range(b):
    for hi in range(h):
      s = q[bi, :, hi] @ k[bi, :, hi // group].T / np.sqrt(d)
      s = np.where(mask[bi, 0], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[bi, :, hi] = p @ v[bi, :, hi // group]
  return out


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 3)])
def test_softmax_attention_matches_naive(impl, num_kv_heads, causal, window):
  keys = jax.random.split(jax.random.key(0), 3)
  b, t, h, d = 2, 9, 4, 8
  q = jax.random.normal(keys[0], (b, t, h, d))
  k = jax.random.normal(keys[1], (b, t, num_kv_heads, d))
  v = jax.random.normal(keys[2], (b, t, num_kv_heads, d))
  idx = base.sequence_index(b, t)
  mask = base.attention_mask(idx, idx, causal=causal, window=window)
  got = ops.softmax_attention(q, k, v, causal=causal, window=window, impl=impl)
  assert_close("o", naive_attention(q, k, v, mask), got, reduction=t)


def test_softmax_attention_segment_mask_matches_naive():
  keys = jax.random.split(jax.random.key(1), 3)
  b, t, h, d = 2, 10, 2, 8
  q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in keys)
  seg = jnp.array([[1] * 4 + [2] * 4 + [0] * 2, [1] * 10])
  idx = base.sequence_index(b, t)
  mask = base.attention_mask(idx, idx, causal=True, q_segment_ids=seg, k_segment_ids=seg)
  for impl in ("reference", "xla"):
    want = naive_attention(q, k, v, mask)
    got = ops.softmax_attention(q, k, v, causal=True, mask=mask, impl=impl)
    assert_close(f"{impl} with a mask", want, got, reduction=t)
    got = ops.softmax_attention(q, k, v, causal=True, segment_ids=seg, impl=impl)
    assert_close(f"{impl} with segment_ids", want, got, reduction=t)


def test_packed_segments_lists_every_run():
  seg = np.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3], [1, 2, 1, 2, 2, 2, 0]])
  lengths, offsets, count = map(np.asarray, cudnn.packed_segments(jnp.asarray(seg), 4))
  np.testing.assert_array_equal(count, [3, 1, 5])
  np.testing.assert_array_equal(lengths[:2], [[3, 2, 2, -1], [7, -1, -1, -1]])
  np.testing.assert_array_equal(offsets[:2], [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]])
  # Row 2 has 5 runs for 4 slots: the caller sees count > M and must not use the layout.
  np.testing.assert_array_equal(offsets[2, :4], [0, 1, 2, 3])


def _emulated_cudnn(q, k, v, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale, mask_type,
                    sliding_window_length):
  """cuDNN's packed semantics in jnp (q and k share the layout here): runs from the offsets."""
  del kv_seqlen, kv_offsets
  t = q.shape[1]
  pos = jnp.arange(t)
  inside = ((pos[None, None, :] >= q_offsets[:, :-1, None])
            & (pos[None, None, :] < q_offsets[:, :-1, None] + q_seqlen[..., None])
            & (q_seqlen[..., None] > 0))  # [B, M, T]
  run = jnp.argmax(inside, axis=1) + jnp.where(inside.any(1), 0, -10 ** 6)
  causal = mask_type == cudnn.jax_cudnn.MaskType.PADDING_CAUSAL
  mask = (run[:, :, None] == run[:, None, :]) & (run[:, :, None] >= 0)
  if causal:
    mask &= pos[None, None, :] <= pos[None, :, None]
  if sliding_window_length is not None:
    mask &= pos[None, :, None] - pos[None, None, :] < sliding_window_length
  return reference_attention(q, k, v, mask[:, None], scale=scale)


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 9)])
def test_cudnn_packed_path_and_its_fallback(monkeypatch, causal, window):
  """The cuDNN call gets runs that reproduce the segment mask; a row with more runs than
  max_segments goes to the block-sparse kernel (query-chunked XLA with a window). (cuDNN itself is checked on the GPU:
  scripts/bench_train.py --check_packed.)"""
  if not cudnn.PACKED_API:
    pytest.skip("this jax has no cuDNN packed-segment API")
  monkeypatch.setattr(cudnn.jax_cudnn, "dot_product_attention", _emulated_cudnn)
  keys = jax.random.split(jax.random.key(2), 3)
  b, t, h, d = 2, 70, 2, 16
  q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in keys)
  few = jnp.array([[1] * 30 + [2] * 30 + [0] * 10, [1] * 70])
  many = jnp.array([[1, 2] * 20 + [3] * 30, [1] * 70])  # 41 runs in row 0
  for seg in (few, many):
    want = ops.softmax_attention(q, k, v, causal=causal, segment_ids=seg, window=window,
                                 impl="reference")
    got, fallback_frac = cudnn.packed_attention(q, k, v, seg, causal=causal, window=window,
                                                scale=None, max_segments=4)
    assert_close("o", want, got, reduction=t)
    # The whole batch takes the fallback when one row has more runs than max_segments.
    assert float(fallback_frac) == (1.0 if seg is many else 0.0)


def test_segment_ids_with_a_mask_is_refused():
  q = jnp.zeros((1, 4, 2, 8))
  seg = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="segment_ids"):
    ops.softmax_attention(q, q, q, causal=True, segment_ids=seg,
                          mask=jnp.ones((1, 1, 4, 4), bool))
  with pytest.raises(ValueError, match="segment_ids"):
    ops.softmax_attention(q, q, q, causal=True, segment_ids=seg[:, :3])


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_softmax_module_window_decode(num_kv_heads):
  """The ring cache of W slots: token by token, after a prompt, and in prefill chunks (one
  longer than W, prompt lengths not multiples of W) equals the forward pass."""
  attn = Jitted(build("softmax", window=4, num_kv_heads=num_kv_heads))
  x, pos = random_inputs(length=13)
  oracles.check_causality(attn, x, pos)
  oracles.check_decode_matches_forward(attn, x, pos)
  oracles.check_decode_matches_forward(attn, x, pos, prompt_len=3)
  cache = oracles.check_decode_in_chunks(attn, x, pos, (6, 1, 3), max_len=1000)
  assert cache["k"].shape[1] == 4 and int(cache["index"]) == 13


def test_window_cache_has_window_slots_whatever_max_len():
  attn = build("softmax", window=4, num_kv_heads=2)
  small, large = attn.init_cache(2, 3), attn.init_cache(2, 4096)
  assert jax.tree.map(jnp.shape, small) == jax.tree.map(jnp.shape, large)
  assert small["k"].shape == (2, 4, 2, 8)
  x, pos = random_inputs(length=2)
  with pytest.raises(ValueError, match="window=4 keeps a ring of 4 cache slots, this cache has 9"):
    attn.decode(x, positions=pos, cache=build("softmax", num_kv_heads=2).init_cache(2, 9))


def test_bidirectional_sees_future():
  attn = build("softmax")
  x, pos = random_inputs()
  y, _ = attn(x, positions=pos, causal=False)
  y2, _ = attn(x.at[:, -1].add(1.0), positions=pos, causal=False)
  assert not np.allclose(np.asarray(y[:, 0]), np.asarray(y2[:, 0]))


def test_bad_kv_heads_named():
  with pytest.raises(ValueError, match="num_kv_heads"):
    build("softmax", num_kv_heads=3)


def test_bad_impl_named():
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="impl"):
    ops.softmax_attention(q, q, q, causal=True, impl="flash")
