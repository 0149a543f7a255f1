"""Context parallelism: each op with T split over mesh.sequence equals the op on one device.

Inputs go in the zig-zag layout (kernels/context_parallel.py) onto a mesh of the 8 host devices
with a sequence axis, outputs and gradients come back to natural order and are compared with the
op's reference path on one device: ring attention (softmax, causal and not, and block-sparse
lists, and with persistent keys), the cross-device linear scan and normalizer, the Titans
memory, and the short conv's halo. Chunks of T / 2n
tokens that are not a multiple of the per-device tiles or scan chunks are part of the cases.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels import context_parallel as cp
from effattn.kernels import dispatch
from effattn.kernels.block_sparse import block_sparse_attention, causal_block_mask
from effattn.kernels.block_sparse.common import lists_from_block_mask
from effattn.kernels.linear_scan import linear_scan, linear_scan_normalizer
from effattn.kernels.memory_chunk import memory_update
from effattn.kernels.short_conv import short_conv
from effattn.kernels.softmax import softmax_attention
from effattn.kernels.softmax.persistent import persistent_attention
from effattn.testing import assert_trees_close
from effattn.testing.kernels import assert_kernels_ran
from effattn.testing.meshes import FAST_COMPILE, host_mesh, value_and_grads

N = 4  # devices on the sequence axis


def _normal(rng, *shape, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def _layout(tree, axes, to):
  """Each leaf of `tree` moved along its token axis (None: no token axis) by `to`."""
  return [x if a is None else to(x, N, a) for x, a in zip(jax.tree.leaves(tree), axes)]


def _ids(segment_ids, impl):
  """Segment ids in the layout of the run: natural for the one-device reference, zig-zag for
  the sharded one."""
  return segment_ids if impl == "reference" else cp.to_zigzag(segment_ids, N)


def _check(name, op, inputs, in_axes, out_axes, *, mesh, reduction, collective):
  """op(*inputs, impl=...) on `mesh`, in the zig-zag layout, against impl="reference" on one
  device: outputs and the gradients of every input."""
  rng = np.random.default_rng(1)
  weights = [_normal(rng, *s.shape) for s in jax.tree.leaves(jax.eval_shape(
      lambda *xs: op(*xs, impl="reference"), *inputs))]
  oracle = value_and_grads(lambda *xs: op(*xs, impl="reference"), inputs, weights)
  (_, want), want_grads = oracle.lower(*inputs).compile(FAST_COMPILE)(*inputs)
  args = _layout(inputs, in_axes, cp.to_zigzag)
  with jax.set_mesh(mesh):
    sharded = value_and_grads(lambda *xs: op(*xs, impl="xla"), args,
                              _layout(weights, out_axes, cp.to_zigzag))
    lowered = sharded.lower(*args)
    assert collective in lowered.as_text(), f"{name}: no {collective} in the program"
    (_, got), got_grads = lowered.compile(FAST_COMPILE)(*args)
  assert_trees_close(f"{name} outputs", jax.tree.leaves(want),
                     _layout(got, out_axes, cp.from_zigzag), reduction=reduction)
  assert_trees_close(f"{name} gradients", jax.tree.leaves(want_grads),
                     _layout(got_grads, in_axes, cp.from_zigzag), reduction=reduction)


def test_zigzag_layout():
  x = np.arange(8)[None]
  np.testing.assert_array_equal(cp.to_zigzag(x, 2), [[0, 1, 6, 7, 2, 3, 4, 5]])
  y = np.random.default_rng(0).normal(size=(2, 24, 3))
  np.testing.assert_array_equal(cp.from_zigzag(cp.to_zigzag(y, 3), 3), y)
  with pytest.raises(ValueError, match="T=10 tokens do not split into the 2 x mesh.sequence=4"):
    cp.zigzag_order(10, 4)


# Row 0 packs three sequences, one of them starting exactly at a chunk boundary (T / 2n = 6).
SEGMENTS = jnp.asarray([[1] * 12 + [2] * 7 + [3] * 5, [1] * 24], jnp.int32)


@pytest.mark.parametrize("causal", [True, False])
def test_ring_softmax(causal):
  # Chunks of 6 tokens: the ring's steps tile each device's 12 with tiles of 8.
  rng = np.random.default_rng(0)
  b, t, h, h_kv, d = 2, 24, 4, 2, 8  # GQA; heads split over tensor as well

  def op(q, k, v, impl):
    return softmax_attention(q, k, v, causal=causal, segment_ids=_ids(SEGMENTS, impl), impl=impl)

  inputs = (_normal(rng, b, t, h, d), _normal(rng, b, t, h_kv, d), _normal(rng, b, t, h_kv, d))
  _check(f"softmax causal={causal}", op, inputs, (1, 1, 1), (1,),
         mesh=host_mesh(sequence=N, tensor=2), reduction=t, collective="collective_permute")


def test_ring_block_sparse_lists():
  """Natural-order block lists (causal, some blocks dropped per head) with a per-key bias."""
  rng = np.random.default_rng(0)
  b, t, h, d, blk = 2, 64, 2, 8, 8
  n_blk = t // blk
  blocks = causal_block_mask(n_blk, n_blk, blk, blk)[None, None]
  drop = jnp.asarray(rng.uniform(size=(1, h, n_blk, n_blk)) < 0.3) & ~jnp.eye(n_blk, dtype=bool)
  idx, cnt = lists_from_block_mask(jnp.broadcast_to(blocks, (1, h, n_blk, n_blk)) & ~drop)

  def op(q, k, v, bias, impl):
    o, lse = block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk, kv_bias=bias,
                                    impl=impl)
    return o, lse

  inputs = (_normal(rng, b, t, h, d), _normal(rng, b, t, h, d), _normal(rng, b, t, h, d),
            _normal(rng, b, 1, t))
  _check("block_sparse", op, inputs, (1, 1, 1, 2), (1, 2), mesh=host_mesh(data=2, sequence=N),
         reduction=t, collective="collective_permute")


def test_linear_scan_across_devices():
  """Decay (with its gradient), segments, an initial state, the final state and the
  normalizer; chunks of 6 tokens with scan chunks of 4."""
  rng = np.random.default_rng(0)
  b, t, h, d = 2, 24, 4, 8

  def op(q, k, v, s0, log_decay, impl):
    kw = dict(segment_ids=_ids(SEGMENTS, impl), impl=impl, chunk_size=4)
    o, final = linear_scan(q, k, v, log_decay, initial_state=s0, scale=0.5, **kw)
    den, key_sum = linear_scan_normalizer(q, k, log_decay, initial_state=s0[..., 0], **kw)
    return o, final, den, key_sum

  inputs = (_normal(rng, b, t, h, d), _normal(rng, b, t, h, d), _normal(rng, b, t, h, d),
            _normal(rng, b, h, d, d), -jnp.asarray(rng.uniform(0.01, 0.5, size=(h,)), jnp.float32))
  _check("linear_scan", op, inputs, (1, 1, 1, None, None), (1, None, 1, None),
         mesh=host_mesh(sequence=N, tensor=2), reduction=t, collective="all_gather")


def test_titans_memory_across_devices():
  rng = np.random.default_rng(0)
  b, t, h, d = 2, 32, 2, 8
  seg = jnp.asarray([[1] * 8 + [2] * 5 + [3] * 19, [1] * 32], jnp.int32)

  def op(q, k, v, theta, alpha, eta, w0, impl):
    return memory_update(q, k, v, theta, alpha, eta, initial_memory=w0, chunk_size=2,
                         segment_ids=_ids(seg, impl), impl=impl)

  gate = lambda: jnp.asarray(rng.uniform(0.1, 0.9, size=(b, t, h)), jnp.float32)  # noqa: E731
  inputs = (_normal(rng, b, t, h, d, scale=0.25), _normal(rng, b, t, h, d, scale=0.25),
            _normal(rng, b, t, h, d), gate() / 4, gate() / 4, gate(), _normal(rng, b, h, d, d))
  _check("memory_update", op, inputs, (1, 1, 1, 1, 1, 1, None), (1, None, None),
         mesh=host_mesh(sequence=N, tensor=2), reduction=t, collective="all_gather")


def test_ring_with_persistent_keys():
  """Titans' attention branch: every query also sees N_p persistent pairs (GQA)."""
  rng = np.random.default_rng(0)
  b, t, h, h_kv, d, n_p = 2, 24, 4, 2, 8, 3

  def op(q, k, v, pk, pv, impl):
    return persistent_attention(q, k, v, pk, pv, segment_ids=_ids(SEGMENTS, impl), impl=impl)

  inputs = (_normal(rng, b, t, h, d), _normal(rng, b, t, h_kv, d), _normal(rng, b, t, h_kv, d),
            _normal(rng, n_p, h_kv, d), _normal(rng, n_p, h_kv, d))
  _check("persistent_attention", op, inputs, (1, 1, 1, None, None), (1,),
         mesh=host_mesh(sequence=N, tensor=2), reduction=t, collective="collective_permute")


