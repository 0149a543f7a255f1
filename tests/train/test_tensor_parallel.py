"""Logical axes and Megatron tensor parallelism on 8 host devices (tests/conftest.py).

The rule table of configs/base.py gives a block the column / row layout; the sharded step
computes the one-device loss and gradients; the compiled step holds Megatron's all-reduces per
block and nothing per block over tensor besides; a checkpoint written on one mesh restores onto
one device and onto another mesh with the same evaluation.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import base
from effattn import logical_axes
from effattn.config import ConfigError, validate
from effattn.evaluate.runner import restore_model
from effattn.kernels import hlo
from effattn.model import Transformer
from effattn.model.transformer import Block
from effattn.testing import assert_close, assert_trees_close
from effattn.testing.configs import tiny_trainer
from effattn.testing.mesh import MeshRun, mesh_config
from effattn.train import checkpoint as ckpt_lib
from effattn.train import loop, sharding
from effattn.train.evaluation import evaluate_split
from effattn.train.optimizer import make_optimizer
from effattn.train.state import create, split_model


def tp_config(layers: int = 1, heads: int = 4, kv_heads: int | None = 2, name: str = "softmax"):
  """A gated-MLP model of width 64 on the xla path, T = 32."""
  config = base.get_config()
  m = config.model
  m.vocab_size, m.d_model, m.num_heads, m.num_layers, m.mlp = 64, 64, heads, layers, "gated"
  m.attention.name, m.attention.num_kv_heads, m.attention.impl = name, kv_heads, "xla"
  config.data.seq_len = 32
  return config


def specs(config, shape):
  """{path: PartitionSpec} of the model's params on a (data, fsdp, tensor) mesh."""
  config = mesh_config(config, shape)
  _, params, _ = split_model(nnx.eval_shape(lambda: Transformer(config.model,
                                                                rngs=nnx.Rngs(0))))
  shardings = sharding.param_shardings(params, sharding.make_mesh(config.mesh),
                                       sharding.logical_rules(config.mesh))
  return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path[:-1]): s.spec
          for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}  # path[-1]: value


def test_rules_give_a_block_the_megatron_layout():
  got = specs(tp_config(), (2, 2, 2))
  block = "blocks.0.attn."
  assert got[block + "q_proj.kernel"] == P("fsdp", "tensor")  # column-parallel
  assert got[block + "k_proj.kernel"] == got[block + "v_proj.kernel"] == P("fsdp", "tensor")
  assert got[block + "o_proj.kernel"] == P("tensor", "fsdp")  # row-parallel
  assert got["blocks.0.mlp.gate.kernel"] == got["blocks.0.mlp.up.kernel"] == P("fsdp", "tensor")
  assert got["blocks.0.mlp.down.kernel"] == P("tensor", "fsdp")
  assert got["blocks.0.attn_norm.scale"] == P(None)
  assert got["embed.embedding"] == P("tensor", "fsdp")
  assert got["lm_head.kernel"] == P("fsdp", "tensor")


def test_heads_split_whole_or_not_at_all():
  # MQA: the one kv head (16 features, which would divide by 2) stays whole.
  mqa = specs(tp_config(kv_heads=1), (4, 1, 2))
  assert mqa["blocks.0.attn.k_proj.kernel"] == P(None, None)
  assert mqa["blocks.0.attn.q_proj.kernel"] == P(None, "tensor")
  # 4 heads over tensor=8 do not split: q stays whole, the MLP's 192 columns still split.
  eight = specs(tp_config(), (1, 1, 8))
  assert eight["blocks.0.attn.q_proj.kernel"] == P(None, None)
  assert eight["blocks.0.mlp.up.kernel"] == P(None, "tensor")
  # A mechanism's unnamed extras take the fsdp fallback: gated_deltanet's conv taps [4, 192].
  extras = specs(tp_config(name="gated_deltanet", kv_heads=None), (1, 4, 2))
  assert extras["blocks.0.attn.conv"] == P(None, "fsdp")
  assert extras["blocks.0.attn.qkv_proj.kernel"] == P("fsdp", None)  # fused: rows only


def test_rule_table_semantics():
  sizes = {"data": 2, "fsdp": 1, "tensor": 4}
  rules = (("a", "fsdp"), ("a", "tensor"), ("b", ("data", "fsdp")), ("c", None), ("c", "data"))
  # fsdp has size 1: the next rule for "a" applies; "b" keeps the axes of size > 1.
  assert logical_axes.spec(("a", "b"), (8, 8), rules, sizes) == P("tensor", "data")
  # None ends the search; an axis used by an earlier dim is not used twice; 6 rows do not split.
  assert logical_axes.spec(("c", "a", "a"), (8, 8, 8), rules, sizes) == P(None, "tensor", None)
  assert logical_axes.spec(("a",), (6,), rules, sizes) == P(None)
  assert logical_axes.spec(("a",), (64,), rules, sizes, units=(32,)) == P(None)  # 2 heads
  with pytest.raises(ConfigError, match=r"mesh.rules entry \('embed', 'fsdpp'\) names mesh "
                                        r"axis 'fsdpp'; the mesh has data, fsdp, tensor"):
    config = tp_config()
    config.mesh.rules = (("embed", "fsdpp"),)
    validate(config)


