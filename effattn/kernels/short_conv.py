"""Short causal depthwise convolution (the q/k/v convs of Gated DeltaNet and Titans).

    y, tail = short_conv(x, taps, tail=None, segment_ids=None)

y_t = sum_j taps[K-1-j] * x_{t-j} for j < K, per channel; x_{t-j} counts only inside t's
segment. `tail` holds the K - 1 inputs before x (decoding), else zeros; the new tail is x's last
K - 1 inputs (with the old tail in front when T < K - 1).

With T split over mesh.sequence (kernels/context_parallel.py), each chunk needs the K - 1 inputs
before it in natural order, which other devices hold: every device sends the last
min(K - 1, C) inputs of its two chunks and their segment ids (an all-gather of 2 (K - 1) tokens
per device and row), and each chunk takes its halo from the gathered tails. The conv itself
then runs on the device's chunks as on one device. Gradients by autodiff (the all-gather's
transpose returns each halo's cotangent to the device that owns it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from effattn.kernels import context_parallel as cp


# Rematerialized: autodiff would keep, per tap, the shifted [B, T, C] input and its segment mask
# for the backward (K copies of x); recomputing them from x is a cheap elementwise pass.
@jax.checkpoint
def _conv(x, taps, tail, segment_ids, tail_segment_ids):
  """One device: x [B, T, C], tail [B, K-1, C] (or None: zeros), segment ids [B, T] and
  [B, K-1] of the tail (None: the tail continues x's first segment)."""
  b, t, c = x.shape
  width = taps.shape[0]
  past = jnp.zeros((b, width - 1, c), x.dtype) if tail is None else tail.astype(x.dtype)
  full = jnp.concatenate([past, x], axis=1)                               # [B, K-1+T, C]
  if segment_ids is not None:  # tokens of the previous segments fall out of reach
    if tail_segment_ids is None:
      tail_segment_ids = jnp.broadcast_to(segment_ids[:, :1], (b, width - 1))
    seg = jnp.concatenate([tail_segment_ids.astype(segment_ids.dtype), segment_ids], axis=1)
  y = jnp.zeros_like(x)
  for lag in range(width):
    start = width - 1 - lag
    shifted = full[:, start:start + t]
    if segment_ids is not None:
      shifted = jnp.where((seg[:, start:start + t] == segment_ids)[..., None], shifted, 0)
    y = y + shifted * taps[width - 1 - lag].astype(x.dtype)
  return y, full[:, t:]


def _halo(x, n: int, width: int, fill):
  """[2B, C, ...] this device's chunks -> ([2B, K-1, ...] the K - 1 inputs before each chunk in
  natural order (`fill` before the sequence), [B, K-1, ...] the sequence's last K - 1)."""
  b2, c = x.shape[:2]
  b, m = b2 // 2, min(width - 1, c)
  tails = cp.gather_chunks(x[:, c - m:].reshape(2, b, m, *x.shape[2:]), n)  # [2n, B, m, ...]
  flat = jnp.moveaxis(tails, 0, 1).reshape(b, 2 * n * m, *x.shape[2:])  # natural order
  front = jnp.full((b, width - 1) + x.shape[2:], fill, x.dtype)
  padded = jnp.concatenate([front, flat], axis=1)
  # Chunk j's halo ends where its tokens begin: position (K - 1) + j m of `padded`.
  halo = jnp.stack([jax.lax.dynamic_slice_in_dim(padded, j * m, width - 1, axis=1)
                    for j in (cp.own_chunks(n)[0], cp.own_chunks(n)[1])])
  return halo.reshape(b2, width - 1, *x.shape[2:]), padded[:, -(width - 1):]


def _context_parallel(n: int, x, taps, segment_ids):
  """On one device of the sequence axis: its chunks [B, 2C, C_ch] -> (y, the sequence's tail)."""
  width = taps.shape[0]
  x2 = cp.split_chunks(x)
  seg2 = None if segment_ids is None else cp.split_chunks(segment_ids.astype(jnp.int32))
  halo, last = _halo(x2, n, width, 0)
  halo_seg = None if seg2 is None else _halo(seg2, n, width, -1)[0]
  y, _ = _conv(x2, taps, halo, seg2, halo_seg)
  return cp.join_chunks(y), last


@jax.jit  # eager calls (tests, decoding) compile once per shape, not once per op
def short_conv(x, taps, tail=None, segment_ids=None):
  """Causal depthwise convolution (module docstring).

  Args:
    x: [B, T, C] inputs; taps: [K, C] (taps[K-1] weighs the current input).
    tail: [B, K-1, C] the inputs before x (decoding), or None for the start of a sequence.
    segment_ids: [B, T] packed sequences, or None.

  Returns:
    (y [B, T, C] in x's dtype, the new tail [B, K-1, C]).
  """
  n = cp.sequence_size()
  if n == 1 or taps.shape[0] == 1:
    return _conv(x, taps, tail, segment_ids, None)
  if tail is not None:
    raise ValueError(f"short_conv context-parallel (mesh.sequence={n}): a decoding tail has no "
                     "split path; decode with mesh.sequence=1")
  cp.check_length("short_conv", x.shape[1], n)
  b, _, c = x.shape
  shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((b, taps.shape[0] - 1, c), x.dtype))
  body = functools.partial(_context_parallel, n)
  return cp.shard("short_conv", body, ("BTC", "KC", "BT"), ("BTC", "BKC"), shapes)(
      x, taps, segment_ids)
