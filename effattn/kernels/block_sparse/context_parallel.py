"""Ring attention: softmax and block-sparse attention with T split over mesh.sequence.

Under a mesh with sequence = n > 1 (kernels/context_parallel.py has the zig-zag layout), each
device holds the queries and keys of its two chunks. The keys and values (with their positions,
segment ids and bias) go around the ring: at step s device i attends with the K/V of device
i - s, through the block-sparse op itself (api.block_sparse_attention on the device's arrays,
so its kernels, Pallas or XLA, run per step), and merges the partial (o, lse) by log-sum-exp.
Causality and segments are element conditions on the true token index and the segment ids, so
the merged result is exactly the one-device attention.

Tiles a step cannot use are not visited: for softmax (`lists=None`) the step's block lists keep
a key block when its first token precedes the query block's last (causal) or always; with the
zig-zag layout every step after the first then visits half of the tiles, on every device. A
block-sparse caller's lists stay in natural token order (block i = tokens [i b, (i+1) b) of the
unpermuted sequence) and are filtered each step to the key blocks the visiting chunks hold.

Gradients: a custom VJP whose backward runs the ring again, passing K/V and their gradient
accumulators: per step it recomputes the step's (o_s, lse_s) and applies the step's VJP with the
cotangents of the log-sum-exp merge, do_s = w do and dlse_s = w (do . (o_s - o) + dlse) with
w = exp(lse_s - lse). Memory stays one chunk pair of K/V per device (autodiff of the forward
loop would keep every step's); the price is one more forward pass per step. Per step and
direction each device sends one chunk pair of K/V (and, backward, its gradients).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from effattn.kernels import context_parallel as cp
from effattn.kernels.block_sparse.common import Aux, block_size_for, lists_from_block_mask

_INT_MIN, _INT_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static settings of one ring (hashable: the custom VJP's nondiff argument)."""

  attend: Callable  # the block-sparse op, called per step on the device's arrays
  n: int  # devices on the sequence axis
  chunk: int  # tokens per chunk C
  causal: bool
  scale: float
  block_q: int
  block_k: int
  impl: str
  interpret: bool
  given_lists: bool  # natural-order lists from the caller (else derived per step)


# -- the block lists of one step ------------------------------------------------------------


def _block_extremes(x, block: int, fill: int, reduce):
  """[B', Hx, N] per-token vector -> [B', 1, ceil(N / block)] its reduce over each block."""
  pad = -x.shape[-1] % block
  x = jnp.pad(x, ((0, 0), (0, 0), (0, pad)), constant_values=fill)
  return reduce(reduce(x.reshape(*x.shape[:2], -1, block), axis=-1), axis=1, keepdims=True)


def _derived_lists(ring: _Ring, q_pos, kv_pos):
  """Every key block that may hold a key of a query block (causal: one at or before the query
  block's last position), from the positions of this step's queries and keys."""
  q_last = _block_extremes(q_pos, ring.block_q, _INT_MIN, jnp.max)
  kv_first = _block_extremes(kv_pos, ring.block_k, _INT_MAX, jnp.min)
  mask = kv_first[..., None, :] <= q_last[..., :, None]  # [B', 1, nQ, nK]
  return lists_from_block_mask(mask if ring.causal else jnp.ones_like(mask))


def _visiting_lists(ring: _Ring, lists, source):
  """The caller's natural-order lists of this device's query blocks, kept to the key blocks of
  the chunks of device `source` and renumbered as they lie in the visiting arrays."""
  indices, counts = lists
  per_chunk = ring.chunk // ring.block_k
  chunk = indices // per_chunk
  first, second = source, 2 * ring.n - 1 - source
  local = jnp.where(chunk == first, indices - first * per_chunk,
                    indices - second * per_chunk + per_chunk)
  keep = (jnp.arange(indices.shape[-1]) < counts[..., None]) & (
      (chunk == first) | (chunk == second))
  # Stable compaction keeps the ascending order: the first chunk's blocks precede the second's.
  order = jnp.argsort(~keep, axis=-1, stable=True)
  local = jnp.take_along_axis(local, order, axis=-1)
  kept = jnp.sum(keep, axis=-1, dtype=jnp.int32)
  last = jnp.take_along_axis(local, jnp.maximum(kept - 1, 0)[..., None], axis=-1)
  slot = jnp.arange(indices.shape[-1])
  local = jnp.where(slot < kept[..., None], local, jnp.where(kept[..., None] > 0, last, 0))
  return local.astype(jnp.int32), kept