def test_activations_are_left_alone_without_the_trainers_rules():
  x = jax.numpy.ones((8, 4, 16))
  assert logical_axes.constrain(x, logical_axes.RESIDUAL) is x
  mesh = sharding.make_mesh(mesh_config(tp_config(), (2, 2, 2)).mesh)
  with sharding.ambient(mesh):  # the mesh without rules: kernels per shard, no constraints
    assert logical_axes.constrain(x, logical_axes.RESIDUAL) is x
  one = sharding.make_mesh(tp_config().mesh, devices=jax.devices()[:1])
  with sharding.ambient(one, sharding.logical_rules(tp_config().mesh)):
    assert logical_axes.constrain(x, logical_axes.RESIDUAL) is x


def test_tensor_parallel_step_equals_one_device():
  """Loss and gradients of every parameter of a GQA softmax block with a gated MLP on
  (data 2, fsdp 2, tensor 2), against no mesh. (Every mechanism, on its xla path and with its
  Triton kernels interpreted, passed the same comparison when this layout was written.)"""
  run = MeshRun(tp_config())
  want = run.loss_and_grads()
  got = run.loss_and_grads((2, 2, 2))
  assert_close("loss", want[0], got[0], reduction=8 * 32)
  assert_trees_close("grads", want[1], got[1], reduction=8 * 32)


def test_a_compiled_block_holds_megatrons_all_reduces():
  """Forward and backward of one block on fsdp=4 x tensor=2: 4 all-reduces over tensor (the
  attention output and the MLP down projection forward, the gradients of their inputs
  backward), each weight all-gathered over fsdp once, and nothing else over tensor."""
  config = mesh_config(tp_config(), (1, 4, 2))
  mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_rules(config.mesh)
  graphdef, params = nnx.split(Block(config.model, 0, rngs=nnx.Rngs(0)))
  params = jax.device_put(params, sharding.param_shardings(params, mesh, rules))
  rows = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
  x = jax.device_put(jnp.ones((8, 32, 64)), rows)
  positions = jax.device_put(jnp.broadcast_to(jnp.arange(32), (8, 32)), rows)

  def loss(params, x):
    y, _ = nnx.merge(graphdef, params)(x, positions=positions, segment_ids=None, causal=True,
                                       train=True)
    return jnp.mean(y * y)

  with sharding.ambient(mesh, rules):
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
  counts = collections.Counter((c.op, c.group_size) for c in hlo.collectives(text))
  assert {k: n for k, n in counts.items() if k[1] == 2} == {("all-reduce", 2): 4}, counts
  assert counts[("all-gather", 4)] == 7, counts  # q, k, v, o, gate, up, down


def test_checkpoints_restore_across_mesh_shapes(tmp_path):
  """Trained on (fsdp 4, tensor 2): restored onto one device it evaluates as the run did, and
  restored onto (data 2, fsdp 2, tensor 2), optimizer state included, it holds the same values
  in that mesh's layout (orbax reads the shards into each target). (No data axis in training:
  orbax splits the writes of replicated shards between their replicas, a compile per slice.)"""
  config = tiny_trainer(str(tmp_path / "data"), steps=2, eval_examples=32)
  config.data.mqar.update(train_examples=64, test_examples=32)
  config.model.mlp, config.model.num_layers = "gated", 1
  config.checkpoint.every = 2
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
  workdir = str(tmp_path / "run")
  trained = loop.train_and_evaluate(config, workdir)

  saved = ckpt_lib.merge_into(base.get_config(), ckpt_lib.load_config(workdir))
  model, step = restore_model(saved, workdir)
  assert step == 2
  device = jax.local_devices()[0]
  assert all(x.sharding.device_set == {device} for x in jax.tree.leaves(nnx.state(model)))
  graphdef, params, rest = split_model(model)
  on_one = evaluate_split(graphdef, params, rest, saved.data, saved.train.eval_split,
                          batch_size=16, max_examples=32)
  assert_close("eval loss", trained["loss"], on_one["loss"], reduction=32 * 16)
  assert on_one["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-6)
  assert on_one["examples"] == trained["examples"] == 32

  other = mesh_config(saved, (2, 2, 2))
  mesh, rules = sharding.make_mesh(other.mesh), sharding.logical_rules(other.mesh)
  tx, _ = make_optimizer(other.optimizer, other.train.steps)
  _, target = create(loop.build_model(other), tx)
  target = jax.device_put(target, sharding.param_shardings(target, mesh, rules))
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  restored = checkpointer.restore(target, 2)
  checkpointer.close()
  assert int(restored.step) == 2
  layouts = sharding.param_shardings(target, mesh, rules)
  for want, got, layout in zip(jax.tree.leaves(params), jax.tree.leaves(restored.params),
                               jax.tree.leaves(layouts.params), strict=True):
    np.testing.assert_array_equal(np.asarray(want), np.asarray(got))
    assert got.sharding == layout
  assert [x.sharding for x in jax.tree.leaves(restored.opt_state)] == jax.tree.leaves(
      layouts.opt_state)
