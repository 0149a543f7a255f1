"""Every kernel family on a (data=2, tensor=4) mesh of host devices equals its one-device run.

The Pallas (Triton) kernels run in the interpreter under `jax.set_mesh`, where kernels/mesh.py
puts each call under shard_map: batch rows over data, heads over tensor (GQA groups whole).
Outputs and the gradients of every differentiable input are compared with the same kernels
called without a mesh. tests/conftest.py gives the process its 8 host devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from effattn.kernels import mesh as kernel_mesh
from effattn.kernels.block_sparse.api import block_sparse_attention
from effattn.kernels.block_sparse.common import causal_block_mask, lists_from_block_mask
from effattn.kernels.delta_rule.api import delta_rule
from effattn.kernels.grouped_softmax.api import grouped_softmax
from effattn.kernels.head_routing.api import head_routed_attention
from effattn.kernels.linear_scan.api import linear_scan
from effattn.kernels.memory_chunk.api import memory_update
from effattn.testing import assert_close
from effattn.testing.meshes import FAST_COMPILE, value_and_grads

B, T, H, H_KV = 2, 32, 8, 4  # GQA: two query heads per kv head; four heads per tensor shard
# Row 0 packs two sequences; row 1 is one.
SEGMENTS = jnp.asarray([[1] * 20 + [2] * 12, [1] * 32], jnp.int32)


def _mesh():
  return jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _normal(rng, *shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _case(family: str, rng, impl: str = "pallas"):
  """(op, differentiable inputs): op(*inputs) -> a pytree of float outputs."""
  n = lambda *shape: _normal(rng, *shape)  # noqa: E731
  if family == "block_sparse":
    blocks = causal_block_mask(2, 2, 16, 16)
    idx, cnt = lists_from_block_mask(jnp.broadcast_to(blocks, (1, 1, 2, 2)))

    def op(q, k, v, bias):
      return block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=16,
                                    q_segment_ids=SEGMENTS, kv_segment_ids=SEGMENTS,
                                    kv_bias=bias, impl=impl, interpret=True)
    return op, (n(B, T, H, 64), n(B, T, H_KV, 64), n(B, T, H_KV, 64), n(B, H_KV, T))
  if family == "head_routing":
    gates = jnp.asarray(rng.uniform(size=(B, T, H)) * (rng.uniform(size=(B, T, H)) < 0.5),
                        jnp.float32)

    def op(q, k, v):
      return head_routed_attention(q, k, v, gates, segment_ids=SEGMENTS, block_q=16,
                                   block_k=16, impl=impl, interpret=True)
    return op, (n(B, T, H, 16), n(B, T, H_KV, 16), n(B, T, H_KV, 16))
  if family == "grouped_softmax":
    from effattn.attention.landmark import block_groups
    positions = jnp.where(SEGMENTS == 2, jnp.arange(T) - 20, jnp.arange(T))
    gid = block_groups(positions, SEGMENTS, 8)

    def op(q, k, v, k_land):
      return grouped_softmax(q, k, v, k_land, gid, SEGMENTS, block_len=8, tile=16,
                             impl=impl, interpret=True)
    return op, (n(B, T, H, 16), n(B, T, H, 16), n(B, T, H, 16), n(B, 8, H, 16))
  if family == "linear_scan":
    log_decay = -jnp.asarray(rng.uniform(0.01, 0.5, size=(H,)), jnp.float32)

    def op(q, k, v, s0):
      return linear_scan(q, k, v, log_decay, initial_state=s0, segment_ids=SEGMENTS,
                         scale=0.25, impl=impl, interpret=True)
    return op, (n(B, T, H, 16), n(B, T, H, 16), n(B, T, H, 16), n(B, H, 16, 16))
  gate = lambda: jnp.asarray(rng.uniform(0.1, 0.9, size=(B, T, H)), jnp.float32)  # noqa: E731
  if family == "memory_chunk":
    def op(q, k, v, theta, alpha, eta, w0):
      return memory_update(q, k, v, theta, alpha, eta, initial_memory=w0,
                           segment_ids=SEGMENTS, chunk_size=16, impl=impl, interpret=True)
    return op, (n(B, T, H, 16) / 4, n(B, T, H, 16) / 4, n(B, T, H, 16), gate() / 4, gate() / 4,
                gate(), n(B, H, 16, 16))
  assert family == "delta_rule"

  def op(q, k, v, log_gate, beta, s0):
    return delta_rule(q, k, v, log_gate, beta, initial_state=s0, segment_ids=SEGMENTS,
                      chunk_size=16, impl=impl, interpret=True)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  return op, (unit(n(B, T, H, 16)), unit(n(B, T, H, 16)), n(B, T, H, 16),
              jnp.log(gate()), gate(), n(B, H, 16, 16))


FAMILIES = ("block_sparse", "head_routing", "grouped_softmax", "linear_scan", "memory_chunk",
            "delta_rule")


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_kernel_equals_one_device(family):
  op, inputs = _case(family, np.random.default_rng(0))
  weights = jax.tree.map(lambda s: _normal(np.random.default_rng(1), *s.shape),
                         jax.eval_shape(op, *inputs))
  with jax.set_mesh(_mesh()):
    lowered = value_and_grads(op, inputs, weights).lower(*inputs)
    assert "manual_computation" in lowered.as_text(), "no kernel call under shard_map"
    (_, got), got_grads = lowered.compile(FAST_COMPILE)(*inputs)
  # The one-device oracle: the family's reference path (plain jnp, cheap to compile).
  oracle, _ = _case(family, np.random.default_rng(0), impl="reference")
  (_, want), want_grads = value_and_grads(oracle, inputs, weights).lower(*inputs).compile(
      FAST_COMPILE)(*inputs)
  for name, w, g in (("outputs", want, got), ("gradients", want_grads, got_grads)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4,
                                                         err_msg=f"{family} {name}"), w, g)


def test_one_device_mesh_adds_no_shard_map():
  op, inputs = _case("linear_scan", np.random.default_rng(0))
  one = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                      devices=jax.devices()[:1])
  with jax.set_mesh(one):
    assert kernel_mesh.ambient_mesh() is None
    assert "manual_computation" not in jax.jit(op).lower(*inputs).as_text()


@pytest.mark.parametrize("heads,match", [((B, T, 6, 16), "6 heads .* mesh.tensor=4"),
                                         ((3, T, H, 16), "batch of 3 rows .* data x fsdp = 2")])
def test_shapes_that_do_not_split_name_the_fix(heads, match):
  x = jnp.zeros(heads)
  with jax.set_mesh(_mesh()), pytest.raises(ValueError, match=match):
    jax.jit(lambda x: linear_scan(x, x, x, impl="pallas", interpret=True)).lower(x)


def test_sharded_linear_scan_learns_its_decay():
  """d log_decay (replicated over data, split over tensor) sums over the batch shards."""
  op, inputs = _case("linear_scan", np.random.default_rng(0))
  rng = np.random.default_rng(2)
  log_decay = -jnp.asarray(rng.uniform(0.01, 0.5, size=(H,)), jnp.float32)
  weights = jax.tree.map(lambda s: _normal(rng, *s.shape), jax.eval_shape(op, *inputs))

  def grad(impl):
    def loss(g):
      out = linear_scan(*inputs[:3], g, initial_state=inputs[3], segment_ids=SEGMENTS,
                        scale=0.25, impl=impl, interpret=True)
      return sum(jnp.vdot(o, w) for o, w in zip(out, weights))
    return jax.jit(jax.grad(loss)).lower(log_decay).compile(FAST_COMPILE)(log_decay)
  with jax.set_mesh(_mesh()):
    got = grad("pallas")
  assert_close("d log_decay", grad("reference"), got, reduction=B * T)
