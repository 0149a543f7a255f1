"""Device mesh with named axes (data, fsdp, sequence, tensor) and the sharding rules for params
and batches.

Params: each parameter's logical axis names (effattn/logical_axes.py) are mapped to mesh axes by
the rule table `config.mesh.rules` (configs/base.py): FSDP over `fsdp` on d_model, Megatron
tensor parallelism over `tensor` (q / k / v and the MLP's gate / up split by output columns,
the attention output and MLP down projections by input rows). Arrays without names (a
mechanism's extras, scalars) take `fallback_spec`: the largest dimension divisible by the fsdp
size over `fsdp`, nothing over `tensor`. The optimizer state has the parameters' names.
Batches: the leading (batch) dimension is split over data x fsdp; each process puts its own rows.
With mesh.sequence > 1 every [B, T] field is also split over `sequence`, its tokens in the
zig-zag order of kernels/context_parallel.py (context parallelism).
Kernels and activations: `ambient(mesh, rules)` makes the mesh jax's current one and the rules
the activations' while steps are traced, so each op's Pallas kernel runs per shard
(kernels/mesh.py: batch over data x fsdp, heads over tensor) and the residual stream and heads
are constrained at block boundaries (logical_axes.constrain; their T dimension over
`sequence`).
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from effattn import logical_axes
from effattn.kernels import context_parallel
from effattn.kernels.mesh import BATCH_AXES, HEAD_AXIS, SEQUENCE_AXIS

AXES = BATCH_AXES + (SEQUENCE_AXIS, HEAD_AXIS)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The (data, fsdp, sequence, tensor) mesh of `devices` (default: all), laid out by
  `jax.make_mesh`: on a TPU slice the last axes follow the torus's rings, on GPUs devices are
  ordered by id."""
  devices = list(jax.devices() if devices is None else devices)
  fsdp, tensor = mesh_cfg.fsdp, mesh_cfg.tensor
  sequence = mesh_cfg.get("sequence", 1)
  data = mesh_cfg.data if mesh_cfg.data > 0 else len(devices) // (fsdp * sequence * tensor)
  if data * fsdp * sequence * tensor != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x sequence={sequence} x tensor={tensor} "
                     f"must equal the {len(devices)} devices; set mesh.data=-1 or adjust the axes")
  # Auto axes: XLA's partitioner places what the shardings and constraints leave open
  # (jax.make_mesh's default would be Explicit sharding types).
  mesh = jax.make_mesh((data, fsdp, sequence, tensor), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
  check_process_groups(mesh.devices)
  logging.info("mesh %s on %d %s device(s)", dict(mesh.shape), len(devices),
               jax.default_backend())
  return mesh


def check_process_groups(devices: np.ndarray) -> None:
  """Each process feeds its own rows of the batch (put_batch), so the devices that share a row,
  those along sequence x tensor of one (data, fsdp) index, must all be one process's. devices:
  the mesh's [data, fsdp, sequence, tensor] array (anything with a `process_index`)."""
  groups = np.vectorize(lambda d: d.process_index)(devices).reshape(
      devices.shape[0] * devices.shape[1], -1)
  for row, group in enumerate(groups):
    if len(set(group.tolist())) > 1:
      raise ValueError(f"mesh sequence={devices.shape[2]} x tensor={devices.shape[3]}: the "
                       f"devices of batch shard {row} span processes {sorted(set(group.tolist()))}"
                       ", but each process reads its own rows; make mesh.sequence x mesh.tensor "
                       "fit in one host's devices (jax.local_device_count())")


def logical_rules(mesh_cfg) -> logical_axes.Rules:
  """config.mesh.rules, checked against the mesh's axis names (ConfigError naming an entry)."""
  return logical_axes.check_rules(mesh_cfg.rules, AXES)


def fallback_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
  """An array without logical names: its largest dimension that divides by the fsdp size is
  split over `fsdp`; the rest (and every scalar) is replicated."""
  spec = [None] * len(shape)
  size = mesh.shape["fsdp"]
  if size > 1:
    free = [i for i in np.argsort(shape)[::-1] if shape[i] % size == 0]
    if free:
      spec[free[0]] = "fsdp"
  return P(*spec)


def param_shardings(tree, mesh: Mesh, rules: logical_axes.Rules):
  """NamedSharding per leaf of a train state, param or optimizer tree: a variable with logical
  names by `rules`, anything else by `fallback_spec`."""
  sizes = dict(mesh.shape)

  def one(x):
    if isinstance(x, nnx.Variable):
      named = logical_axes.names_of(x)
      shape = np.shape(x.get_value())
      spec = (logical_axes.spec(named[0], shape, rules, sizes, named[1]) if named
              else fallback_spec(shape, mesh))
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, fallback_spec(np.shape(x), mesh))

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def put_batch(batch: dict, batch_sharding: NamedSharding) -> dict:
  """This process's rows of the global batch -> one sharded global jax array per field.

  With a sequence axis, each [B, T] field (tokens, targets, weights, positions, segment ids
  alike) goes in the zig-zag layout, T split over it; [B] fields (class targets) by rows only.
  """
  n = jax.process_count()
  mesh = batch_sharding.mesh
  sequence = mesh.shape.get(SEQUENCE_AXIS, 1)
  tokens = NamedSharding(mesh, P(BATCH_AXES, SEQUENCE_AXIS))
  rows_and_tokens = np.shape(batch["inputs"])[:2] if "inputs" in batch else None

  def put(x):
    sharding = batch_sharding
    if sequence > 1 and np.shape(x)[:2] == rows_and_tokens:
      x, sharding = context_parallel.to_zigzag(np.asarray(x), sequence), tokens
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * n, *x.shape[1:]))

  return jax.tree.map(put, batch)


@contextlib.contextmanager
def ambient(mesh: Mesh, rules: logical_axes.Rules | None = None):
  """`jax.set_mesh(mesh)` and the activation rules for a mesh of several devices: steps traced
  inside run each Pallas kernel per shard (kernels/mesh.py) and constrain activations by
  `rules` (logical_axes; None: no constraints). One device needs no mesh, and its program
  stays the one traced without any (jax.set_mesh alone renames a few of its functions)."""
  with contextlib.ExitStack() as stack:
    if mesh.size > 1:
      stack.enter_context(jax.set_mesh(mesh))
      if rules is not None:
        stack.enter_context(logical_axes.use_rules(rules))
    yield


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the {shards} "
                     "data x fsdp shards of the mesh")
