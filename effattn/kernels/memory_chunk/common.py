"""Shapes, padding and the per-token masks every path of the memory chunk update shares.

Notation (one batch row, one head; docs/mechanisms_memory.md derives every line):
  tokens t = 1..T with key k_t [Dk], value v_t [Dv], query q_t [Dk];
  theta_t (learning rate), alpha_t (forgetting), eta_t (momentum) in (0, 1);
  memory W [Dk, Dv] (M(k) = k W) and momentum S [Dk, Dv].

Packed sequences restart the memory: the first token of a new segment sees W = S = 0. In the
chunked form, each chunk's carried state belongs to the segment of the token before the chunk;
`carry_i` says whether token i still belongs to it, and `end_i` marks the last real token of each
chunk, where the carried state is read off (the last chunk may be padded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_time(x: jax.Array, chunk: int, value=0) -> jax.Array:
  """Pads axis 1 (time) up to a multiple of `chunk`."""
  pad = -x.shape[1] % chunk
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def log_gates(alpha: jax.Array, eta: jax.Array):
  """(log(1 - alpha), log(eta)) in float32, finite for gates in the open interval (0, 1)."""
  tiny = jnp.finfo(jnp.float32).tiny
  keep = jnp.log(jnp.maximum(1.0 - alpha.astype(jnp.float32), tiny))
  mom = jnp.log(jnp.maximum(eta.astype(jnp.float32), tiny))
  return keep, mom


def chunk_masks(segment_ids: jax.Array, length: int, chunk: int):
  """Per-token masks of the chunked form, on the padded time axis.

  Args:
    segment_ids: [B, T] int32 (any ids; a change of id starts a new segment).
    length: T. chunk: C.

  Returns:
    seg [B, Tp] int32 (padded tokens repeat the last id), carry [B, Tp] float32 (token i belongs
    to the segment of the state entering its chunk), end [B, Tp] float32 (one-hot of each
    chunk's last real token).
  """
  b = segment_ids.shape[0]
  seg = pad_time(segment_ids.astype(jnp.int32), chunk)
  padded = seg.shape[1]
  t = jnp.arange(padded)
  seg = jnp.where(t < length, seg, segment_ids[:, -1:].astype(jnp.int32))
  # The state entering chunk n belongs to token n*C - 1 (chunk 0: to token 0's segment).
  before = jnp.maximum((t // chunk) * chunk - 1, 0)
  carry = (seg == jnp.take_along_axis(seg, jnp.broadcast_to(before, (b, padded)), 1))
  last = jnp.minimum((t // chunk) * chunk + chunk - 1, length - 1)
  end = jnp.broadcast_to(t == last, (b, padded))
  return seg, carry.astype(jnp.float32), end.astype(jnp.float32)
