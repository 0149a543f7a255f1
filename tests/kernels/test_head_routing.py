"""head_routing: every path equals reference.py, forward and gradients; the kernels really run.

Gradients go through jax.vjp with a random cotangent (never `.sum()`), for q, k, v AND gates,
jitted with the forward pass (one compile per path and case, the reference once per case);
the Pallas kernels run in interpret mode on CPU.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels import dispatch
from effattn.kernels.head_routing import compact, head_routed_attention
from effattn.kernels.head_routing.common import key_block_bounds
from effattn.testing import assert_close, kernels
from effattn.testing.inputs import case_key


def make_gates(key, b, t, h, density):
  """Gates with edge cases: head 0 gets no token, the last head every token."""
  k1, k2 = jax.random.split(key)
  on = jax.random.bernoulli(k1, density, (b, t, h)).at[:, :, 0].set(False).at[:, :, -1].set(True)
  return jnp.where(on, jax.random.uniform(k2, (b, t, h), minval=0.2, maxval=2.0), 0.0)


CASES = [
    # name, (B, T, H, H_kv, D, bq, bk), causal, segments, density, dtype
    ("gqa-causal-ragged", (2, 40, 4, 2, 16, 16, 16), True, False, 0.4, jnp.float32),
    ("mha-bidir-segments", (1, 48, 2, 2, 32, 16, 32), False, True, 0.5, jnp.float32),
    ("mqa-causal-segments-bq>bk", (1, 64, 3, 1, 16, 32, 16), True, True, 0.3, jnp.float32),
    ("bf16-causal", (1, 64, 2, 1, 32, 16, 32), True, False, 0.7, jnp.bfloat16),
    # segment ids of ones (one run per row: the kernels run without the segment mask)
    ("gqa-causal-one-segment", (2, 40, 4, 2, 16, 16, 16), True, "ones", 0.4, jnp.float32),
]


# (impl, interpret, cases): the xla path's dense mask is one case; the Mosaic TPU kernel shares
# the Triton one's tiling (common.py) and takes three (bidirectional with segments, causal GQA
# with bq > bk, one segment per row).
# block_sparse: the compacted queries through the block-sparse op (its xla path on CPU; its
# kernels in test_block_sparse_path_runs_the_block_sparse_kernels).
PATHS = [("xla", False, CASES[1:2]), ("pallas_gpu", True, CASES),
         ("pallas_tpu", True, [CASES[1], CASES[2], CASES[4]]), ("block_sparse", False, CASES[:4])]
PATH_CASES = [(impl, interpret, case) for impl, interpret, cases in PATHS for case in cases]


def _inputs(case):
  """q, k, v, gates, segment ids and the output's random cotangent of a case."""
  name, (b, t, h, h_kv, d, bq, bk), causal, segments, density, dtype = case
  keys = jax.random.split(case_key(name), 6)
  q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, t, h_kv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, h_kv, d), jnp.float32).astype(dtype)
  gates = make_gates(keys[3], b, t, h, density)
  seg = None
  if segments == "ones":
    seg = jnp.ones((b, t), jnp.int32)
  elif segments:  # two segments and a padded tail (segment 0)
    seg = jnp.where(jnp.arange(t) < t // 3, 1, 2).at[t - 5:].set(0)
    seg = jnp.broadcast_to(seg.astype(jnp.int32), (b, t))
  do = jax.random.normal(keys[4], (b, t, h, d), jnp.float32).astype(dtype)  # o's shape
  return (q, k, v, gates), seg, do


def _output_and_grads(case, impl, interpret):
  """o and the vjp of the random cotangent for q, k, v and gates, in one compiled program (a
  fresh jit per call: the path is chosen where it is traced, inside any stand-in context)."""
  _, (_, _, _, _, _, bq, bk), causal, _, _, _ = case
  args, seg, do = _inputs(case)

  def f(q, k, v, gates):
    return head_routed_attention(q, k, v, gates, causal=causal, segment_ids=seg, block_q=bq,
                                 block_k=bk, impl=impl, interpret=interpret)

  @jax.jit
  def run(args, do):
    o, vjp = jax.vjp(f, *args)
    return o, vjp(do)
  return run(args, do)


@functools.cache
def _reference(case):
  """The reference's output and gradients, computed once per case."""
  return _output_and_grads(case, "reference", False)


@pytest.mark.parametrize("impl,interpret,case", PATH_CASES,
                         ids=[f"{i}{'-interpret' if it else ''}-{c[0]}" for i, it, c in PATH_CASES])
def test_matches_reference(impl, interpret, case, stand_in=None):
  t, dtype = case[1][1], case[-1]
  o_r, grads_r = _reference(case)
  with stand_in or contextlib.nullcontext():
    o, grads = _output_and_grads(case, impl, interpret)
  assert o.dtype == dtype
  assert_close("o", o_r, o, dtype=dtype, reduction=t)
  for gname, g_r, g in zip(("dq", "dk", "dv", "dgates"), grads_r, grads):
    assert_close(gname, g_r, g, dtype=dtype, reduction=t)


def test_block_sparse_path_runs_the_block_sparse_kernels():
  """The block_sparse path on the GPU's kernels (Triton, interpreted; Mosaic GPU has no
  interpreter; both take head dims 64 and 128): the block-sparse op's three pallas_calls run,
  and forward and every gradient match the reference with GQA, packed segments and bq > bk."""
  b, t, h, d = 1, 32, 2, 64
  q = jnp.ones((b, t, h, d))
  gates = jnp.ones((b, t, h)).at[:, ::2, 0].set(0.0)

  def loss(q, gates):
    o = head_routed_attention(q, q, q, gates, block_q=16, block_k=16, impl="block_sparse")
    return jnp.vdot(o, jnp.arange(o.size, dtype=o.dtype).reshape(o.shape))

  with dispatch.interpret_kernels("gpu"):
    kernels.assert_kernels_ran(("block_sparse_fwd", "block_sparse_dq", "block_sparse_dkv"),
                               jax.grad(loss, argnums=(0, 1)), q, gates)
  case = ("gqa-causal-segments-d64", (1, 48, 4, 2, 64, 32, 16), True, True, 0.4, jnp.float32)
  test_matches_reference("block_sparse", False, case, dispatch.interpret_kernels("gpu"))


def test_compaction_is_a_stable_permutation():
  active = jax.random.bernoulli(jax.random.key(0), 0.3, (2, 37, 3))
  c = compact(active)
  a, slot, perm = (np.asarray(x) for x in (active, c.slot, c.perm))
  for bi in range(2):
    for hi in range(3):
      routed = np.flatnonzero(a[bi, :, hi])
      n = len(routed)
      assert c.count[bi, hi] == n
      np.testing.assert_array_equal(perm[bi, :n, hi], routed)  # routed first, in order
      np.testing.assert_array_equal(np.sort(perm[bi, :, hi]), np.arange(37))
      np.testing.assert_array_equal(perm[bi, slot[bi, :, hi], hi], np.arange(37))
      np.testing.assert_array_equal(np.asarray(c.pos)[bi, hi, :n], routed)
      assert np.all(np.asarray(c.pos)[bi, hi, n:] == -1)
  lo, mid, hi_ = key_block_bounds(c, causal=True, segments=False, num_k_blocks=3, block_k=16)
  # Slots [lo, mid) hold the routed tokens inside key block j.
  for j in range(3):
    in_block = ((np.arange(37) >= 16 * j) & (np.arange(37) < 16 * j + 16))[None, :, None] & a
    np.testing.assert_array_equal(np.asarray(mid - lo)[:, :, j], in_block.sum(1))


@pytest.mark.parametrize("impl,names", [
    ("pallas_gpu", ("head_routing_fwd", "head_routing_dq", "head_routing_dkv")),
    ("pallas_tpu", ("head_routing_tpu_fwd", "head_routing_tpu_dq", "head_routing_tpu_dkv")),
])
def test_kernels_really_run(impl, names):
  b, t, h, d = 1, 32, 2, 16
  q = jnp.ones((b, t, h, d))
  gates = jnp.ones((b, t, h))

  def loss(q, gates):
    o = head_routed_attention(q, q, q, gates, block_q=16, block_k=16, impl=impl, interpret=True)
    return jnp.vdot(o, jnp.arange(o.size, dtype=o.dtype).reshape(o.shape))

  kernels.assert_kernels_ran(names, jax.grad(loss, argnums=(0, 1)), q, gates)


def test_inactive_pairs_output_zero_and_get_no_gate_gradient():
  b, t, h, d = 1, 32, 2, 16
  q = jax.random.normal(jax.random.key(0), (b, t, h, d))
  gates = jnp.zeros((b, t, h)).at[:, ::3, 1].set(1.0)
  f = lambda g: head_routed_attention(q, q, q, g, block_q=16, block_k=16, impl="pallas_gpu",  # noqa: E731
                                      interpret=True)

  @jax.jit  # forward and backward in one compiled program
  def run(gates):
    o, vjp = jax.vjp(f, gates)
    return o, vjp(jnp.ones_like(o))

  o, (dg,) = run(gates)
  assert np.all(np.asarray(o)[:, :, 0] == 0) and np.all(np.asarray(o)[:, 1::3, 1] == 0)
  assert np.all(np.asarray(dg)[np.asarray(gates) == 0] == 0)


@pytest.mark.parametrize("kwargs,match", [
    ({"impl": "flash"}, "impl"),
    ({"impl": "pallas_gpu", "d": 24}, "head_dim"),
    ({"block_q": 48}, "block_q"),
    ({"gates_shape": (1, 32, 3)}, "gates"),
])
def test_bad_arguments_named(kwargs, match):
  d = kwargs.pop("d", 16)
  gates_shape = kwargs.pop("gates_shape", (1, 32, 2))
  q = jnp.zeros((1, 32, 2, d))
  with pytest.raises(ValueError, match=match):
    head_routed_attention(q, q, q, jnp.zeros(gates_shape), interpret=True, **kwargs)
