"""The oracle: the linear (depth-1) Titans memory updated token by token or chunk by chunk.

Per token t (Titans eqs. 9-14, memory W [Dk, Dv] read as M(k) = k W):

  grad_t = d/dW ||k_t W - v_t||^2 = 2 k_t^T (k_t W_ref - v_t)
  S_t    = eta_t S_{t-1} - theta_t grad_t               (surprise with momentum)
  W_t    = (1 - alpha_t) W_{t-1} + S_t                  (forgetting)
  y_t    = q_t W_t                                      (retrieval, no update)

`recurrent` takes every gradient at W_ref = W_{t-1} (the paper's recurrence). `chunk_loop` is
the chunk-parallel training form written as its plain definition: inside each chunk of C tokens
every gradient is taken at the chunk's starting weights (mini-batch gradient descent), then the
same S / W recurrence runs token by token. With C = 1 the two coincide.

A change of segment id restarts the memory (W = S = 0 before the token's update).
Shapes: q, k [B, T, H, Dk]; v [B, T, H, Dv]; theta, alpha, eta [B, T, H]; states
[B, H, Dk, Dv]; segment_ids [B, T] or None. Everything is computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effattn.kernels.memory_chunk import common

_HI = jax.lax.Precision.HIGHEST


def _f32(*xs):
  return [x.astype(jnp.float32) for x in xs]


def _token_grad(k, v, w_ref):
  """grad of ||k W - v||^2 at W = w_ref: k [B, H, Dk], v [B, H, Dv] -> [B, H, Dk, Dv]."""
  err = 2.0 * (jnp.einsum("bhk,bhkv->bhv", k, w_ref, precision=_HI) - v)
  return k[..., :, None] * err[..., None, :]


def _token_update(w, s, grad, theta, alpha, eta, fresh):
  """One step of the recurrence; `fresh` [B] restarts the memory first (new segment)."""
  keep = (1.0 - fresh)[:, None, None, None]
  w, s = w * keep, s * keep
  s = eta[..., None, None] * s - theta[..., None, None] * grad
  w = (1.0 - alpha)[..., None, None] * w + s
  return w, s


def _prepare(q, k, v, theta, alpha, eta, w0, s0, segment_ids):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  zeros = jnp.zeros((b, h, dk, dv), jnp.float32)
  w0 = zeros if w0 is None else w0.astype(jnp.float32)
  s0 = zeros if s0 is None else s0.astype(jnp.float32)
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  fresh = jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
  return _f32(q, k, v, theta, alpha, eta), w0, s0, seg, fresh.astype(jnp.float32)


def recurrent(q, k, v, theta, alpha, eta, w0=None, s0=None, segment_ids=None):
  """Token-by-token recurrence. Returns (y [B, T, H, Dv] f32, (W_T, S_T) [B, H, Dk, Dv] f32)."""
  (q, k, v, theta, alpha, eta), w0, s0, _, fresh = _prepare(q, k, v, theta, alpha, eta, w0, s0,
                                                            segment_ids)

  def step(state, xs):
    w, s = state
    q_t, k_t, v_t, th, al, et, fr = xs
    w_ref = w * (1.0 - fr)[:, None, None, None]
    w, s = _token_update(w, s, _token_grad(k_t, v_t, w_ref), th, al, et, fr)
    return (w, s), jnp.einsum("bhk,bhkv->bhv", q_t, w, precision=_HI)

  xs = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, theta, alpha, eta, fresh)]
  (w, s), y = jax.lax.scan(step, (w0, s0), xs)
  return jnp.moveaxis(y, 0, 1), (w, s)


def chunk_loop(q, k, v, theta, alpha, eta, w0=None, s0=None, segment_ids=None, *,
               chunk_size: int):
  """Mini-batch gradient descent per chunk, then the token recurrence (the parallel form's
  definition). Same returns as `recurrent`."""
  (q, k, v, theta, alpha, eta), w0, s0, seg, fresh = _prepare(q, k, v, theta, alpha, eta, w0, s0,
                                                              segment_ids)
  b, t, h, _ = q.shape
  c = chunk_size
  _, carry, _ = common.chunk_masks(seg, t, c)
  valid = common.pad_time(jnp.ones((b, t), jnp.float32), c)
  xs = [common.pad_time(x, c) for x in (q, k, v, theta, alpha, eta, fresh)] + [carry, valid]
  n = xs[0].shape[1] // c
  # [N, C, B, ...]: chunks outside, tokens of a chunk inside.
  xs = [jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), (1, 2), (0, 1)) for x in xs]

  def chunk_step(state, chunk):
    w_start, _ = state
    q_c, k_c, v_c, th_c, al_c, et_c, fr_c, ca_c, va_c = chunk
    # Every gradient of the chunk at its starting weights (zero for a segment begun inside it).
    w_ref = ca_c[..., None, None, None] * w_start
    grads = 2.0 * k_c[..., :, None] * (
        jnp.einsum("cbhk,cbhkv->cbhv", k_c, jnp.broadcast_to(w_ref, (c,) + w_ref.shape[1:]),
                   precision=_HI) - v_c)[..., None, :]

    def token_step(state, xs):
      w, s = state
      q_t, g_t, th, al, et, fr, va = xs
      w_new, s_new = _token_update(w, s, g_t, th, al, et, fr)
      keep = va[:, None, None, None]  # padded tokens leave the state alone
      w, s = keep * w_new + (1 - keep) * w, keep * s_new + (1 - keep) * s
      return (w, s), jnp.einsum("bhk,bhkv->bhv", q_t, w, precision=_HI)

    return jax.lax.scan(token_step, state, (q_c, grads, th_c, al_c, et_c, fr_c, va_c))

  (w, s), y = jax.lax.scan(chunk_step, (w0, s0), xs)
  y = jnp.moveaxis(y.reshape(n * c, b, h, -1), 0, 1)[:, :t]
  return y, (w, s)
