"""The deep (MLP) Titans memory: token recurrence and chunk-parallel form in jnp.

The memory is an MLP M(x) = silu(... silu(x W_1) ...) W_L with weights P = (W_1, ..., W_L) and
momentum of the same structure. The update is the linear memory's (reference.py), applied to
every weight: grad_t = d/dP ||M(k_t) - v_t||^2 at P_ref, S_t = eta_t S_{t-1} - theta_t grad_t,
P_t = (1 - alpha_t) P_{t-1} + S_t, y_t = M_{P_t}(q_t). The chunk form takes the gradients of a
chunk at its starting weights (jax.grad vmapped over the chunk's tokens) and unrolls the gated
recurrences with the same coefficients as the linear kernel (xla.chunk_coefficients):
P_t = wq_t P + a_t S - sum_i A[t, i] grad_i. With one layer this is xla.chunk_forward exactly
(tested); the Pallas kernel covers that case, deeper memories run here.

A new segment (packed sequences) restarts from `reset_to` (the learned initial weights; an MLP
at zero weights could never learn) with zero momentum; the linear kernel restarts at zero.

Shapes: q, k [B, T, H, D]; v [B, T, H, Dv]; gates [B, T, H]; each state leaf [B, H, ...].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effattn.kernels import matmul
from effattn.kernels.memory_chunk import common, xla


def mlp(params, x):
  """M(x): x [..., D] through the layers of `params` (tuple of [d_in, d_out]), SiLU between."""
  for i, w in enumerate(params):
    x = jnp.dot(x, w, precision=matmul.f32_precision())
    if i < len(params) - 1:
      x = jax.nn.silu(x)
  return x


def _grad(params, k, v):
  return jax.grad(lambda p: jnp.sum((mlp(p, k) - v) ** 2))(params)


def _scale(tree, x):
  return jax.tree.map(lambda leaf: x * leaf, tree)


def _fresh(segment_ids, b, t):
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
  return jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], 1), seg


def recurrent(params0, mom0, q, k, v, theta, alpha, eta, segment_ids=None, reset_to=None):
  """Token-by-token recurrence. reset_to: weights a new segment starts from, each leaf
  [B, H, ...] (default params0). Returns (y [B, T, H, Dv] f32, (P_T, S_T))."""
  b, t = q.shape[:2]
  fresh, _ = _fresh(segment_ids, b, t)
  reset_to = params0 if reset_to is None else reset_to

  def token(p, s, p_reset, q_t, k_t, v_t, th, al, et, fr):  # one (row, head)
    p = jax.tree.map(lambda a, r: (1.0 - fr) * a + fr * r, p, p_reset)
    s = _scale(s, 1.0 - fr)
    g = _grad(p, k_t, v_t)
    s = jax.tree.map(lambda s_, g_: et * s_ - th * g_, s, g)
    p = jax.tree.map(lambda p_, s_: (1.0 - al) * p_ + s_, p, s)
    return p, s, mlp(p, q_t)

  heads = jax.vmap(token, in_axes=(0,) * 9 + (None,))
  rows = jax.vmap(heads)

  def step(state, xs):
    p, s, y = rows(*state, reset_to, *xs)
    return (p, s), y

  xs = [jnp.moveaxis(x.astype(jnp.float32), 1, 0)
        for x in (q, k, v, theta, alpha, eta, fresh)]
  (p, s), y = jax.lax.scan(step, (params0, mom0), xs)
  return jnp.moveaxis(y, 0, 1), (p, s)


def chunk_forward(p, s, p_reset, q, k, v, theta, lb, le, seg, carry, end):
  """One (row, head, chunk): q, k [C, D], v [C, Dv], gates/masks [C] (lb, le chunk-local
  cumulative) -> (y [C, Dv], P', S'). Tokens of a segment begun inside the chunk start from
  p_reset: their gradients are taken there, and W_t holds it with weight f_t (its decay since
  the segment's first token r: exp(Lb_t - Lb_{r-1}))."""
  co = xla.chunk_coefficients(theta, lb, le, seg, carry, end)
  step_lb = lb - jnp.concatenate([jnp.zeros((1,)), lb[:-1]])
  first = jnp.concatenate([jnp.ones((1,), bool), seg[1:] != seg[:-1]])
  f = jnp.sum(co["d_b"] * ((1.0 - carry) * first * jnp.exp(step_lb))[None, :], axis=1)
  f_end = jnp.sum(end * f)
  ref = jax.vmap(lambda c: jax.tree.map(lambda a, r: c * a + (1.0 - c) * r, p, p_reset))(carry)
  grads = jax.vmap(_grad)(ref, k, v)  # [C, ...]
  mix = lambda m, g: jnp.einsum("ti,i...->t...", m, g, precision=matmul.f32_precision())
  col = lambda x, leaf: x[(...,) + (None,) * leaf.ndim]
  per_token = jax.tree.map(
      lambda p_, r_, s_, g_: (col(co["wq"], p_) * p_ + col(f, r_) * r_ + col(co["a"], s_) * s_
                              - mix(co["A"], g_)),
      p, p_reset, s, grads)
  y = jax.vmap(mlp)(per_token, q)
  p_new = jax.tree.map(lambda p_, r_, s_, g_: co["wq_end"] * p_ + f_end * r_ + co["a_end"] * s_
                       - mix(co["A_end"][None], g_)[0], p, p_reset, s, grads)
  s_new = jax.tree.map(lambda s_, g_: co["ec_end"] * s_ - mix(co["m"][None], g_)[0], s, grads)
  return y, p_new, s_new


def chunked(params0, mom0, q, k, v, theta, alpha, eta, segment_ids=None, reset_to=None, *,
            chunk_size: int):
  """Chunk-parallel form (autodiff; each chunk rematerialized in the backward). reset_to as in
  `recurrent`. Returns (y [B, T, H, Dv] f32, (P_T, S_T))."""
  reset_to = params0 if reset_to is None else reset_to
  b, t, h, _ = q.shape
  c = chunk_size
  lb, le = common.log_gates(alpha, eta)
  theta, lb, le = (common.pad_time(x.astype(jnp.float32), c) for x in (theta, lb, le))
  n = lb.shape[1] // c
  lb, le = (jnp.cumsum(x.reshape(b, n, c, h), axis=2) for x in (lb, le))
  theta = theta.reshape(b, n, c, h)
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
  seg, carry, end = (x.reshape(b, n, c) for x in common.chunk_masks(seg, t, c))
  q, k, v = (common.pad_time(x.astype(jnp.float32), c) for x in (q, k, v))
  q, k, v = (x.reshape(b, n, c, h, x.shape[-1]) for x in (q, k, v))
  heads = jax.vmap(chunk_forward, in_axes=(0,) * 3 + (1,) * 6 + (None,) * 3, out_axes=(1, 0, 0))
  rows = jax.checkpoint(jax.vmap(heads))

  def step(state, xs):
    y, p, s = rows(*state, reset_to, *xs)
    return (p, s), y

  xs = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, theta, lb, le, seg, carry, end)]
  (p, s), y = jax.lax.scan(step, (params0, mom0), xs)
  y = jnp.moveaxis(y, 0, 1).reshape(b, n * c, h, -1)[:, :t]
  return y, (p, s)
