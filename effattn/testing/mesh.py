"""The trainer's loss and gradients on a mesh of host devices, beside the same on one device.

    run = MeshRun(config)                         # model, optimizer, a packed batch
    want = run.loss_and_grads()                   # no mesh: the one-device program
    got = run.loss_and_grads(mesh=(2, 2, 2))      # (data, fsdp, tensor), rules ambient
    assert_trees_close("grads", want[1], got[1], reduction=...)

The mesh runs as the trainer runs it: parameters placed by `sharding.param_shardings` with
`config.mesh.rules`, the batch split by `sharding.batch_sharding`, and the function traced
inside `sharding.ambient(mesh, rules)` (kernels per shard, activation constraints). tests/
conftest.py gives the test process its 8 host devices.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from flax import nnx

from effattn.model import Transformer
from effattn.train import optimizer, sharding, state, step


def packed_batch(rng: np.random.Generator, b: int, t: int, vocab: int) -> dict:
  """Two documents in every even row, one document and right padding in every odd row."""
  seg = np.ones((b, t), np.int32)
  seg[0::2, t // 2:] = 2
  seg[1::2, t - 5:] = 0
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  pos[0::2, t // 2:] -= t // 2
  tokens = rng.integers(1, vocab, (b, t), dtype=np.int32)
  return {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1),
          "weights": (seg > 0).astype(np.float32), "segment_ids": seg, "positions": pos}


def mesh_config(config, shape: tuple[int, int, int]):
  """`config` with mesh.(data, fsdp, tensor) = shape."""
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  return config


class MeshRun:
  """A model of `config.model` (vocab_size set), its train state and a packed batch of
  `batch` rows of data.seq_len tokens."""

  def __init__(self, config, *, batch: int = 8, seed: int = 0):
    self.config = config
    model = Transformer(config.model, rngs=nnx.Rngs(seed))
    self.tx, self.schedule = optimizer.make_optimizer(config.optimizer, 10)
    self.graphdef, self.state = state.create(model, self.tx)
    self.batch = packed_batch(np.random.default_rng(seed), batch, config.data.seq_len,
                              config.model.vocab_size)

  def loss(self, params, rest, batch):
    logits, aux, _ = step.forward(self.graphdef, params, rest, batch, train=True)
    sums = step.weighted_sums(logits, batch)
    return sums["loss_sum"] / sums["weight_sum"] + step.aux_loss(aux)

  def placed(self, shape: tuple[int, int, int] | None):
    """(mesh or None, rules or None, train state, batch) placed as the trainer places them."""
    if shape is None:
      return None, None, self.state, self.batch
    cfg = mesh_config(self.config, shape)
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.mesh)
    train_state = jax.device_put(self.state, sharding.param_shardings(self.state, mesh, rules))
    return mesh, rules, train_state, sharding.put_batch(self.batch, sharding.batch_sharding(mesh))

  def loss_and_grads(self, mesh: tuple[int, int, int] | None = None):
    """(loss, grads of the params) of the batch: on one device (mesh None) or on a
    (data, fsdp, tensor) mesh of host devices."""
    mesh, rules, train_state, batch = self.placed(mesh)
    fn = jax.jit(jax.value_and_grad(self.loss))  # a fresh jit: traced under this context
    with sharding.ambient(mesh, rules) if mesh is not None else contextlib.nullcontext():
      return jax.device_get(fn(train_state.params, train_state.rest, batch))

  def compiled_step(self, mesh: tuple[int, int, int]):
    """The trainer's jitted train step, compiled on the mesh (for its HLO)."""
    mesh, rules, train_state, batch = self.placed(mesh)
    fn = jax.jit(step.make_train_step(self.graphdef, self.tx, self.schedule))
    with sharding.ambient(mesh, rules):
      return fn.lower(train_state, batch).compile()

