"""The grouped softmax a chunk of queries at a time: reference.py's arithmetic, O(chunk * T)
memory (each chunk's scores are recomputed in the backward pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effattn.kernels.grouped_softmax.reference import group_table, grouped_rows


def chunked_grouped_softmax_attention(q, k, v, k_land, gid, seg, *, scale: float, chunk: int):
  """grouped_softmax_attention's output, computed `chunk` queries at a time.

  Each chunk's [B, H, chunk, T] scores live only inside its step, and the backward pass
  recomputes them (jax.checkpoint), so memory is O(chunk * T) per layer instead of O(T^2);
  FLOPs are the dense form's. Returns o [B, T, H, D].
  """
  b, t, h, d = q.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  table = group_table(gid, seg, k_land.shape[1])
  # Padded query rows get group -1: they see no key and are dropped below.
  rows = (jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))), jnp.arange(n * chunk),
          jnp.pad(gid, ((0, 0), (0, pad)), constant_values=-1),
          jnp.pad(seg, ((0, 0), (0, pad))))
  chunks = tuple(jnp.moveaxis(r.reshape(r.shape[:1] + (n, chunk) + r.shape[2:]), 1, 0)
                 if r.ndim > 1 else r.reshape(n, chunk) for r in rows)

  @jax.checkpoint
  def one_chunk(args):
    q_c, idx_c, gid_c, seg_c = args
    return grouped_rows(q_c, idx_c, gid_c, seg_c, k, v, k_land, gid, seg, table,
                        scale=scale)[0]

  o = jax.lax.map(one_chunk, chunks)  # [n, B, chunk, H, D]
  o = jnp.moveaxis(o, 0, 1).reshape(b, n * chunk, h, d)[:, :t]
  return o.astype(q.dtype)
