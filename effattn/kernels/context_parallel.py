"""Context parallelism: sequences split over the mesh's `sequence` axis, in zig-zag order.

With mesh.sequence = n > 1 every [B, T, ...] array is cut along T into 2n chunks of
C = T / 2n tokens, and device i of the axis holds chunk i followed by chunk 2n-1-i:

    n = 2, T = 8:  natural 01 23 45 67  ->  device 0 holds 01 67, device 1 holds 23 45

Under causal attention chunk c attends to c + 1 chunks, so a device holding chunks i and
2n-1-i does 2n + 1 chunk pairs of work whichever i it is: the ring of attention is balanced
(a contiguous split would give the last device (4n - 1) / 3 times the first's work).

The global arrays the model computes on are in this order: the trainer permutes every [B, T]
field of a batch alike (inputs, targets, weights, positions, segment ids;
train/sharding.put_batch). Token-wise layers (projections, norms, the MLP, RoPE from the
batch's positions, the loss) need nothing more. Each op whose result depends on token order
checks `sequence_size()` and runs under `shard`, where it sees its device's two chunks and the
axis's collectives:

  softmax, block_sparse  ring attention: K/V chunks passed around the ring, the partial
                         (o, lse) merged by log-sum-exp (block_sparse/context_parallel.py)
  linear_scan            a scan of each device's chunks from a zero state, the chunk states
                         combined across devices (`carried_states`), then the term of the state
                         carried in (linear_scan/context_parallel.py)
  memory_chunk           the same with the Titans memory's affine chunk maps
                         (memory_chunk/context_parallel.py)

Inside `shard` the sequence axis is manual, so an op called there (the per-chunk kernels) runs
on its device's arrays as on one device. T must split into 2n chunks (`check_length`; the
trainer checks data.seq_len at config time).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effattn.kernels import mesh as mesh_lib
from effattn.kernels.mesh import SEQUENCE_AXIS


def sequence_size() -> int:
  """Devices on the ambient mesh's sequence axis that ops split T over (1: none, or the axis is
  already manual inside a context-parallel op's shard_map)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return mesh_lib.free_axes(mesh).get(SEQUENCE_AXIS, 1)


def check_length(op: str, t: int, n: int) -> int:
  """Tokens per chunk C = T / 2n, or one line naming the fix."""
  if t % (2 * n):
    raise ValueError(f"{op}: T={t} tokens do not split into the 2 x mesh.sequence={n} chunks "
                     f"of context parallelism; make data.seq_len a multiple of {2 * n}")
  return t // (2 * n)


def zigzag_order(t: int, n: int) -> np.ndarray:
  """[T] int32: the natural token index at each position of the zig-zag layout."""
  c = check_length("the zig-zag token layout", t, n)
  chunks = np.asarray([j for i in range(n) for j in (i, 2 * n - 1 - i)])
  return (chunks[:, None] * c + np.arange(c)).reshape(-1).astype(np.int32)


def to_zigzag(x, n: int, axis: int = 1):
  """Natural token order -> the zig-zag layout along `axis` (numpy or jax arrays)."""
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.take(x, zigzag_order(x.shape[axis], n), axis=axis)


def from_zigzag(x, n: int, axis: int = 1):
  """The zig-zag layout -> natural token order along `axis` (numpy or jax arrays)."""
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.take(x, np.argsort(zigzag_order(x.shape[axis], n)), axis=axis)


def shard(op: str, fn: Callable, in_layouts: Sequence[str], out_layouts, out_shapes):
  """`fn` on every device of the ambient mesh: layouts as kernels/mesh.py's ("B" batch axes,
  "H" heads over tensor) with "T" split over the sequence axis. out_shapes: a tree of
  ShapeDtypeStructs of fn's global outputs."""
  return mesh_lib.shard(op, fn, jax.sharding.get_abstract_mesh(), in_layouts, out_layouts,
                        out_shapes=out_shapes, sequence=True)


