"""Every registered mechanism goes through the trainer's jitted step, state updates included.

The mechanism suite (tests/attention/test_mechanisms.py) checks a module alone; this test catches
what only the real step shows:
state mutated under jit(grad(...)) (routing centroids), aux terms, gradients reaching every
parameter, and a packed batch with padding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effattn import attention
from effattn.model.transformer import Transformer
from effattn.testing.mechanisms import tiny_model
from effattn.train.optimizer import make_optimizer
from effattn.train.state import create
from effattn.train.step import make_train_step


def tiny_model_config(name: str):
  """The mechanism suite's tiny model (its TINY options included) on the xla path."""
  config = tiny_model(name)
  config.model.attention.impl = "xla"
  config.model.vocab_size = 32
  return config


def packed_batch(rng: np.random.Generator, b: int = 2, t: int = 32) -> dict:
  """Two documents in row 0, one document and right padding in row 1."""
  seg = np.ones((b, t), np.int32)
  seg[0, t // 2:] = 2
  seg[1, t - 5:] = 0
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  pos[0, t // 2:] -= t // 2
  tokens = rng.integers(1, 32, (b, t), dtype=np.int32)
  return {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1),
          "weights": (seg > 0).astype(np.float32), "segment_ids": seg, "positions": pos}


@pytest.mark.parametrize("name", attention.names())
def test_jitted_train_step_updates_every_parameter(name):
  config = tiny_model_config(name)
  model = Transformer(config.model, rngs=nnx.Rngs(0))
  tx, schedule = make_optimizer(config.optimizer, total_steps=10)
  graphdef, state = create(model, tx)
  step = jax.jit(make_train_step(graphdef, tx, schedule))
  batch = packed_batch(np.random.default_rng(0))

  new_state, metrics = step(state, batch)
  new_state, metrics = step(new_state, batch)  # second call: state from a jitted step

  assert np.isfinite(float(metrics["loss"])), name
  before, after = jax.tree.leaves(state.params), jax.tree.leaves(new_state.params)
  unchanged = [i for i, (x, y) in enumerate(zip(before, after)) if jnp.array_equal(x, y)]
  assert not unchanged, f"{name}: {len(unchanged)} of {len(before)} parameters got no update"
  for x, y in zip(jax.tree.leaves(state.rest), jax.tree.leaves(new_state.rest)):
    assert x.shape == y.shape and x.dtype == y.dtype
  if name == "routing":  # k-means centroids are refreshed inside the step
    assert any(not jnp.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(state.rest), jax.tree.leaves(new_state.rest)))
