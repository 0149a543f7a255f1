"""sqa, its own oracles: head counts of the variants, GQA at H_q = H, a naive loop at H_q < H,
FLOPs that follow the query heads. The common oracles are in test_mechanisms.py."""

import jax
import numpy as np
import pytest
from flax import nnx

from effattn.attention import sqa
from effattn.testing import assert_close
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import build


@pytest.mark.parametrize("variant,want", [("sqa", (4, 2)), ("ssqa", (4, 4)), ("xsqa", (2, 2)),
                                          ("xsmqa", (2, 1))])
def test_variant_head_counts(variant, want):
  attn = build("sqa", d_model=64, num_heads=8, sqa={"variant": variant})
  assert (attn.num_heads, attn.num_kv_heads) == want
  assert attn.head_dim == 8  # d_model / H, not d_model / H_q
  h_q, h_kv = want
  assert attn.q_proj.kernel.value.shape == (64, h_q * 8)
  assert attn.k_proj.kernel.value.shape == (64, h_kv * 8)
  assert attn.o_proj.kernel.value.shape == (h_q * 8, 64)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_full_query_heads_equal_gqa(num_kv_heads):
  """Oracle: with H_q = H, SQA is GQA (softmax with the same weights), causal and not."""
  gqa = build("softmax", num_kv_heads=num_kv_heads, seed=3)
  attn = build("sqa", num_kv_heads=num_kv_heads, seed=4,
               sqa={"variant": "general", "num_query_heads": 4})
  nnx.update(attn, nnx.state(gqa, nnx.Param))
  x, pos = random_inputs()
  for causal in (True, False):
    want, _ = gqa(x, positions=pos, causal=causal)
    got, _ = attn(x, positions=pos, causal=causal)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{causal=}")


def test_fewer_query_heads_equal_gqa_on_those_heads():
  """H_q < H computes GQA over the H_q heads it keeps: a naive per-head loop agrees."""
  attn = build("sqa", d_model=32, num_heads=4, sqa={"variant": "sqa"})  # H_q 2, H_kv 1
  x, pos = random_inputs(length=9)
  y, _ = attn(x, positions=pos, causal=True)
  q, k, v = attn.project(x, pos)
  assert q.shape[2:] == (2, 8) and k.shape[2:] == (1, 8)
  qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
  t = x.shape[1]
  out = np.zeros(qn.shape)
  for h in range(2):
    s = np.einsum("btd,bsd->bts", qn[:, :, h], kn[:, :, 0]) / np.sqrt(8)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[:, :, h] = np.einsum("bts,bsd->btd", p / p.sum(-1, keepdims=True), vn[:, :, 0])
  want = attn.o_proj(out.reshape(*out.shape[:2], -1).astype(np.float32))
  assert_close("y", want, y, reduction=t)


def test_bidirectional_sees_future():
  attn = build("sqa", sqa={"variant": "ssqa"})
  x, pos = random_inputs()
  y, _ = attn(x, positions=pos, causal=False)
  y2, _ = attn(x.at[:, -1].add(1.0), positions=pos, causal=False)
  assert not np.allclose(np.asarray(y[:, 0]), np.asarray(y2[:, 0]))


def test_attention_flops_follow_query_heads():
  """The compiled attention does H_q / H of MHA's score FLOPs (cost analysis of XLA)."""
  x, pos = random_inputs(batch=1, length=64, d_model=64)

  def flops(name, **fields):
    attn = build(name, d_model=64, num_heads=8, impl="xla", **fields)
    graph, state = nnx.split(attn)
    fn = jax.jit(lambda s, x: nnx.merge(graph, s)(x, positions=pos)[0])
    return fn.lower(state, x).compile().cost_analysis()["flops"]

  mha = flops("softmax")
  xsqa = flops("sqa", sqa={"variant": "xsqa"})
  # Projections shrink too (q, k, v, o all to a quarter), so the whole layer is ~1/4 of MHA.
  assert 0.2 * mha < xsqa < 0.35 * mha, (mha, xsqa)


@pytest.mark.parametrize("fields,match", [
    ({"sqa": {"variant": "fast"}}, "variant"),
    ({"sqa": {"variant": "general", "num_query_heads": 3}, "num_kv_heads": 2}, "num_kv_heads"),
    ({"sqa": {"variant": "general", "num_query_heads": 6}}, "num_query_heads"),
    ({"sqa": {"variant": "sqa"}, "num_kv_heads": 2}, "variant='general'"),
])
def test_bad_options_named(fields, match):
  with pytest.raises(ValueError, match=match):
    build("sqa", **fields)


def test_head_counts_reject_indivisible_heads():
  with pytest.raises(ValueError, match="divisible"):
    sqa.head_counts("xsqa", 6, None, None)
