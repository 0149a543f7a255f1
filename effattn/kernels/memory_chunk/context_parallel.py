"""The linear Titans memory with T split over mesh.sequence: a cross-device scan of chunk maps.

A chunk of the memory update maps the state entering it, X = [W; S] ([2 Dk, Dv]), affinely:
every step (gradients at the chunk's starting weights, momentum, forgetting) multiplies W and S
from the left by Dk x Dk matrices and adds terms of v, column by column of Dv. So a device's
chunk of C tokens (kernels/context_parallel.py has the zig-zag layout) is

    X_out = M X_in + F,    M [2 Dk, 2 Dk], F [2 Dk, Dv],

and one call of memory_update gives both: from zero states with 2 Dk more value columns, zero
values, and the identity as those columns' initial W and S (the response of the final W, S to
W_0 = I and to S_0 = I is M; the real columns, from zero, are F). The maps are all-gathered,
every device composes them by an associative scan (context_parallel.carried_states, (2 Dk)^3
per composition), and a second call runs each chunk from its true entering state. Exact, with
segments (a segment starting at a chunk's first token starts it from zero); gradients by
autodiff through memory_update's own VJP, which reaches both initial states.

Costs: the first call carries Dv + 2 Dk value columns (3x the state work at Dk = Dv; the GPU
kernel takes powers of two up to 128, so "auto" runs it on XLA beyond that), the second is
the one-device work; an all-gather of 2 maps and 2 offsets (2 Dk x (2 Dk + Dv) f32 each) per
device, row and head. The chunk of a device must hold whole mini-batches of `chunk_size`
tokens, since every mini-batch's gradients are taken at its starting weights. The deep (MLP)
memory is not affine in its weights: it has no such path.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from effattn.kernels import context_parallel as cp
from effattn.kernels import matmul

# q, k, v, theta, alpha, eta, W0, S0, segment ids -> y, (W, S).
_LAYOUTS = (("BTHD", "BTHD", "BTHD", "BTH", "BTH", "BTH", "BHKV", "BHKV", "BT"),
            ("BTHD", ("BHKV", "BHKV")))


def _matmul(a, b):
  return jnp.matmul(a, b, precision=matmul.f32_precision())


def _chunked(update: Callable, n: int, q, k, v, theta, alpha, eta, w0, s0, segment_ids):
  """On one device: its chunks [B, 2C, ...] -> (y, (W, S) after the whole sequence)."""
  b, _, h, dk = q.shape
  dv = v.shape[-1]
  rows = [cp.split_chunks(x) for x in (q, k, v, theta, alpha, eta)]
  seg2 = None if segment_ids is None else cp.split_chunks(segment_ids)
  q2, k2, v2 = rows[:3]
  # The chunks' maps: 2 Dk extra value columns (zero values) start from W = [I 0], S = [0 I].
  eye, zero = jnp.eye(dk, dtype=jnp.float32), jnp.zeros((dk, dk), jnp.float32)
  blank = jnp.zeros((dk, dv), jnp.float32)
  start = lambda *blocks: jnp.broadcast_to(  # noqa: E731
      jnp.concatenate(blocks, -1), (2 * b, h, dk, dv + 2 * dk))
  wide = jnp.concatenate([v2, jnp.zeros(v2.shape[:3] + (2 * dk,), v2.dtype)], -1)
  _, (w_end, s_end) = update(q2, k2, wide, *rows[3:], start(blank, eye, zero),
                             start(blank, zero, eye), seg2)
  maps = jnp.concatenate([w_end[..., dv:], s_end[..., dv:]], axis=-2)  # [2B, H, 2Dk, 2Dk]
  offsets = jnp.concatenate([w_end[..., :dv], s_end[..., :dv]], axis=-2)  # [2B, H, 2Dk, Dv]
  entry = jnp.ones((2 * n, b), bool) if seg2 is None else cp.chunk_entries(seg2, n)
  zeros = jnp.zeros((b, h, dk, dv), jnp.float32)
  initial = jnp.concatenate([zeros if w0 is None else w0.astype(jnp.float32),
                             zeros if s0 is None else s0.astype(jnp.float32)], axis=-2)
  states, last = cp.carried_states(
      cp.gather_chunks(maps.reshape(2, b, h, 2 * dk, 2 * dk), n),
      cp.gather_chunks(offsets.reshape(2, b, h, 2 * dk, dv), n), entry, initial,
      apply=_matmul, compose=_matmul)
  carried = states[cp.own_chunks(n)].reshape(2 * b, h, 2 * dk, dv)
  y, _ = update(*rows, carried[..., :dk, :], carried[..., dk:, :], seg2)
  return cp.join_chunks(y), (last[..., :dk, :], last[..., dk:, :])


def memory_update(update: Callable, q, k, v, theta, alpha, eta, *, initial_memory,
                  initial_momentum, segment_ids, chunk_size: int, out_dtype):
  """api.memory_update's context-parallel path: arguments checked, global and in the zig-zag
  layout; update(q, k, v, theta, alpha, eta, w0, s0, segment_ids) -> (y, (W, S)) is the op
  with every static argument bound, run per device."""
  n = cp.sequence_size()
  b, t, h, dk = q.shape
  c = cp.check_length("memory_update", t, n)
  if c % chunk_size:
    raise ValueError(f"memory_update context-parallel: the {c} tokens of a chunk (T / 2 x "
                     f"mesh.sequence={n}) must be a multiple of {chunk_size=}, whose "
                     "mini-batches may not straddle devices")
  state = jax.ShapeDtypeStruct((b, h, dk, v.shape[-1]), jnp.float32)
  shapes = (jax.ShapeDtypeStruct(q.shape[:3] + v.shape[3:], out_dtype), (state, state))
  body = functools.partial(_chunked, update, n)
  return cp.shard("memory_update", body, *_LAYOUTS, shapes)(
      q, k, v, theta, alpha, eta, initial_memory, initial_momentum, segment_ids)
