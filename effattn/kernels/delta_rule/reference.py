"""Plain-jnp oracles of the gated delta rule: the token recurrence and the closed (quadratic) form.

The op, per batch row and head, with the state S [Dk, Dv] (the transpose of the paper's
S in R^{Dv x Dk}; rows are key coordinates, as in linear_scan and fla), per-token log gate
g_t <= 0 (a_t = exp(g_t)) and write strength b_t in (0, 1):

  S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,     S_{-1} = S0
  o_t = scale * q_t S_t                                        (q_t a row vector)

Equivalently S_t = a_t S_{t-1} + k_t d_t^T with the delta d_t = b_t (v_t - (a_t S_{t-1})^T k_t):
the state's prediction for k_t, decayed first, is corrected toward v_t.

Packed sequences: a new run of equal segment ids restarts the state at zero (segment id 0, the
trainer's padding, is a run like any other); the initial state belongs to the first run and the
final state is the last run's, as in linear_scan.

`recurrent` is the definition, token by token. `quadratic` solves the whole sequence at once:
with cumulative log gates G_t = sum_{s<=t} g_s, D_ts = exp(G_t - G_s) for s <= t in the same run,
the deltas satisfy the unit lower-triangular system

  (I + tril(diag(b) (K K^T * D), -1)) Delta = diag(b) (V - diag(e^G carry) K S0)

and O = scale ((e^G carry) Q S0 + (Q K^T * D) Delta); the final state is
e^{G_T} S0 (if one run) + K^T diag(e^{G_T - G} tail) Delta. It is O(T^2) and its cumulative
logs lose precision for long, strongly gated sequences: a cross-check at test sizes only.

Shapes: q, k [B, T, H, Dk]; v [B, T, H, Dv]; log_gate, beta [B, T, H]; state [B, H, Dk, Dv];
segment_ids [B, T]. Everything is computed in float32; o comes back float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effattn.kernels.linear_scan.reference import segment_runs

_HI = jax.lax.Precision.HIGHEST


def _f32(*xs):
  return [x.astype(jnp.float32) for x in xs]


def _defaults(q, v, initial_state, scale):
  b, _, h, dk = q.shape
  s0 = (jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  return s0, dk ** -0.5 if scale is None else float(scale)


def step(state, q, k, v, log_gate, beta, *, scale: float):
  """One token: state [B, H, Dk, Dv] f32; q, k [B, H, Dk]; v [B, H, Dv]; log_gate, beta [B, H].

  Returns (o [B, H, Dv], new state), all float32 (the O(1)-state decode step).
  """
  q, k, v, log_gate, beta = _f32(q, k, v, log_gate, beta)
  state = jnp.exp(log_gate)[..., None, None] * state
  delta = beta[..., None] * (v - jnp.einsum("bhkv,bhk->bhv", state, k, precision=_HI))
  state = state + k[..., :, None] * delta[..., None, :]
  return scale * jnp.einsum("bhk,bhkv->bhv", q, state, precision=_HI), state


def recurrent(q, k, v, log_gate, beta, *, initial_state=None, segment_ids=None,
              scale: float | None = None):
  """The token-by-token definition. Returns (o [B, T, H, Dv] f32, final state f32)."""
  b, t, _, _ = q.shape
  s0, scale = _defaults(q, v, initial_state, scale)
  runs = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_runs(segment_ids)
  fresh = jnp.concatenate([jnp.zeros((b, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)

  def body(state, xs):
    q_t, k_t, v_t, g_t, b_t, fresh_t = xs
    state = jnp.where(fresh_t[:, None, None, None], 0.0, state)
    o_t, state = step(state, q_t, k_t, v_t, g_t, b_t, scale=scale)
    return state, o_t

  xs = [jnp.moveaxis(x, 1, 0) for x in _f32(q, k, v, log_gate, beta) + [fresh]]
  final, o = jax.lax.scan(body, s0, xs)
  return jnp.moveaxis(o, 0, 1), final


def quadratic(q, k, v, log_gate, beta, *, initial_state=None, segment_ids=None,
              scale: float | None = None):
  """The closed form of the module docstring (one triangular solve over the whole sequence).

  Returns (o [B, T, H, Dv] f32, final state f32).
  """
  b, t, _, _ = q.shape
  s0, scale = _defaults(q, v, initial_state, scale)
  q, k, v, g, beta = (jnp.moveaxis(x, 2, 1) for x in _f32(q, k, v, log_gate, beta))  # [B, H, T]
  runs = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_runs(segment_ids)
  same = (runs[:, :, None] == runs[:, None, :])[:, None]                           # [B, 1, T, T]
  idx = jnp.arange(t)
  causal = idx[:, None] >= idx[None, :]
  big_g = jnp.cumsum(g, axis=-1)
  mask = causal & same
  decay = jnp.where(mask, jnp.exp(jnp.where(mask, big_g[..., :, None] - big_g[..., None, :], 0.)),
                    0.)
  carry = (runs == runs[:, :1])[:, None]                                  # tokens reading S0
  tail = (runs == runs[:, -1:])[:, None]                                  # tokens in the final
  gamma = jnp.exp(big_g) * carry                                          # [B, H, T]
  kk = jnp.einsum("bhtd,bhsd->bhts", k, k, precision=_HI)
  a = jnp.where(idx[:, None] > idx[None, :], beta[..., None] * kk * decay, 0.)
  k_s0 = jnp.einsum("bhtd,bhde->bhte", k, s0, precision=_HI)
  rhs = beta[..., None] * (v - gamma[..., None] * k_s0)
  eye = jnp.eye(t, dtype=jnp.float32)
  delta = jax.scipy.linalg.solve_triangular(eye + a, rhs, lower=True, unit_diagonal=True)
  qk = jnp.einsum("bhtd,bhsd->bhts", q, k, precision=_HI)
  o = (gamma[..., None] * jnp.einsum("bhtd,bhde->bhte", q, s0, precision=_HI)
       + jnp.einsum("bhts,bhse->bhte", qk * decay, delta, precision=_HI))
  w_final = jnp.exp(big_g[..., -1:] - big_g) * tail                       # [B, H, T]
  keep = jnp.exp(big_g[..., -1]) * (runs[:, 0] == runs[:, -1])[:, None]   # [B, H]
  final = keep[..., None, None] * s0 + jnp.einsum("bhtd,bhte->bhde", k * w_final[..., None],
                                                  delta, precision=_HI)
  return jnp.moveaxis(scale * o, 1, 2), final
