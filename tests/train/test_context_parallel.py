"""The trainer with mesh.sequence > 1: batches in the zig-zag layout, one step equal to the
one-device step, and configs that cannot run context-parallel refused in one line."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from effattn import config as config_lib
from effattn.kernels import context_parallel as cp
from effattn.model import Transformer
from effattn.ranges import ConfigError
from effattn.testing import assert_trees_close
from effattn.testing.configs import base_config
from effattn.testing.meshes import FAST_COMPILE, host_mesh
from effattn.train import optimizer, sharding, state, step


# Titans with the linear memory: MAG (conv halo, memory scan, ring with persistent keys) and
# MAL (the attention over the memory's output); chunks of T / 2n = 2 tokens, conv width 4.
TITANS = ("neural_memory:variant=mag:chunk_size=2:num_persistent=2,"
          "neural_memory:variant=mal:chunk_size=2:num_persistent=2")


def _config(pattern="linear,softmax", **mesh):  # default: both families of ring and scan ops
  config = base_config()
  m = config.model
  m.vocab_size, m.d_model, m.num_heads, m.mlp = 64, 32, 2, "none"
  m.num_layers, m.pattern = 2, pattern
  m.attention.impl = "xla"
  config.data.seq_len = 16
  # Plain SGD at lr 1: the step moves each parameter by minus its gradient, so comparing the
  # moves compares every gradient (Adam's sign-like first step would hide them, or blow up a
  # rounding difference in a near-zero one).
  opt = config.optimizer
  opt.name, opt.learning_rate, opt.schedule, opt.warmup_steps, opt.grad_clip = (
      "sgd", 1.0, "constant", 0, 0.0)
  config.mesh.update(mesh)
  config_lib.validate(config)
  return config


def _batch(b: int = 4, t: int = 16) -> dict:
  """Two packed sequences and padding per row (segment 0)."""
  rng = np.random.default_rng(0)
  seg = np.repeat(np.asarray([[1] * 5 + [2] * 9 + [0] * 2], np.int32), b, 0)
  pos = np.repeat(np.concatenate([np.arange(5), np.arange(9), [0, 0]])[None], b, 0)
  return {"inputs": rng.integers(0, 64, (b, t)).astype(np.int32),
          "targets": rng.integers(0, 64, (b, t)).astype(np.int32),
          "weights": (seg > 0).astype(np.float32), "segment_ids": seg,
          "positions": pos.astype(np.int32)}


def _step(config, mesh=None):
  tx, schedule = optimizer.make_optimizer(config.optimizer, 10)
  graphdef, train_state = state.create(Transformer(config.model, rngs=nnx.Rngs(0)), tx)
  train_step = jax.jit(step.make_train_step(graphdef, tx, schedule))
  if mesh is None:
    new_state, metrics = train_step.lower(train_state, _batch()).compile(FAST_COMPILE)(
        train_state, _batch())
    return _moves(train_state, new_state), metrics
  rules = sharding.logical_rules(config.mesh)
  train_state = jax.device_put(train_state, sharding.param_shardings(train_state, mesh, rules))
  with sharding.ambient(mesh, rules):
    batch = sharding.put_batch(_batch(), sharding.batch_sharding(mesh))
    lowered = train_step.lower(train_state, batch)
    for collective in ("collective_permute", "all_gather"):  # the ring, the scan of states
      assert collective in lowered.as_text(), f"no {collective}: the ops did not split T"
    new_state, metrics = lowered.compile(FAST_COMPILE)(train_state, batch)
    return (_moves(train_state, new_state), metrics), batch


def _moves(before, after):
  """What one step changed in each parameter (minus the gradient, under _config's SGD)."""
  return jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), nnx.to_pure_dict(before.params),
                      nnx.to_pure_dict(after.params))


@pytest.mark.parametrize("pattern", ["linear,softmax", TITANS])
def test_one_step_on_a_sequence_axis_equals_one_device(pattern):
  want_moves, want = _step(_config(pattern))
  config = _config(pattern, data=2, sequence=4)
  (got_moves, got), batch = _step(config, sharding.make_mesh(config.mesh))
  for key, value in _batch().items():  # every [B, T] field in the zig-zag layout
    assert isinstance(batch[key].sharding, NamedSharding)
    np.testing.assert_array_equal(np.asarray(batch[key]), cp.to_zigzag(value, 4), err_msg=key)
    assert "sequence" in str(batch[key].sharding.spec), key
  for key in ("loss", "grad_norm"):
    assert_trees_close(key, want[key], got[key], reduction=16)
  assert_trees_close("gradients (the parameters' moves)", want_moves, got_moves, reduction=64)


@pytest.mark.parametrize("overrides,match", [
    (dict(seq_len=20), "data.seq_len=20 must be a multiple of 2 x mesh.sequence=4"),
    (dict(pattern="mala"), "mesh.sequence=4: mala cannot run context-parallel"),
    (dict(pattern="softmax:window=4"), "a sliding window has no ring path"),
    (dict(causal=False), "linear cannot run context-parallel .*bidirectional"),
    (dict(pattern="neural_memory:variant=mac:chunk_size=2"), "MAC runs its attention and its "
     "memory in turn"),
    (dict(pattern="neural_memory:depth=2:chunk_size=2"), "a deep memory is not affine"),
    (dict(pattern="neural_memory"), "the 2 tokens of a context-parallel chunk .* multiple of "
     "model.attention.neural_memory.chunk_size=16"),
])
def test_what_cannot_run_context_parallel_names_the_fix(overrides, match):
  config = base_config()
  config.mesh.sequence = 4
  config.data.seq_len = overrides.get("seq_len", 16)
  config.model.causal = overrides.get("causal", True)
  config.model.pattern = overrides.get("pattern", "linear,softmax")
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(config)


def test_a_model_run_on_a_sequence_axis_refuses_what_cannot_split():
  config = base_config()
  config.model.vocab_size, config.model.d_model, config.model.num_heads = 64, 32, 2
  config.model.attention.name = "mala"
  model = Transformer(config.model, rngs=nnx.Rngs(0))
  with jax.set_mesh(host_mesh(sequence=4)), pytest.raises(
      ConfigError, match="mesh.sequence=4: mala cannot run context-parallel"):
    model(np.zeros((1, 16), np.int32))
