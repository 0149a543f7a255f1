"""The linear scan with T split over mesh.sequence: a cross-device scan of chunk states.

    o, final_state = linear_scan(q, k, v, log_decay, ...)   # api.linear_scan's contract

Per chunk of C tokens (kernels/context_parallel.py has the zig-zag layout; c in natural
order, t the token's index inside its chunk), the causal scan splits into the chunk's own scan
from a zero state and the term of the state S_c carried in:

    o_t   = own_t + scale exp(g (t + 1)) q_t S_c          (tokens of the chunk's first run)
    S_c+1 = [chunk c+1 continues c's segment] (exp(g C) [chunk c is one run] S_c + F_c)

with F_c the chunk's own final state. Each device runs api.linear_scan once on its two chunks
(as rows, from zero: its kernels are reused as they are), the F_c and the segment ids at the
chunk ends are all-gathered, every device combines these affine maps with an associative scan
(context_parallel.carried_states) and adds the carried-in term to its own tokens. Exact, with
segments and decays; gradients by autodiff through linear_scan's own VJP (the all-gather
transposes to a reduce-scatter). Communication: an all-gather of 2 states [H, Dk, Dv] f32 per
device and row forward, a reduce-scatter of their cotangents backward.

log_decay's gradient is linear_scan's (its VJP decides whether the decay learns); the
cross-device terms differentiate it like any jnp expression. The bidirectional form has no
cross-device path. mechanisms import linear_scan and linear_scan_normalizer from the package,
which are these: on one device, or without a sequence axis, they are api's functions unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from effattn.kernels import context_parallel as cp
from effattn.kernels.linear_scan import api
from effattn.kernels.linear_scan.reference import segment_runs

# q, k, v, log-decay, initial state, segment ids -> o, final state.
_LAYOUTS = (("BTHD", "BTHD", "BTHD", "H", "BHKV", "BT"), ("BTHD", "BHKV"))


def _chunked(local_scan, n: int, scale: float, q, k, v, log_decay, initial_state, segment_ids):
  """On one device: its chunks q, k [B, 2C, H, Dk], v [B, 2C, H, Dv] -> (o f32, final)."""
  b, t, h, dk = q.shape
  c, dv = t // 2, v.shape[-1]
  g = jnp.zeros((h,), jnp.float32) if log_decay is None else log_decay.astype(jnp.float32)
  q2, k2, v2 = (cp.split_chunks(x) for x in (q, k, v))
  seg2 = None if segment_ids is None else cp.split_chunks(segment_ids)
  own, final = local_scan(q2, k2, v2, log_decay, seg2)  # [2B, C, H, Dv] f32, [2B, H, Dk, Dv]
  runs = jnp.zeros((2 * b, c), jnp.int32) if seg2 is None else segment_runs(seg2)
  one_run = (runs[:, -1] == 0)[:, None]
  maps = jnp.where(one_run, jnp.exp(g * c)[None], 0.0)  # the carried state crosses the chunk
  entry = (jnp.ones((2 * n, b), bool) if seg2 is None else cp.chunk_entries(seg2, n))
  initial = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
  states, last = cp.carried_states(
      cp.gather_chunks(maps.reshape(2, b, h), n),
      cp.gather_chunks(final.reshape(2, b, h, dk, dv), n), entry, initial,
      apply=lambda a, s: a[..., None, None] * s, compose=lambda later, earlier: later * earlier)
  carried = states[cp.own_chunks(n)].reshape(2 * b, h, dk, dv)
  # It reaches the tokens of the chunk's first run, decayed once per token since the chunk start.
  reach = jnp.exp(g[None, :] * (jnp.arange(c) + 1)[:, None])[None] * (runs == 0)[..., None]
  o = own + scale * jnp.einsum("bthd,bhde->bthe", q2.astype(jnp.float32) * reach[..., None],
                               carried)
  return cp.join_chunks(o), last


def _check(n: int, causal: bool, t: int) -> None:
  if not causal:
    raise ValueError(f"linear_scan context-parallel (mesh.sequence={n}): causal=False has no "
                     "cross-device path; set mesh.sequence=1 or model.causal=True")
  cp.check_length("linear_scan", t, n)


def linear_scan(q, k, v, log_decay=None, *, causal: bool = True, initial_state=None,
                segment_ids=None, scale: float = 1.0, impl: str = "auto",
                chunk_size: int | None = None, block_sizes=None, out_dtype=None,
                interpret: bool = False):
  """api.linear_scan (same arguments and returns), context-parallel under mesh.sequence > 1:
  then q, k, v and segment_ids are in the zig-zag layout, and o is."""
  kw = dict(scale=scale, impl=impl, chunk_size=chunk_size, interpret=interpret)
  n = cp.sequence_size()
  if n == 1:
    return api.linear_scan(q, k, v, log_decay, causal=causal, initial_state=initial_state,
                           segment_ids=segment_ids, block_sizes=block_sizes,
                           out_dtype=out_dtype, **kw)
  _check(n, causal, q.shape[1])
  # The one-device op on the global shapes: its argument checks, and the outputs' shapes.
  shapes = jax.eval_shape(functools.partial(
      api.linear_scan, initial_state=initial_state, segment_ids=segment_ids,
      block_sizes=block_sizes, out_dtype=out_dtype, **kw), q, k, v, log_decay)

  def local_scan(q, k, v, g, seg):
    return api.linear_scan(q, k, v, g, segment_ids=seg, block_sizes=block_sizes,
                           out_dtype=jnp.float32, **kw)

  def body(q, k, v, g, s0, seg):
    o, last = _chunked(local_scan, n, scale, q, k, v, g, s0, seg)
    return o.astype(shapes[0].dtype), last

  return cp.shard("linear_scan", body, *_LAYOUTS, shapes)(q, k, v, log_decay, initial_state,
                                                           segment_ids)


def linear_scan_normalizer(q, k, log_decay=None, *, causal: bool = True, initial_state=None,
                           segment_ids=None, scale: float = 1.0, impl: str = "auto",
                           chunk_size: int | None = None, interpret: bool = False):
  """api.linear_scan_normalizer (same arguments and returns), context-parallel under
  mesh.sequence > 1 like linear_scan: its state is the decayed key sum [B, H, Dk]."""
  kw = dict(scale=scale, impl=impl, chunk_size=chunk_size, interpret=interpret)
  n = cp.sequence_size()
  if n == 1:
    return api.linear_scan_normalizer(q, k, log_decay, causal=causal,
                                      initial_state=initial_state, segment_ids=segment_ids, **kw)
  _check(n, causal, q.shape[1])
  shapes = jax.eval_shape(functools.partial(
      api.linear_scan_normalizer, initial_state=initial_state, segment_ids=segment_ids, **kw),
      q, k, log_decay)

  def local_scan(q, k, ones, g, seg):
    del ones
    den, key_sum = api.linear_scan_normalizer(q, k, g, segment_ids=seg, **kw)
    return den[..., None], key_sum[..., None]

  def body(q, k, g, s0, seg):
    ones = jnp.ones(q.shape[:3] + (1,), np.float32)  # the normalizer's value column
    den, last = _chunked(local_scan, n, scale, q, k, ones, g,
                         None if s0 is None else s0[..., None], seg)
    return den[..., 0], last[..., 0]

  layouts = (("BTHD", "BTHD", "H", "BHK", "BT"), ("BTH", "BHK"))
  return cp.shard("linear_scan", body, *layouts, shapes)(q, k, log_decay, initial_state,
                                                         segment_ids)
