"""Pallas kernels on a device mesh: every kernel call runs per shard, under `jax.shard_map`.

XLA cannot partition a custom call it cannot see into: it gathers a Triton kernel's operands
and runs the whole batch on every GPU, and a Mosaic TPU kernel fails to compile ("Mosaic kernels
cannot be automatically partitioned"). So each family's api.py calls its kernel through

    o, lse = mesh.on_mesh("block_sparse", path, kernel, ("BTHD", "BSHD", ...), ("BTHD", "BHT"))(
        q, k, ...)

which, when `path` is a Pallas path, reads the ambient mesh (`jax.set_mesh(mesh)`; the trainer
sets it around its steps) and runs `kernel` on each device's block of the arguments. A layout
has one letter per dimension:

  "B"  a batch dim, split over the mesh's batch axes (BATCH_AXES: data x fsdp);
  "H"  a head dim, split over HEAD_AXIS (tensor) in contiguous blocks, so a GQA group (query
       heads h // (H / H_kv) of one kv head) stays on one shard when H_kv divides by it;
  any other letter: whole on every shard.

A "B" or "H" dim of size 1 is a broadcast dim (block lists shared by every row, the one kv head
of MQA, per-key vectors shared by the heads) and stays whole. Mesh axes of neither role hold
copies: on the trainer's mesh that is SEQUENCE_AXIS, whose context-parallel ops call their
kernels inside their own shard_map (kernels/context_parallel.py), where every axis is already
manual. Gradients need nothing more: shard_map's transpose sums the cotangent of an input held
whole over the axes it was not split on.

The xla and reference paths are left to XLA's partitioner, which sees their operations. Without
a mesh, on a mesh whose batch and head axes all have size 1 (one device), or inside a shard_map
that already made those axes manual, `on_mesh` returns `kernel` itself: the program is the one
without this module.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
# Tokens split over it in zig-zag order (context parallelism, kernels/context_parallel.py); the
# kernels this module wraps hold whole sequences and leave it alone.
SEQUENCE_AXIS = "sequence"


def free_axes(mesh) -> dict[str, int]:
  """The mesh's axes not already manual (an enclosing shard_map's), with their sizes."""
  manual = set(getattr(mesh, "manual_axes", ()))
  return {a: n for a, n in mesh.shape.items() if a not in manual}


def ambient_mesh():
  """The mesh kernels split over (jax.set_mesh's), or None when splitting would change nothing."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  free = free_axes(mesh)
  return mesh if any(free.get(a, 1) > 1 for a in BATCH_AXES + (HEAD_AXIS,)) else None


def _spec(op: str, layout: str, shape: tuple[int, ...], free: dict[str, int],
          sequence: bool) -> P:
  if len(layout) != len(shape):
    raise ValueError(f"{op}: layout {layout!r} does not match an argument of shape {shape}")
  batch = tuple(a for a in BATCH_AXES if a in free)
  rows = math.prod(free[a] for a in batch)
  heads = free.get(HEAD_AXIS, 1)
  tokens = free.get(SEQUENCE_AXIS, 1) if sequence else 1
  dims = []
  for role, size in zip(layout, shape):
    if role == "B" and size > 1 and rows > 1:
      if size % rows:
        raise ValueError(
            f"{op} on the mesh: a batch of {size} rows (argument {shape}) does not split over "
            f"mesh data x fsdp = {rows}; make train.batch_size / train.grad_accum_steps a "
            f"multiple of {rows}")
      dims.append(batch)
    elif role == "H" and size > 1 and heads > 1:
      if size % heads:
        raise ValueError(
            f"{op} on the mesh: {size} heads (argument {shape}) do not split over "
            f"mesh.tensor={heads}; give the mechanism a multiple of {heads} query and kv heads "
            "(model.num_heads, model.num_kv_heads) or set mesh.tensor=1")
      dims.append(HEAD_AXIS)
    elif role == "T" and tokens > 1:  # the caller checked that T splits (context_parallel)
      dims.append(SEQUENCE_AXIS)
    else:
      dims.append(None)
  return P(*dims)


def _specs(op: str, layouts, tree, free: dict[str, int], *, sequence: bool = False) -> list[P]:
  """One spec per array leaf of `tree`; `layouts` is a prefix of it (a string per subtree).
  sequence: "T" dims split over SEQUENCE_AXIS too (context-parallel ops; else they stay whole)."""
  per_leaf = jax.tree.leaves(
      jax.tree.map(lambda lay, sub: jax.tree.map(lambda _: lay, sub), layouts, tree))
  return [_spec(op, lay, x.shape, free, sequence)
          for lay, x in zip(per_leaf, jax.tree.leaves(tree))]


def on_mesh(op: str, path: str, kernel: Callable, in_layouts: Sequence[str],
            out_layouts) -> Callable:
  """`kernel` run on each shard of the ambient mesh when `path` is a Pallas path (the module
  docstring has the rules), else `kernel` itself.

  op: the family's name, for errors. in_layouts: one layout per positional argument of
  `kernel`, applied to every array in it (an argument may be None, or a tuple holding Nones);
  "" marks a scalar. out_layouts: the layouts of `kernel`'s outputs, in their tree structure.
  """
  if not path.startswith("pallas_"):
    return kernel

  def run(*args):
    mesh = ambient_mesh()
    if mesh is None:
      return kernel(*args)
    return shard(op, kernel, mesh, in_layouts, out_layouts)(*args)

  return run


def shard(op: str, kernel: Callable, mesh, in_layouts: Sequence[str], out_layouts, *,
          out_shapes=None, sequence: bool = False) -> Callable:
  """`kernel` under shard_map on every free axis of `mesh`, its arguments and outputs split by
  the layouts (on_mesh's rules; with `sequence`, "T" dims split over SEQUENCE_AXIS as well).

  out_shapes: the outputs' shapes (a tree of ShapeDtypeStructs) where `kernel` cannot be traced
  outside the shard_map (it uses the mesh's collectives); default jax.eval_shape of it.
  """

  def run(*args):
    if len(in_layouts) != len(args):
      raise ValueError(f"{op}: {len(in_layouts)} layouts for {len(args)} arguments")
    free = free_axes(mesh)
    leaves, treedef = jax.tree.flatten(args)
    shapes = jax.eval_shape(kernel, *args) if out_shapes is None else out_shapes
    out_leaves, out_tree = jax.tree.flatten(shapes)

    def body(*local):
      return jax.tree.leaves(kernel(*jax.tree.unflatten(treedef, local)))

    # check_vma=False: a pallas_call carries no varying-axes types to check.
    sharded = jax.shard_map(
        body, mesh=mesh, axis_names=frozenset(free), check_vma=False,
        in_specs=tuple(_specs(op, tuple(in_layouts), args, free, sequence=sequence)),
        out_specs=_specs(op, out_layouts, jax.tree.unflatten(out_tree, out_leaves), free,
                        sequence=sequence))
    return jax.tree.unflatten(out_tree, sharded(*leaves))

  return run
