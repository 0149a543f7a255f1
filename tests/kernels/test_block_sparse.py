"""block_sparse: every path (the blocked jnp path, the Triton and Mosaic TPU kernels in interpret
mode) equals reference.py, forward and gradients.

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


@functools.partial(jax.jit, static_argnames=("impl", "interpret", "bq", "bk", "causal"))
def _outputs_and_grads(q, k, v, bias, idx, cnt, extra, do, dlse, *, impl, interpret, bq, bk,
                       causal):
  """(o, lse) and the vjp of (do, dlse) for q, k, v, bias, in one compiled program. dlse is
  zeroed where lse is -inf (a query that sees nothing: lse is compared first)."""
  def f(q, k, v, bias):
    return block_sparse_attention(q, k, v, idx, cnt, block_q=bq, block_k=bk, causal=causal,
                                  kv_bias=bias, impl=impl, interpret=interpret, **extra)
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