def split_chunks(x: jax.Array) -> jax.Array:
  """[B, 2C, ...] (a device's two chunks) -> [2B, C, ...]: chunk slot s of row b at row s B + b,
  so one call of a per-sequence op runs both chunks."""
  b, t = x.shape[:2]
  return jnp.swapaxes(x.reshape(b, 2, t // 2, *x.shape[2:]), 0, 1).reshape(
      2 * b, t // 2, *x.shape[2:])


def join_chunks(x: jax.Array) -> jax.Array:
  """The inverse of split_chunks: [2B, C, ...] -> [B, 2C, ...]."""
  b, c = x.shape[0] // 2, x.shape[1]
  return jnp.swapaxes(x.reshape(2, b, c, *x.shape[2:]), 0, 1).reshape(b, 2 * c, *x.shape[2:])


# -- inside `shard` -------------------------------------------------------------------------


def own_chunks(n: int) -> jax.Array:
  """[2] int32: the natural chunk ids this device holds (i and 2n-1-i)."""
  i = jax.lax.axis_index(SEQUENCE_AXIS)
  return jnp.stack([i, 2 * n - 1 - i]).astype(jnp.int32)


def pass_on(tree, n: int):
  """Every array of `tree` sent to the next device of the ring (device i -> i + 1 mod n)."""
  perm = [(d, (d + 1) % n) for d in range(n)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, SEQUENCE_AXIS, perm), tree)


def gather_chunks(x: jax.Array, n: int) -> jax.Array:
  """[2, ...] per device (its chunks in layout order) -> [2n, ...] every chunk's, in natural
  order, on every device. Its transpose (a reduce-scatter) returns each chunk's cotangent."""
  both = jax.lax.all_gather(x, SEQUENCE_AXIS)  # [n, 2, ...]: device d holds chunks d, 2n-1-d
  return jnp.concatenate([both[:, 0], both[::-1, 1]], axis=0)


def chunk_entries(segment_ids: jax.Array, n: int) -> jax.Array:
  """[2n, B] bool: whether each chunk (natural order) continues the segment the chunk before it
  ends in. segment_ids: [2B, C] this device's chunks (split_chunks)."""
  ends = jnp.stack([segment_ids[:, 0], segment_ids[:, -1]], -1)  # [2B, 2]
  ends = gather_chunks(ends.reshape(2, -1, 2), n)  # [2n, B, 2]
  first, last = ends[..., 0], ends[..., 1]
  return jnp.concatenate([jnp.ones_like(first[:1], bool), first[1:] == last[:-1]], axis=0)


def carried_states(maps, offsets, entry, initial, *, apply: Callable, compose: Callable):
  """The state entering each chunk, from every chunk's affine map, by an associative scan.

  Chunk c (natural order) takes the state entering it to apply(maps[c], s) + offsets[c]; the
  next chunk starts from that unless `entry[c + 1]` is False (a new segment starts exactly at
  its first token), where it starts from zero.

  Args:
    maps, offsets: [2n, B, ...] per chunk; apply(map, state) and compose(later, earlier) (the
      map of `earlier` then `later`) broadcast over leading axes.
    entry: [2n, B] bool (entry[0] is not read). initial: [B, ...] the state entering chunk 0.

  Returns:
    (states [2n, B, ...] entering each chunk, the state after the last chunk).
  """
  keep = entry[1:]

  def continued(x):  # zero where the next chunk starts a new segment
    return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x, 0)

  steps = (continued(maps[:-1]), continued(offsets[:-1]))

  def combine(earlier, later):
    (a1, f1), (a2, f2) = earlier, later
    return compose(a2, a1), apply(a2, f1) + f2

  prefix_maps, prefix_offsets = jax.lax.associative_scan(combine, steps)
  after = apply(prefix_maps, initial[None]) + prefix_offsets
  states = jnp.concatenate([initial[None], after], axis=0)
  return states, apply(maps[-1], states[-1]) + offsets[-1]
