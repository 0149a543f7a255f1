"""Gradient accumulation on a mesh: each micro-step computes 1/A of every device's rows.

Micro-batches made of contiguous rows sat on a few devices only, so XLA gathered them and every
device computed its whole share in each of the A micro-steps (A times the work, no memory saved).
"""

import jax
import numpy as np
from flax import nnx

from configs import base
from effattn.model import Transformer
from effattn.train import optimizer, sharding, state, step


def compiled_step(accum: int):
  config = base.get_config()
  config.model.vocab_size, config.model.d_model = 64, 32
  config.model.num_layers, config.model.num_heads = 1, 2
  mesh = sharding.make_mesh(config.mesh)  # data over the 8 host devices
  tx, schedule = optimizer.make_optimizer(config.optimizer, 10)
  graphdef, train_state = state.create(Transformer(config.model, rngs=nnx.Rngs(0)), tx)
  rules = sharding.logical_rules(config.mesh)
  train_state = jax.device_put(train_state, sharding.param_shardings(train_state, mesh, rules))
  rows = sharding.batch_sharding(mesh)
  batch = {k: jax.device_put(np.zeros((32, 16), np.int32), rows)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["weights"] = jax.device_put(np.ones((32, 16), np.float32), rows)
  fn = jax.jit(step.make_train_step(graphdef, tx, schedule, grad_accum_steps=accum))
  return fn.lower(train_state, batch).compile()


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_micro_batches_stay_on_their_devices():
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  whole, accumulated = compiled_step(1), compiled_step(4)
  assert "all-gather" not in accumulated.as_text()
  # XLA's cost analysis counts a loop body once: one micro-step is a quarter of the step.
  assert flops(accumulated) < 0.4 * flops(whole), (flops(accumulated), flops(whole))
