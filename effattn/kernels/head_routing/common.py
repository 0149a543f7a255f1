"""Pieces every head-routing path shares: tile sizes, the per-head token compaction, the math.

The op (api.py) computes, per head h, softmax attention only for the tokens routed to h (gate
!= 0). The kernels first *compact* each head's routed tokens to the front of the sequence axis,
keeping their order:

    slot[b, t, h]  = position of token t in head h's compacted order (routed tokens first),
    perm[b, s, h]  = the token in slot s (the inverse permutation),
    count[b, h]    = number of routed tokens,
    pos[b, h, s]   = perm[b, s, h] for s < count, -1 for the unused tail.

A query tile then holds `block_q` routed tokens, so the number of tiles a head computes is
ceil(count / block_q): work follows the routed fraction whatever the routing pattern (a raw
"skip query blocks with no routed token" rule saves nothing once block_q >> H / top_k, since
almost every block then holds a routed token of every head). Causality uses `pos`; sorted
positions make each tile's key range [0, max(pos)] contiguous.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from effattn.kernels import matmul
from effattn.kernels.permute import stable_partition

# Finite stand-in for -inf on masked scores: keeps max/exp arithmetic NaN-free.
MASK_VALUE = -1e30
# lse given to unused slots and rows that see no key: exp(s - lse) = 0 in the backward pass.
EMPTY_LSE = 1e30
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the kernels: block_q compacted queries by block_k keys (powers of two)."""

  block_q: int = 64
  block_k: int = 64

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if value < 16 or value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two >= 16; try 64 or 128")


class Compaction(NamedTuple):
  """Per-head compacted order of the routed tokens (see the module docstring)."""

  slot: jax.Array  # [B, T, H] int32: token -> slot
  perm: jax.Array  # [B, T, H] int32: slot -> token
  count: jax.Array  # [B, H] int32
  pos: jax.Array  # [B, H, T] int32: token index of each slot, -1 past count
  before: jax.Array  # [B, H, T + 1] int32: routed tokens with index < p, for p in 0..T


def compact(active: jax.Array) -> Compaction:
  """active [B, T, H] bool -> Compaction: permute.stable_partition along the tokens (two
  cumsums and one scatter with unique indices)."""
  b, t, h = active.shape
  perm, slot, count = stable_partition(active, axis=1)
  valid = jnp.arange(t, dtype=jnp.int32)[None, :, None] < count[:, None, :]
  pos = jnp.swapaxes(jnp.where(valid, perm, -1), 1, 2)
  routed = jnp.cumsum(active.astype(jnp.int32), axis=1)  # routed tokens up to t
  before = jnp.concatenate([jnp.zeros((b, h, 1), jnp.int32), jnp.swapaxes(routed, 1, 2)], axis=2)
  return Compaction(slot, perm, count, pos, before)


def gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, T, H, ...] -> x[b, index[b, s, h], h, ...] for index [B, T, H] (per-head gather)."""
  extra = x.ndim - 3
  idx = index.reshape(index.shape + (1,) * extra)
  return jnp.take_along_axis(x, idx, axis=1, mode="promise_in_bounds")


def key_block_bounds(c: Compaction, *, causal: bool, segments: bool, num_k_blocks: int,
                     block_k: int):
  """Slots each key block meets, for the dK/dV pass: (lo, mid, hi) [B, H, nK] int32.

  Slots [lo, mid) need the element mask, [mid, hi) see the whole key block unmasked.
  Causal: lo = routed tokens before the block, mid = routed tokens before its end (a query
  at or past the end sees every key of the block). A slot is unmasked here only if its whole
  query tile skipped the mask for this key block in the forward pass too.
  """
  b, h, t1 = c.before.shape
  t = t1 - 1
  hi = jnp.broadcast_to(c.count[:, :, None], (b, h, num_k_blocks))
  if causal:
    starts = jnp.minimum(jnp.arange(num_k_blocks) * block_k, t)
    ends = jnp.minimum((jnp.arange(num_k_blocks) + 1) * block_k, t)
    lo = c.before[:, :, starts]
    mid = c.before[:, :, ends]
  else:
    lo = jnp.zeros_like(hi)
    mid = lo
  if segments:
    mid = hi
  return lo.astype(jnp.int32), mid.astype(jnp.int32), hi.astype(jnp.int32)


def tile_mask(kv_idx, pos, q_seg, kv_seg, *, causal: bool, kv_len: int, block_q: int):
  """Element mask [bq, bk] of a key tile with token indices kv_idx for the compacted queries at
  pos (the forward and dQ kernels' of both backends)."""
  if causal:
    mask = kv_idx[None, :] <= pos[:, None]
  else:
    mask = jnp.broadcast_to(kv_idx[None, :] < kv_len, (block_q, kv_idx.shape[0]))
  if q_seg is not None:
    mask = mask & (q_seg[:, None] == kv_seg[None, :])
  return mask


# The routed-head tiles keep the backend's default precision for float32 operands.
dot = functools.partial(matmul.dot, exact_f32=False)
