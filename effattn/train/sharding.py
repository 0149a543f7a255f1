"""Device mesh with named axes (data, fsdp, sequence, tensor) and the sharding rules for params
and batches.

Params: each array's largest dimension divisible by the fsdp size is split over `fsdp`; the next
largest divisible by the tensor size over `tensor`; everything else is replicated.
Batches: the leading (batch) dimension is split over data x fsdp; each process puts its own rows.
With mesh.sequence > 1 every [B, T] field is also split over `sequence`, its tokens in the
zig-zag order of kernels/context_parallel.py (context parallelism).
Kernels: `ambient(mesh)` makes the mesh jax's current one while steps are traced, so each op's
Pallas kernel runs per shard (kernels/mesh.py: batch over data x fsdp, heads over tensor).
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from effattn.kernels import context_parallel
from effattn.kernels.mesh import BATCH_AXES, HEAD_AXIS, SEQUENCE_AXIS

AXES = BATCH_AXES + (SEQUENCE_AXIS, HEAD_AXIS)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  fsdp, tensor = mesh_cfg.fsdp, mesh_cfg.tensor
  sequence = mesh_cfg.get("sequence", 1)
  data = mesh_cfg.data if mesh_cfg.data > 0 else len(devices) // (fsdp * sequence * tensor)
  if data * fsdp * sequence * tensor != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x sequence={sequence} x tensor={tensor} "
                     f"must equal the {len(devices)} devices; set mesh.data=-1 or adjust the axes")
  mesh = Mesh(np.asarray(devices).reshape(data, fsdp, sequence, tensor), AXES)
  logging.info("mesh %s on %d %s device(s)", dict(mesh.shape), len(devices),
               jax.default_backend())
  return mesh


def param_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
  spec = [None] * len(shape)
  for axis in ("fsdp", "tensor"):
    size = mesh.shape[axis]
    if size == 1:
      continue
    free = [i for i in np.argsort(shape)[::-1] if spec[i] is None and shape[i] % size == 0]
    if free:
      spec[free[0]] = axis
  return P(*spec)


def param_shardings(tree, mesh: Mesh):
  """NamedSharding per leaf of a param/optimizer tree (scalars replicated)."""
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), mesh)), tree)


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


def ambient(mesh: Mesh) -> contextlib.AbstractContextManager:
  """`jax.set_mesh(mesh)` for a mesh of several devices: steps traced inside run each Pallas
  kernel per shard (kernels/mesh.py). One device needs no mesh, and its program stays the one
  traced without any (jax.set_mesh alone renames a few of its functions)."""
  return jax.set_mesh(mesh) if mesh.size > 1 else contextlib.nullcontext()


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the {shards} "
                     "data x fsdp shards of the mesh")
