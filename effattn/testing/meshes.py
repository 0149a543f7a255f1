"""Sharded runs on the test process's 8 host devices (tests/conftest.py): meshes with the
trainer's axes, a fast compile for CPU, and an op's outputs and input gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType

from effattn.train.sharding import AXES

# Interpreted kernels and shard_map'd rings make large CPU programs: compile them without
# XLA's costly passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def host_mesh(*, data: int = 1, fsdp: int = 1, sequence: int = 1, tensor: int = 1):
  """A mesh with the trainer's axes (train/sharding.AXES) on the first data x fsdp x sequence
  x tensor host devices."""
  shape = (data, fsdp, sequence, tensor)
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=jax.devices()[:math.prod(shape)])


def value_and_grads(op, inputs, weights):
  """jax.jit of inputs -> ((sum of <output, weight> over op's outputs, the outputs), the
  gradients of that sum by every input): one random cotangent checks every gradient."""

  def loss(*xs):
    out = op(*xs)
    return sum(jnp.vdot(o, w) for o, w in zip(jax.tree.leaves(out),
                                                jax.tree.leaves(weights))), out

  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(inputs))), has_aux=True))
