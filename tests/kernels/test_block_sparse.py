"""block_sparse: every path (the blocked jnp path, the Triton and Mosaic TPU kernels in interpret
mode) equals reference.py, forward and gradients, with and without a sliding window; with a
window reference.py equals a dense masked softmax written out here.

Gradients go through jax.vjp with random cotangents for o AND lse (never `.sum()`), jitted with
the forward pass (one compile per path and case).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels.block_sparse import (block_sparse_attention, causal_block_mask,
                                          lists_from_block_mask)
from effattn.testing import assert_close
from effattn.testing.inputs import case_key

# (impl, interpret): every path compared with the reference.
PATHS = [("xla", False), ("pallas_gpu", True), ("pallas_tpu", True)]
PATH_IDS = ["xla", "pallas_gpu-interpret", "pallas_tpu-interpret"]


def block_pattern(kind: str, key, b, h, n_q, n_k, block_q, block_k):
  """[B, H, nQ, nK] block masks that exercise list edge cases."""
  if kind == "random":
    m = jax.random.bernoulli(key, 0.4, (b, h, n_q, n_k))
    return m.at[:, :, 0].set(False).at[:, :, -1].set(True)  # an empty and a full row
  if kind == "causal":
    return jnp.broadcast_to(causal_block_mask(n_q, n_k, block_q, block_k), (b, h, n_q, n_k))
  if kind == "full":
    return jnp.ones((b, h, n_q, n_k), bool)
  raise ValueError(kind)


CASES = [
    # name, (B, T, S, H, H_kv, D, bq, bk), pattern, causal, features, dtype
    ("gqa-random-bias", (2, 48, 48, 4, 2, 64, 16, 16), "random", True, ("bias",), jnp.float32),
    ("mha-causal-ragged", (1, 40, 40, 2, 2, 64, 16, 16), "causal", True, (), jnp.float32),
    ("mqa-full-noncausal", (1, 32, 64, 2, 1, 128, 16, 32), "full", False, ("segments",),
     jnp.float32),
    ("threshold-positions", (2, 32, 32, 2, 2, 64, 16, 16), "causal", True,
     ("bias", "threshold", "head_positions"), jnp.float32),
    ("bf16-random", (1, 64, 64, 2, 1, 64, 32, 16), "random", True, ("bias",), jnp.bfloat16),
]


@functools.partial(jax.jit, static_argnames=("impl", "interpret", "bq", "bk", "causal",
                                             "window"))
def _outputs_and_grads(q, k, v, bias, idx, cnt, extra, do, dlse, *, impl, interpret, bq, bk,
                       causal, window=None):
  """(o, lse) and the vjp of (do, dlse) for q, k, v, bias, in one compiled program. dlse is
  zeroed where lse is -inf (a query that sees nothing: lse is compared first)."""
  def f(q, k, v, bias):
    return block_sparse_attention(q, k, v, idx, cnt, block_q=bq, block_k=bk, causal=causal,
                                  kv_bias=bias, window=window, impl=impl, interpret=interpret,
                                  **extra)
  (o, lse), vjp = jax.vjp(f, q, k, v, bias)
  return o, lse, vjp((do, jnp.where(jnp.isfinite(lse), dlse, 0.0)))


@pytest.mark.parametrize("impl,interpret", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("name,dims,pattern,causal,features,dtype", CASES,
                         ids=[c[0] for c in CASES])
def test_matches_reference(impl, interpret, name, dims, pattern, causal, features, dtype):
  b, t, s, h, h_kv, d, bq, bk = dims
  keys = jax.random.split(case_key(name), 10)
  q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, s, h_kv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, s, h_kv, d), jnp.float32).astype(dtype)
  n_q, n_k = -(-t // bq), -(-s // bk)
  idx, cnt = lists_from_block_mask(block_pattern(pattern, keys[3], b, h, n_q, n_k, bq, bk))
  bias = jax.random.normal(keys[4], (b, h_kv, s)) if "bias" in features else None
  extra = {}
  if "segments" in features:
    seg_q = (jnp.arange(t) >= t // 3).astype(jnp.int32)[None].repeat(b, 0)
    seg_k = (jnp.arange(s) >= s // 2).astype(jnp.int32)[None].repeat(b, 0)
    extra.update(q_segment_ids=seg_q, kv_segment_ids=seg_k)
  if "head_positions" in features:
    perm = jax.random.permutation(keys[5], t)
    extra["q_positions"] = jnp.broadcast_to(perm, (b, h, t))
    extra["kv_positions"] = jnp.broadcast_to(perm, (b, h_kv, s))
  if "threshold" in features:
    bias = bias.at[:, :, 3].set(bias[:, :, 5])  # a tie, broken by position
    # Threshold of a top-(t // 2) by bias, ties to the lower position, per (b, kv head).
    order = jnp.argsort(-bias, axis=-1, stable=True)[..., t // 2]
    thr = jnp.take_along_axis(bias, order[..., None], -1)
    extra["q_threshold"] = jnp.broadcast_to(thr, (b, h_kv, t))
    extra["q_threshold_pos"] = jnp.broadcast_to(order[..., None], (b, h_kv, t))
  do = jax.random.normal(keys[6], (b, t, h, d), jnp.float32).astype(dtype)
  dlse = jax.random.normal(keys[7], (b, h, t))
  args = (q, k, v, bias, idx, cnt, extra, do, dlse)
  static = dict(bq=bq, bk=bk, causal=causal)
  o_r, lse_r, grads_r = _outputs_and_grads(*args, impl="reference", interpret=False, **static)
  o, lse, grads = _outputs_and_grads(*args, impl=impl, interpret=interpret, **static)
  assert_close("o", o_r, o, dtype=dtype, reduction=s)
  assert_close("lse", lse_r, lse, dtype=jnp.float32, reduction=s)  # f32 softmax statistics
  for gname, g_r, g in zip(("dq", "dk", "dv", "dbias"), grads_r, grads):
    if g_r is None:
      assert g is None, gname
      continue
    assert_close(gname, g_r, g, dtype=dtype, reduction=s)


@pytest.mark.parametrize("impl,interpret", PATHS, ids=PATH_IDS)
def test_empty_rows_are_zero(impl, interpret):
  b, t, h, d, bq = 1, 32, 2, 64, 16
  q = jnp.ones((b, t, h, d))
  idx, cnt = lists_from_block_mask(jnp.zeros((b, h, 2, 2), bool))
  o, lse = jax.jit(functools.partial(block_sparse_attention, block_q=bq, block_k=bq, impl=impl,
                                     interpret=interpret))(q, q, q, idx, cnt)
  assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))


def _dense_windowed(q, k, v, window, seg=None, pos=None):
  """Plain softmax over keys j <= i with i - j < window (by `pos`, default the token index) and
  equal segment ids: the oracle of the window, independent of common.element_mask."""
  b, t, h, d = q.shape
  pos = jnp.broadcast_to(jnp.arange(t), (b, t)) if pos is None else pos
  diff = pos[:, :, None] - pos[:, None, :]  # [B, T, S]
  keep = (diff >= 0) & (diff < window)
  if seg is not None:
    keep &= seg[:, :, None] == seg[:, None, :]
  kr = jnp.repeat(k, h // k.shape[2], axis=2)
  vr = jnp.repeat(v, h // v.shape[2], axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kr, precision="highest") * d ** -0.5
  s = jnp.where(keep[:, None], s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  o = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), vr, precision="highest")
  return o, lse


def _band_lists(t, bq, bk, window):
  n_q, n_k = -(-t // bq), -(-t // bk)
  return lists_from_block_mask(causal_block_mask(n_q, n_k, bq, bk, window=window)[None, None])


@pytest.mark.parametrize("window", [1, 6, 23, 100])
def test_window_reference_is_the_dense_masked_softmax(window):
  """The band's lists (tiles 8 x 16) and the element condition keep exactly the window, with
  segments and positions that restart in each segment (so the window is by position)."""
  b, t, h, h_kv, d = 2, 37, 4, 2, 16
  keys = jax.random.split(case_key(f"window-dense-{window}"), 3)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k = jax.random.normal(keys[1], (b, t, h_kv, d))
  v = jax.random.normal(keys[2], (b, t, h_kv, d))
  seg = jnp.asarray(np.repeat([[1, 2, 2], [3, 3, 0]], [12, 13, 12], axis=1), jnp.int32)
  starts = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(starts, jnp.arange(t), 0), axis=1)
  pos = jnp.arange(t) - first  # restarts at 0 in each segment
  idx, cnt = _band_lists(t, 8, 16, window)

  @jax.jit
  def both(q, k, v):
    return block_sparse_attention(q, k, v, idx, cnt, block_q=8, block_k=16, window=window,
                                  q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                  kv_segment_ids=seg, impl="reference"), _dense_windowed(
                                      q, k, v, window, seg, pos)

  (o, lse), (o_d, lse_d) = both(q, k, v)
  assert_close("o", o_d, o, reduction=t)
  assert_close("lse", lse_d, lse, reduction=t)


WINDOW_CASES = [
    # name, (B, T, H, H_kv, D, bq, bk), window, features, dtype
    ("w1-gqa-ragged", (1, 40, 4, 2, 64, 16, 16), 1, (), jnp.float32),
    ("w5-segments-bias", (2, 48, 2, 2, 64, 16, 16), 5, ("segments", "bias"), jnp.float32),
    ("w20-mqa-bf16", (1, 64, 4, 1, 64, 16, 32), 20, ("bias",), jnp.bfloat16),
    ("w100-ragged-segments", (1, 40, 2, 2, 64, 16, 16), 100, ("segments",), jnp.float32),
    ("w13-positions-bf16", (2, 32, 2, 2, 64, 16, 16), 13, ("positions",), jnp.bfloat16),
]


# The window is one condition of the shared element mask: the xla path (the slowest to
# compile here) takes two cases in the default run, the kernels all five.
XLA_WINDOW_CASES = ("w5-segments-bias", "w13-positions-bf16")


@pytest.mark.parametrize("impl,interpret,name,dims,window,features,dtype", [
    pytest.param(impl, interpret, *case, id=f"{case[0]}-{pid}",
                 marks=pytest.mark.slow if impl == "xla" and case[0] not in XLA_WINDOW_CASES
                 else ())
    for case in WINDOW_CASES for (impl, interpret), pid in zip(PATHS, PATH_IDS)])
def test_window_matches_reference(impl, interpret, name, dims, window, features, dtype):
  """Windows of 1 key, under a tile, across tiles (not a multiple of either) and over T, on the
  band's lists; ragged T, GQA / MQA, packed segments with padding, shifted positions (the
  window is by position: the lists then hold every causal block)."""
  b, t, h, h_kv, d, bq, bk = dims
  keys = jax.random.split(case_key(name), 6)
  q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, t, h_kv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, h_kv, d), jnp.float32).astype(dtype)
  bias = jax.random.normal(keys[3], (b, h_kv, t)) if "bias" in features else None
  idx, cnt = _band_lists(t, bq, bk, window)
  extra = {}
  if "segments" in features:
    seg = jnp.asarray(np.where(np.arange(t) < t // 3, 1, 2)[None].repeat(b, 0), jnp.int32)
    extra.update(q_segment_ids=seg.at[-1, -5:].set(0), kv_segment_ids=seg.at[-1, -5:].set(0))
  if "positions" in features:
    # Row 1 counts from 7 at its 10th token: a later query is nearer its keys than its index.
    pos = jnp.stack([jnp.arange(t), jnp.where(jnp.arange(t) < 10, jnp.arange(t),
                                              jnp.arange(t) - 3)])
    extra.update(q_positions=pos, kv_positions=pos)
    idx, cnt = _band_lists(t, bq, bk, None)
  do = jax.random.normal(keys[4], (b, t, h, d), jnp.float32).astype(dtype)
  dlse = jax.random.normal(keys[5], (b, h, t))
  args = (q, k, v, bias, idx, cnt, extra, do, dlse)
  static = dict(bq=bq, bk=bk, causal=True, window=window)
  o_r, lse_r, grads_r = _outputs_and_grads(*args, impl="reference", interpret=False, **static)
  o, lse, grads = _outputs_and_grads(*args, impl=impl, interpret=interpret, **static)
  reach = min(window, t)  # keys behind one output
  assert_close("o", o_r, o, dtype=dtype, reduction=reach)
  assert_close("lse", lse_r, lse, dtype=jnp.float32, reduction=reach)
  for gname, g_r, g in zip(("dq", "dk", "dv", "dbias"), grads_r, grads):
    if g_r is None:
      assert g is None, gname
      continue
    assert_close(gname, g_r, g, dtype=dtype, reduction=t)
