"""landmark: the common oracles and the spec's own (naive grouped softmax, rows sum to 1, one
block is causal softmax, retrieval with k = all blocks equals the full grouped softmax)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.attention import base
from effattn.attention.landmark import block_groups
from effattn.kernels.grouped_softmax import (chunked_grouped_softmax_attention,
                                             grouped_softmax_attention)
from effattn.kernels.softmax import reference_attention
from tests.attention import oracles
from tests.attention.test_routing import Jitted


def test_common_oracles_with_retrieval_of_all_blocks():
  # Chunked with a ragged last chunk; the dense form equals it (test below).
  module = oracles.build("landmark", landmark={"block_len": 4, "top_k": 100, "query_chunk": 4})
  attn = Jitted(module)
  x, pos = oracles.random_inputs(length=14)
  oracles.check_causality(attn, x, pos)
  oracles.check_decode_matches_forward(attn, x, pos, prompt_len=6)  # prefill + token steps
  oracles.check_segments_isolated(attn, x)
  oracles.check_gradients_finite(module, x, pos)


def _random(t=11, h=2, d=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(kk, (1, t, h, d)) for kk in ks[:3])
  k_land = jax.random.normal(ks[3], (1, t, h, d))
  return q, k, v, k_land


def naive_grouped(q, k, v, k_land, block_len):
  """The spec's formula, one query at a time (no segments)."""
  q, k, v, k_land = (np.asarray(a, np.float64)[0] for a in (q, k, v, k_land))
  t, h, d = q.shape
  out, weights = np.zeros_like(q), np.zeros((h, t, t))
  for hi in range(h):
    for i in range(t):
      b = i // block_len
      own = [j for j in range(b * block_len, i + 1)]
      s = lambda j: q[i, hi] @ k[j, hi] / np.sqrt(d)  # noqa: E731
      s_land = [q[i, hi] @ k_land[c, hi] / np.sqrt(d) for c in range(b)]
      logits = np.array([s(j) for j in own] + s_land)
      p = np.exp(logits - logits.max())
      p /= p.sum()
      for n, j in enumerate(own):
        weights[hi, i, j] = p[n]
      for c in range(b):
        members = list(range(c * block_len, (c + 1) * block_len))
        e = np.exp(np.array([s(j) for j in members]) - max(s(j) for j in members))
        weights[hi, i, members] = e / e.sum() * p[len(own) + c]
      out[i, hi] = weights[hi, i] @ v[:, hi]
  return out, weights


def test_grouped_softmax_matches_the_formula_and_rows_sum_to_one():
  q, k, v, k_land = _random()
  t = q.shape[1]
  pos = base.sequence_index(1, t)
  gid = block_groups(pos, None, 3)
  o, a = grouped_softmax_attention(q, k, v, k_land, gid, jnp.ones((1, t), jnp.int32),
                                   scale=8 ** -0.5)
  want_o, want_a = naive_grouped(q, k, v, k_land, 3)
  np.testing.assert_allclose(np.asarray(a[0]), want_a, atol=1e-5)
  np.testing.assert_allclose(np.asarray(o[0]), want_o, atol=1e-5)
  np.testing.assert_allclose(np.asarray(a.sum(-1)), 1.0, atol=1e-5)


@pytest.mark.parametrize("t,chunk,block_len", [(13, 4, 3), (7, 16, 2)])
def test_chunked_equals_dense_with_segments(t, chunk, block_len):
  q, k, v, k_land = _random(t=t, seed=t)
  seg = jnp.asarray([[1] * (t // 2) + [2] * (t - t // 2)])  # two packed segments
  pos = jnp.concatenate([jnp.arange(t // 2), jnp.arange(t - t // 2)])[None]
  gid = block_groups(pos, seg, block_len)

  def dense(q, k, v, k_land):
    return grouped_softmax_attention(q, k, v, k_land, gid, seg, scale=0.3)[0]

  def chunked(q, k, v, k_land):
    return chunked_grouped_softmax_attention(q, k, v, k_land, gid, seg, scale=0.3, chunk=chunk)

  np.testing.assert_allclose(np.asarray(chunked(q, k, v, k_land)),
                             np.asarray(dense(q, k, v, k_land)), atol=1e-5)
  w = jax.random.normal(jax.random.key(1), q.shape)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * w)  # noqa: E731
  g_dense = jax.grad(loss(dense), argnums=(0, 1, 2, 3))(q, k, v, k_land)
  g_chunk = jax.grad(loss(chunked), argnums=(0, 1, 2, 3))(q, k, v, k_land)
  for got, want in zip(g_chunk, g_dense):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_one_block_is_causal_softmax():
  attn = oracles.build("landmark", landmark={"block_len": 64})
  x, pos = oracles.random_inputs(length=12)
  y, _ = attn(x, positions=pos)
  q = base.apply_rope(base.split_heads(attn.q_proj(x), 4), pos, attn.rope_theta)
  k = base.apply_rope(base.split_heads(attn.k_proj(x), 4), pos, attn.rope_theta)
  v = base.split_heads(attn.v_proj(x), 4)
  idx = base.sequence_index(2, 12)
  o = reference_attention(q, k, v, base.attention_mask(idx, idx, causal=True))
  np.testing.assert_allclose(np.asarray(y), np.asarray(attn.o_proj(base.merge_heads(o))),
                             atol=1e-5)


def test_retrieval_of_fewer_blocks_changes_far_context_only():
  x, pos = oracles.random_inputs(length=20)
  full = oracles.build("landmark", landmark={"block_len": 4, "top_k": 100})
  few = oracles.build("landmark", landmark={"block_len": 4, "top_k": 1})

  def decode_all(attn):
    cache = attn.init_cache(2, 20, x.dtype)
    y, _ = attn.decode(x, positions=pos, cache=cache)
    return np.asarray(y)

  y_full, y_few = decode_all(full), decode_all(few)
  # Queries in the first two blocks see at most one earlier block: identical.
  np.testing.assert_allclose(y_few[:, :8], y_full[:, :8], atol=1e-5)
  assert not np.allclose(y_few[:, 12:], y_full[:, 12:], atol=1e-4)


def test_decoding_past_the_training_length():
  attn = Jitted(oracles.build("landmark", landmark={"block_len": 4, "top_k": 2}))
  x, pos = oracles.random_inputs(length=40)
  cache = attn.init_cache(2, 40, x.dtype)
  y, cache = attn.decode(x[:, :12], positions=pos[:, :12], cache=cache)
  for i in range(12, 40):
    y, cache = attn.decode(x[:, i:i + 1], positions=pos[:, i:i + 1], cache=cache)
  assert np.all(np.isfinite(np.asarray(y))) and int(cache["index"]) == 40


def test_bad_options_named():
  with pytest.raises(ValueError, match="block_len"):
    oracles.build("landmark", landmark={"block_len": 0})
  with pytest.raises(ValueError, match="query_chunk"):
    oracles.build("landmark", landmark={"query_chunk": -1})
  with pytest.raises(ValueError, match="num_kv_heads"):
    oracles.build("landmark", num_kv_heads=2)
