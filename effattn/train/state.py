"""Train state: the model split into params (differentiated) and other state (centroids, ...)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of nnx.Param variables
  rest: Any  # nnx.State of every other variable (AttentionState, ...)
  opt_state: Any


def split_model(model: nnx.Module):
  """-> (graphdef, params, rest)."""
  return nnx.split(model, nnx.Param, ...)


def create(model: nnx.Module, tx: optax.GradientTransformation):
  graphdef, params, rest = split_model(model)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                     opt_state=tx.init(params))
  return graphdef, state


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