@pytest.mark.parametrize("width", [4, 9])  # a halo within the chunk before, and across two
def test_short_conv_halo(width):
  rng = np.random.default_rng(0)
  b, t, c = 2, 40, 6  # chunks of 5 tokens
  seg = jnp.asarray([[1] * 10 + [2] * 13 + [3] * 17, [1] * 40], jnp.int32)

  def op(x, taps, impl):
    return short_conv(x, taps, segment_ids=_ids(seg, impl))

  _check("short_conv", op, (_normal(rng, b, t, c), _normal(rng, width, c)), (1, None), (1, None),
         mesh=host_mesh(data=2, sequence=N), reduction=width, collective="all_gather")


@pytest.mark.parametrize("call,match", [
    (lambda x: softmax_attention(x, x, x, causal=True), "T=20 tokens do not split"),
    (lambda x: softmax_attention(x[:, :16], x[:, :16], x[:, :16], causal=True, window=4),
     "window=4 has no ring path"),
    (lambda x: linear_scan(x[:, :16], x[:, :16], x[:, :16], causal=False),
     "causal=False has no cross-device path"),
    (lambda x: memory_update(*(x[:, :16],) * 3, *(x[:, :16, :, 0],) * 3, chunk_size=4),
     "the 2 tokens of a chunk .* multiple of chunk_size=4"),
    (lambda x: persistent_attention(x[:, :16], x[:, :16], x[:, :16], x[0, :2], x[0, :2],
                                    window=4), "window=4 has no ring path"),
])
def test_what_cannot_split_names_the_fix(call, match):
  x = jnp.ones((1, 20, 2, 8), jnp.float32)
  with jax.set_mesh(host_mesh(sequence=N)), pytest.raises(ValueError, match=match):
    jax.eval_shape(call, x)


def test_the_pallas_kernels_run_per_device():
  """Under the ring and the cross-device scan each device calls the op's Pallas kernels (they
  see no free mesh axis there, so kernels/mesh.py adds no shard_map of its own)."""
  x = jnp.ones((1, 32, 2, 64), jnp.float32)
  seg = cp.to_zigzag(SEGMENTS[:1, :16].repeat(2, 1), N)

  def loss(q):
    o = softmax_attention(q, q, q, causal=True, segment_ids=seg)
    o2, _ = linear_scan(q, q, q, segment_ids=seg)
    return jnp.sum(o) + jnp.sum(o2)

  with dispatch.interpret_kernels("gpu"), jax.set_mesh(host_mesh(sequence=N, tensor=2)):
    assert_kernels_ran({"block_sparse_fwd", "block_sparse_dq", "block_sparse_dkv", "linear_scan",
                        "linear_scan_reverse"}, jax.grad(loss), x)