def _step(ring: _Ring, q, q_aux: Aux, lists, source, k, v, kv_aux: Aux):
  """Attention of this device's queries to the K/V chunks of device `source`: (o_s, lse_s)."""
  if ring.given_lists:
    indices, counts = _visiting_lists(ring, lists, source)
  else:
    indices, counts = _derived_lists(ring, q_aux.q_pos, kv_aux.kv_pos)
  return ring.attend(
      q, k, v, indices, counts, block_q=ring.block_q, block_k=ring.block_k, causal=ring.causal,
      q_positions=q_aux.q_pos, kv_positions=kv_aux.kv_pos, q_segment_ids=q_aux.q_seg,
      kv_segment_ids=kv_aux.kv_seg, kv_bias=kv_aux.kv_bias, q_threshold=q_aux.q_thr,
      q_threshold_pos=q_aux.q_thr_pos, scale=ring.scale, impl=ring.impl,
      interpret=ring.interpret)


# -- the ring ---------------------------------------------------------------------------------


def merge(o, lse, o_s, lse_s):
  """Two partial attentions over disjoint keys -> their union (f32 o, lse; -inf: no key)."""
  top = jnp.maximum(lse, lse_s)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w, w_s = jnp.exp(lse - top), jnp.exp(lse_s - top)  # exp(-inf) = 0: an empty side weighs 0
  total = w + w_s
  seen = total > 0
  new_lse = jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
  rows = lambda x: jnp.swapaxes(x, 1, 2)[..., None]  # noqa: E731  [B, H, T] -> [B, T, H, 1]
  o = (rows(w) * o + rows(w_s) * o_s.astype(jnp.float32)) / rows(jnp.where(seen, total, 1.0))
  return o, new_lse


def _source(ring: _Ring, step):
  """The device whose K/V this one holds at ring step `step`."""
  return (jax.lax.axis_index(cp.SEQUENCE_AXIS) - step) % ring.n


def _forward(ring: _Ring, q, k, v, q_aux, kv_aux, lists):
  b, t, h, d = q.shape
  o = jnp.zeros((b, t, h, v.shape[-1]), jnp.float32)
  lse = jnp.full((b, h, t), -jnp.inf, jnp.float32)

  def one(step, kv, o, lse):
    o_s, lse_s = _step(ring, q, q_aux, lists, _source(ring, step), *kv)
    return merge(o, lse, o_s, lse_s)

  def body(carry, step):
    kv, o, lse = carry
    visiting = cp.pass_on(kv, ring.n)  # sent while this step computes
    return (visiting, *one(step, kv, o, lse)), None

  (kv, o, lse), _ = jax.lax.scan(body, ((k, v, kv_aux), o, lse), jnp.arange(ring.n - 1))
  o, lse = one(ring.n - 1, kv, o, lse)
  return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(ring: _Ring, q, k, v, q_aux, kv_aux, kv_indices, kv_counts):
  return _forward(ring, q, k, v, q_aux, kv_aux, (kv_indices, kv_counts))


def _ring_fwd(ring, q, k, v, q_aux, kv_aux, kv_indices, kv_counts):
  lists = (kv_indices, kv_counts)
  o, lse = _forward(ring, q, k, v, q_aux, kv_aux, lists)
  return (o, lse), (q, k, v, q_aux, kv_aux, lists, o, lse)


def _ring_bwd(ring, residuals, cotangents):
  q, k, v, q_aux, kv_aux, lists, o, lse = residuals
  do, dlse = (c.astype(jnp.float32) for c in cotangents)
  o = o.astype(jnp.float32)
  rows = lambda x: jnp.swapaxes(x, 1, 2)[..., None]  # noqa: E731  [B, H, T] -> [B, T, H, 1]

  def grads(step, kv):
    k_s, v_s, aux_s = kv

    def attend(q, k_s, v_s, bias):
      return _step(ring, q, q_aux, lists, _source(ring, step), k_s, v_s,
                   aux_s._replace(kv_bias=bias))

    (o_s, lse_s), vjp = jax.vjp(attend, q, k_s, v_s, aux_s.kv_bias)
    w = jnp.where(jnp.isfinite(lse) & jnp.isfinite(lse_s), jnp.exp(lse_s - lse), 0.0)
    d_lse_s = w * (jnp.einsum("bthd,bthd->bht", do, o_s.astype(jnp.float32) - o) + dlse)
    return vjp(((rows(w) * do).astype(o_s.dtype), d_lse_s))

  def accumulate(acc, new):
    return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, new)

  f32 = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)  # noqa: E731
  owed = (f32(k), f32(v), f32(kv_aux.kv_bias))  # gradients of the K/V travelling with them

  def body(carry, step):
    kv, owed, dq = carry
    visiting = cp.pass_on(kv, ring.n)
    dq_s, *d_kv = grads(step, kv)
    return (visiting, cp.pass_on(accumulate(owed, tuple(d_kv)), ring.n), dq + dq_s), None

  dq = jnp.zeros(q.shape, jnp.float32)
  (kv, owed, dq), _ = jax.lax.scan(body, ((k, v, kv_aux), owed, dq), jnp.arange(ring.n - 1))
  dq_s, *d_kv = grads(ring.n - 1, kv)
  # One more pass brings every accumulator home to the device that owns its K/V.
  dk, dv, dbias = cp.pass_on(accumulate(owed, tuple(d_kv)), ring.n)
  none = Aux(*(None for _ in Aux._fields))
  return ((dq + dq_s).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), none,
          none._replace(kv_bias=dbias), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)

