"""Head-routed attention through the block-sparse op: the "block_sparse" path.

Each head's routed tokens are compacted to the front (common.py), and the compacted queries go
to effattn.kernels.block_sparse with their true positions (`q_positions` = pos, -1 on unused
slots, which then see no key): query tile i of head h visits key blocks 0 .. max(pos) // bk
(causal) or all of them, and a tile past the head's count visits none. So the work follows the
routed fraction as on the Pallas paths, while the tiles run on whatever the block-sparse op
picks for this device: on a Hopper GPU its warp-specialized Mosaic GPU kernels (about cuDNN's
rate, docs/mosaic_gpu.md) instead of this family's Triton kernels. Gradients by autodiff through
the gather, the block-sparse op's own backward kernels, and the gates' product.
"""

from __future__ import annotations

import jax.numpy as jnp

from effattn.kernels.block_sparse import block_sparse_attention
from effattn.kernels.head_routing.common import compact, gather_tokens


def _lists(pos, *, causal: bool, block_q: int, block_k: int, num_k_blocks: int):
  """Key-block lists [B, H, nQ, nK] and counts [B, H, nQ] of the compacted query tiles."""
  b, h, t = pos.shape
  tiles = -(-t // block_q)
  pos = jnp.pad(pos, ((0, 0), (0, 0), (0, tiles * block_q - t)), constant_values=-1)
  last = jnp.max(pos.reshape(b, h, tiles, block_q), axis=-1)  # -1: an empty tile
  counts = (last // block_k + 1) if causal else jnp.full_like(last, num_k_blocks)
  counts = jnp.where(last >= 0, jnp.minimum(counts, num_k_blocks), 0).astype(jnp.int32)
  indices = jnp.broadcast_to(jnp.arange(num_k_blocks, dtype=jnp.int32), (b, h, tiles,
                                                                         num_k_blocks))
  return indices, counts


def head_routed_attention(q, k, v, gates, *, causal: bool, segment_ids=None, scale: float,
                          block_q: int, block_k: int, impl: str = "auto",
                          interpret: bool = False):
  """Same contract as reference.head_routed_attention; `impl` and `interpret` go to the
  block-sparse op (its "auto": Mosaic GPU on Hopper, Triton on other GPUs, xla elsewhere)."""
  active = gates != 0
  c = compact(active)
  t = q.shape[1]
  indices, counts = _lists(c.pos, causal=causal, block_q=block_q, block_k=block_k,
                           num_k_blocks=-(-t // block_k))
  q_seg = None
  if segment_ids is not None:
    seg = jnp.broadcast_to(segment_ids[:, :, None], c.perm.shape)
    q_seg = jnp.swapaxes(jnp.take_along_axis(seg, c.perm, axis=1), 1, 2)  # [B, H, T]
  o_c, _ = block_sparse_attention(
      gather_tokens(q, c.perm), k, v, indices, counts, block_q=block_q, block_k=block_k,
      causal=causal, q_positions=c.pos, q_segment_ids=q_seg, kv_segment_ids=segment_ids,
      scale=scale, impl=impl, interpret=interpret)
  o_u = gather_tokens(o_c, c.slot)  # back to token order, unweighted
  g = gates[..., None]
  return jnp.where(active[..., None], g * o_u.astype(jnp.float32), 0.0).astype(q.dtype)
