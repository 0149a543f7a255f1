"""landmark, the spec's own oracles: the naive grouped softmax, rows sum to 1, one block is
causal softmax, retrieving fewer blocks changes far context only, decoding past the training
length, and the kernel path's runtime fallback in aux. The common oracles (with every block
retrieved: decode equals the forward pass) are in test_mechanisms.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effattn.attention import base
from effattn.attention.landmark import block_groups
from effattn.kernels.grouped_softmax import (chunked_grouped_softmax_attention,
                                             grouped_softmax_attention)
from effattn.kernels.softmax import reference_attention
from effattn.kernels import dispatch
from effattn.testing import assert_close
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import Jitted, build


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
  assert_close("weights", want_a, a[0], reduction=t)
  assert_close("o", want_o, o[0], reduction=t)
  assert_close("row sums", 1.0, a.sum(-1), reduction=t)


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

  w = jax.random.normal(jax.random.key(1), q.shape)

  @jax.jit  # one program for both paths and their gradients (eager dispatch was most of it)
  def both(q, k, v, k_land):
    grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2, 3))  # noqa: E731
    args = (q, k, v, k_land)
    return dense(*args), chunked(*args), grads(dense)(*args), grads(chunked)(*args)

  o_dense, o_chunk, g_dense, g_chunk = both(q, k, v, k_land)
  assert_close("o", o_dense, o_chunk, reduction=t)
  for name, got, want in zip(("dq", "dk", "dv", "dk_land"), g_chunk, g_dense):
    assert_close(name, want, got, reduction=t)


def test_one_block_is_causal_softmax():
  attn = build("landmark", landmark={"block_len": 64})
  x, pos = random_inputs(length=12)
  y, _ = attn(x, positions=pos)
  q = base.apply_rope(base.split_heads(attn.q_proj(x), 4), pos, attn.rope_theta)
  k = base.apply_rope(base.split_heads(attn.k_proj(x), 4), pos, attn.rope_theta)
  v = base.split_heads(attn.v_proj(x), 4)
  idx = base.sequence_index(2, 12)
  o = reference_attention(q, k, v, base.attention_mask(idx, idx, causal=True))
  assert_close("y", attn.o_proj(base.merge_heads(o)), y, reduction=12)


def test_retrieval_of_fewer_blocks_changes_far_context_only():
  x, pos = random_inputs(length=20)
  full = build("landmark", landmark={"block_len": 4, "top_k": 100})
  few = build("landmark", landmark={"block_len": 4, "top_k": 1})

  def decode_all(attn):
    cache = attn.init_cache(2, 20, x.dtype)
    y, _ = attn.decode(x, positions=pos, cache=cache)
    return np.asarray(y)

  y_full, y_few = decode_all(full), decode_all(few)
  # Queries in the first two blocks see at most one earlier block: identical.
  assert_close("first two blocks", y_full[:, :8], y_few[:, :8], reduction=20)
  assert not np.allclose(y_few[:, 12:], y_full[:, 12:], atol=1e-4)


def test_decoding_past_the_training_length():
  attn = Jitted(build("landmark", landmark={"block_len": 4, "top_k": 2}))
  x, pos = random_inputs(length=40)
  cache = attn.init_cache(2, 40, x.dtype)
  y, cache = attn.decode(x[:, :12], positions=pos[:, :12], cache=cache)
  for i in range(12, 40):
    y, cache = attn.decode(x[:, i:i + 1], positions=pos[:, i:i + 1], cache=cache)
  assert np.all(np.isfinite(np.asarray(y))) and int(cache["index"]) == 40


def naive_top_k_decode(q, k, v, k_land, block_len, top_k):
  """Retrieval at decode by the spec, one query at a time: the own block's tokens <= i and the
  top_k earlier blocks by landmark score q . k_land (q, k, v, k_land [T, H, D]; k_land per
  block), grouped softmax over them. Returns o [T, H, D]."""
  q, k, v, k_land = (np.asarray(a, np.float64) for a in (q, k, v, k_land))
  t, h, d = q.shape
  out = np.zeros_like(q)
  for hi in range(h):
    for i in range(t):
      b = i // block_len
      s_land = k_land[:b, hi] @ q[i, hi] / np.sqrt(d)
      chosen = np.argsort(-s_land)[:top_k]
      own = np.arange(b * block_len, i + 1)
      logits = np.concatenate([k[own, hi] @ q[i, hi] / np.sqrt(d), s_land[chosen]])
      p = np.exp(logits - logits.max())
      p /= p.sum()
      out[i, hi] = p[:len(own)] @ v[own, hi]
      for n, c in enumerate(chosen):
        members = np.arange(c * block_len, (c + 1) * block_len)
        e = np.exp(k[members, hi] @ q[i, hi] / np.sqrt(d))
        out[i, hi] += p[len(own) + n] * (e / e.sum()) @ v[members, hi]
  return out


def test_decode_retrieves_the_top_k_blocks_of_the_spec():
  """Token-by-token decode with top_k = 2 of up to 7 earlier blocks equals the spec's retrieval
  with the forward pass's landmark keys (a wrongly picked block would change the output)."""
  t, blen = 32, 4
  attn = Jitted(build("landmark", landmark={"block_len": blen, "top_k": 2}))
  module = attn.module
  x, pos = random_inputs(length=t)
  cache = attn.init_cache(2, t, x.dtype)
  ys = []
  for i in range(t):
    y, cache = attn.decode(x[:, i:i + 1], positions=pos[:, i:i + 1], cache=cache)
    ys.append(y)
  h = module.num_heads
  q = base.apply_rope(base.split_heads(module.q_proj(x), h), pos, module.rope_theta)
  k_raw = base.split_heads(module.k_proj(x), h)
  k = base.apply_rope(k_raw, pos, module.rope_theta)
  v = base.split_heads(module.v_proj(x), h)
  k_land = module.landmark_keys(k_raw, pos, block_groups(pos, None, blen))  # [B, G, H, D]
  o = np.stack([naive_top_k_decode(q[r], k[r], v[r], k_land[r], blen, 2) for r in range(2)])
  want = module.o_proj(base.merge_heads(jnp.asarray(o, jnp.float32)))
  assert_close("y", want, jnp.concatenate(ys, 1), reduction=t)