# -- entry points (global arrays in the zig-zag layout) -----------------------------------------

# q, k, v, the per-query and per-key vectors, the lists' rows (or None) -> o, lse.
_LAYOUTS = (("BTHD", "BTHD", "BTHD", "BHT", "BHT", "BHTK", "BHT"), ("BTHD", "BHT"))


def ring_attention(attend: Callable, q, k, v, aux: Aux, lists=None, *, causal: bool,
                   scale: float, block_q: int, block_k: int, impl: str, interpret: bool = False,
                   op: str = "block_sparse"):
  """Attention over the whole sequence with q, k, v [B, T, H(_kv), D] in the zig-zag layout.

  attend: the block-sparse op (api.block_sparse_attention), called per device and step.
  aux: the per-query and per-key vectors as the block-sparse api holds them ([B', Hx, T]);
    positions default to the true token index.
  lists: the caller's (kv_indices, kv_counts) in natural token order ([B', H', T / block_q,
    K]), or None for every block the element mask may keep (softmax).

  Returns:
    (o [B, T, H, D] in q's dtype, lse [B, H, T] float32), in the zig-zag layout.
  """
  n = cp.sequence_size()
  b, t = q.shape[:2]
  if k.shape[1] != t:
    raise ValueError(f"{op} context-parallel: keys {k.shape[:2]} must be the queries' sequence "
                     f"{q.shape[:2]} (self-attention)")
  chunk = cp.check_length(op, t, n)
  true_index = jnp.asarray(cp.zigzag_order(t, n))[None, None]
  aux = aux._replace(q_pos=true_index if aux.q_pos is None else aux.q_pos,
                     kv_pos=true_index if aux.kv_pos is None else aux.kv_pos)
  if lists is None:
    block_q = block_k = block_size_for(2 * chunk, max(block_q, block_k))
    rows = (None, None)
  else:
    if chunk % block_q or chunk % block_k:
      raise ValueError(f"{op} context-parallel: the {chunk} tokens of a chunk (T / 2 x "
                       f"mesh.sequence) must be a multiple of {block_q=} and {block_k=}")
    # Each device's query blocks are its chunks' rows: reorder the lists' rows like the tokens.
    rows = tuple(cp.to_zigzag(x, n, axis=2) for x in lists)
  ring = _Ring(attend, n, chunk, causal, float(scale), block_q, block_k, impl, interpret,
               given_lists=lists is not None)
  q_aux = Aux(q_pos=aux.q_pos, q_seg=aux.q_seg, q_thr=aux.q_thr, q_thr_pos=aux.q_thr_pos)
  kv_aux = Aux(kv_pos=aux.kv_pos, kv_seg=aux.kv_seg, kv_bias=aux.kv_bias)
  shapes = (jax.ShapeDtypeStruct(q.shape[:3] + v.shape[3:], q.dtype),
            jax.ShapeDtypeStruct((b, q.shape[2], t), jnp.float32))
  return cp.shard(op, functools.partial(_ring, ring), *_LAYOUTS, shapes)(
      q, k, v, q_aux, kv_aux, *rows)


def softmax_ring(attend: Callable, q, k, v, segment_ids=None, *, causal: bool,
                 scale: float | None, impl: str, return_lse: bool = False):
  """softmax_attention's context-parallel path (segments by id, causal by true index): o, or
  (o, lse [B, H, T]) with return_lse (to merge with attention over other keys by `merge`)."""
  ids = None if segment_ids is None else segment_ids.astype(jnp.int32)[:, None]
  aux = Aux(q_seg=ids, kv_seg=ids)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  o, lse = ring_attention(attend, q, k, v, aux, causal=causal, scale=scale, block_q=64,
                          block_k=64, impl=impl, op="softmax")
  return (o, lse) if return_lse else o
