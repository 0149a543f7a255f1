"""Plain-jnp oracles of the linear scan: the O(T^2) masked form and the token-by-token recurrence.

The op, per batch row and head h with log-decay g = g_h <= 0 (g = 0: no decay):

  causal        o_t = scale * sum_{s <= t} exp(g (t - s)) (q_t . k_s) v_s
                      + scale * exp(g (t + 1)) q_t S0
                S_t = exp(g) S_{t-1} + k_t^T v_t,  S_{-1} = S0,  final state S_{T-1}
  reverse       o_t = scale * sum_{s >= t} exp(g (s - t)) (q_t . k_s) v_s
                      + scale * exp(g (T - 1 - t)) q_t S0
                final state = exp(g T) S0 + sum_s exp(g (s + 1)) k_s^T v_s
  bidirectional o_t = scale * sum_s exp(g |t - s|) (q_t . k_s) v_s   (no initial state)

`reverse` is the transpose of `causal` (the backward pass of one is the other: see api.py), and
`causal + reverse - diagonal` is the bidirectional form. Packed sequences: tokens interact only
inside their own run of equal segment ids; the initial state belongs to the first run and the
final state is the last run's.

Shapes: q, k [B, T, H, Dk]; v [B, T, H, Dv]; log_decay [H]; state [B, H, Dk, Dv];
segment_ids [B, T]. Computation in float32; outputs in q.dtype, the state in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_runs(segment_ids: jax.Array) -> jax.Array:
  """[B, T] segment ids -> [B, T] int32 run index: +1 wherever the id changes along T.

  Runs (not ids) define who interacts: two separate stretches that reuse an id stay apart.
  The result is non-decreasing, which the chunked paths rely on.
  """
  change = jnp.concatenate(
      [jnp.zeros_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  return jnp.cumsum(change.astype(jnp.int32), axis=1)


def _f32(*xs):
  return tuple(x.astype(jnp.float32) for x in xs)


def scan_quadratic(q, k, v, log_decay=None, *, causal: bool = True, reverse: bool = False,
                   initial_state=None, segment_ids=None, scale: float = 1.0):
  """The O(T^2) form: (Q K^T * decay * mask) V plus the initial-state term.

  Returns (o [B, T, H, Dv] in q.dtype, final_state [B, H, Dk, Dv] float32).
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  q32, k32, v32 = _f32(q, k, v)
  g = jnp.zeros((h,), jnp.float32) if log_decay is None else log_decay.astype(jnp.float32)
  s0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  if not causal and initial_state is not None:
    raise ValueError("initial_state needs causal=True (the bidirectional form carries no state)")
  idx = jnp.arange(t)
  diff = idx[:, None] - idx[None, :]                                    # [Tq, Tk] = t - s
  if not causal:
    dist, allowed = jnp.abs(diff), jnp.ones_like(diff, dtype=bool)
  elif reverse:
    dist, allowed = -diff, diff <= 0
  else:
    dist, allowed = diff, diff >= 0
  # exp of a clamped distance: masked entries must not overflow before they are zeroed.
  decay = jnp.where(allowed, jnp.exp(g[:, None, None] * jnp.maximum(dist, 0)), 0.0)  # [H, T, T]
  runs = None if segment_ids is None else segment_runs(segment_ids)
  mask = jnp.ones((b, 1, t, t), bool) if runs is None else (runs[:, None, :, None]
                                                              == runs[:, None, None, :])
  scores = jnp.einsum("bthd,bshd->bhts", q32, k32) * decay[None] * mask
  o = jnp.einsum("bhts,bshe->bthe", scores, v32)

  if reverse:
    w_state = jnp.exp(g[None, :] * (t - 1 - idx)[:, None])           # [T, H] for S0 -> o_t
    w_kv = jnp.exp(g[None, :] * (idx + 1)[:, None])                  # [T, H] for k_s v_s -> final
    anchor, final_anchor = t - 1, 0                                  # runs owning S0 / final
  else:
    w_state = jnp.exp(g[None, :] * (idx + 1)[:, None])
    w_kv = jnp.exp(g[None, :] * (t - 1 - idx)[:, None])
    anchor, final_anchor = 0, t - 1
  if runs is None:
    in_state = jnp.ones((b, t), bool)
    in_final = jnp.ones((b, t), bool)
    carry_s0 = jnp.ones((b,), bool)
  else:
    in_state = runs == runs[:, anchor:anchor + 1]
    in_final = runs == runs[:, final_anchor:final_anchor + 1]
    carry_s0 = runs[:, 0] == runs[:, -1]
  if causal:
    o = o + jnp.einsum("bthd,bhde->bthe", q32 * (w_state[None] * in_state[..., None])[..., None],
                       s0)
  o = o * scale
  k_weighted = k32 * (w_kv[None] * in_final[..., None])[..., None]
  final = (jnp.exp(g * t)[None, :, None, None] * carry_s0[:, None, None, None] * s0
           + jnp.einsum("bshd,bshe->bhde", k_weighted, v32))
  return o.astype(q.dtype), final


def scan_recurrent(q, k, v, log_decay=None, *, reverse: bool = False, initial_state=None,
                   segment_ids=None, scale: float = 1.0):
  """The token-by-token recurrence S_t = exp(g) S_{t-1} + k_t^T v_t, o_t = q_t S_t (causal).

  `reverse=True` runs from the last token to the first with the initial state entering
  undecayed at T - 1 and one extra decay applied after token 0 (see the module docstring).
  Returns (o [B, T, H, Dv] in q.dtype, final_state [B, H, Dk, Dv] float32).
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  q32, k32, v32 = _f32(q, k, v)
  g = jnp.zeros((h,), jnp.float32) if log_decay is None else log_decay.astype(jnp.float32)
  lam = jnp.exp(g)[None, :, None, None]
  s0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  runs = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_runs(segment_ids)
  # A state is dropped where the run changes between consecutive tokens (in scan order).
  keep = jnp.concatenate([jnp.ones((b, 1), bool), runs[:, 1:] == runs[:, :-1]], axis=1)
  if reverse:
    q32, k32, v32 = q32[:, ::-1], k32[:, ::-1], v32[:, ::-1]
    keep = jnp.concatenate([jnp.ones((b, 1), bool), keep[:, 1:][:, ::-1]], axis=1)

  def step(state, inputs):
    q_t, k_t, v_t, keep_t, first = inputs
    # Forward: S_0 = e^g S0 + k v. Reverse: S0 enters undecayed at the first step taken.
    decay = jnp.where(first & reverse, 1.0, lam)
    state = jnp.where(keep_t[:, None, None, None], decay * state, 0.0)
    state = state + jnp.einsum("bhd,bhe->bhde", k_t, v_t)
    return state, jnp.einsum("bhd,bhde->bhe", q_t, state)

  first = jnp.arange(t) == 0
  xs = (jnp.moveaxis(q32, 1, 0), jnp.moveaxis(k32, 1, 0), jnp.moveaxis(v32, 1, 0),
        jnp.moveaxis(keep, 1, 0), first)
  final, o = jax.lax.scan(step, s0, xs)
  o = jnp.moveaxis(o, 0, 1)
  if reverse:
    o = o[:, ::-1]
    final = lam * final
  return (o * scale).astype(q.dtype), final