def _decode_step_temp_bytes(module, capacity):
  """Compiled temporaries of one jitted one-token decode step (cache donated) at `capacity`."""
  graphdef, state = nnx.split(module)
  cache = jax.eval_shape(lambda: module.init_cache(2, capacity, jnp.float32))
  x = jax.ShapeDtypeStruct((2, 1, 32), jnp.float32)
  pos = jax.ShapeDtypeStruct((2, 1), jnp.int32)
  step = jax.jit(lambda s, c, x, p: nnx.merge(graphdef, s).decode(x, positions=p, cache=c),
                 donate_argnums=(1,))
  compiled = step.lower(state, cache, x, pos).compile()
  cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
  return compiled.memory_analysis().temp_size_in_bytes, cache_bytes


def test_decode_step_temporaries_do_not_grow_like_the_cache():
  """One decode step reads the landmarks and top_k + 1 blocks: going from 2k to 32k tokens of
  cache, its temporaries grow by far less than the cache (a transposed, gathered-from or f32
  copy of the cache would grow by at least as much)."""
  module = build("landmark", landmark={"block_len": 8, "top_k": 2})
  temp_small, cache_small = _decode_step_temp_bytes(module, 2048)
  temp_large, cache_large = _decode_step_temp_bytes(module, 32768)
  assert temp_large - temp_small < 0.05 * (cache_large - cache_small), (
      temp_small, temp_large, cache_small, cache_large)


def test_bad_options_named():
  with pytest.raises(ValueError, match="block_len"):
    build("landmark", landmark={"block_len": 0})
  with pytest.raises(ValueError, match="query_chunk"):
    build("landmark", landmark={"query_chunk": -1})
  with pytest.raises(ValueError, match="num_kv_heads"):
    build("landmark", num_kv_heads=2)


def _packed(b, t):
  """Row 0: two packed segments + padding; row 1: one segment that starts mid-block (positions
  from 3) + padding. (positions, segment_ids) [B, T]."""
  seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  a, c = t // 3, t - t // 5
  seg[0, :a], seg[0, a:c] = 1, 2
  pos[0, :a], pos[0, a:c] = np.arange(a), np.arange(c - a)
  seg[1, :c], pos[1, :c] = 1, np.arange(c) + 3
  return jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize("max_groups,want", [(0, 0.0), (2, 1.0)])
def test_runtime_fallback_is_reported_in_aux(max_groups, want):
  """The kernel path (interpreted as on a GPU) says in aux how many rows took the lax.cond
  fallback: none with room for every block, all when the layout holds 2 blocks; either way the
  output is the xla path's."""
  opts = {"block_len": 8, "tile": 16, "query_chunk": 8}
  module = build("landmark", num_heads=2, impl="auto", landmark={**opts, "max_groups": max_groups})
  x, _ = random_inputs(batch=2, length=30)
  pos, seg = _packed(2, 30)
  with dispatch.interpret_kernels("gpu"):
    y, aux = module(x, positions=pos, segment_ids=seg)
  assert float(aux["grouped_softmax_fallback_frac"]) == want
  y_ref, aux_ref = build("landmark", num_heads=2, impl="xla", landmark=opts)(
      x, positions=pos, segment_ids=seg)
  assert "grouped_softmax_fallback_frac" not in aux_ref  # a path with no runtime fallback
  real = np.asarray(seg)[..., None] > 0
  assert_close("y", np.where(real, y_ref, 0), np.where(real, y, 0), reduction=30)
