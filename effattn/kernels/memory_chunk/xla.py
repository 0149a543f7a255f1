"""The chunk-parallel memory update in plain jnp: fast path anywhere, and the kernels' blueprint.

Inside a chunk every gradient is taken at the chunk's starting weights W (reference.chunk_loop),
so grad_i = k_i^T e_i with e_i = 2 (carry_i k_i W - v_i), and the two scalar-gated recurrences
S_t = eta_t S_{t-1} - theta_t grad_t,  W_t = keep_t W_{t-1} + S_t  unroll in closed form.
With chunk-local cumulative logs Lb_t = sum_{j<=t} log(1 - alpha_j), Le_t = sum_{j<=t} log eta_j
(the associative scan of the gates) and same-segment, causal masks:

  Db[t, s] = exp(Lb_t - Lb_s)    De[s, i] = exp(Le_s - Le_i)        (s <= t, i <= s)
  A = (Db @ De) * theta[None, :]                     token i's gradient in W_t
  wq_t = carry_t exp(Lb_t)   ec_t = carry_t exp(Le_t)   a = Db @ ec   (W and S in W_t)

  y   = wq * (q W) + a * (q S) - ((q k^T) * A) e                       [C, Dv]
  W'  = wq_end W + a_end S - k^T (A[end, :] * e)
  S'  = ec_end S - k^T (theta * De[end, :] * e)

(`end` is the chunk's last real token.) Everything is matmuls and C x C masks; the chunk loop
carries (W, S) and is the only sequential part. `chunk_forward` / `chunk_backward` act on one
(batch row, head, chunk) and are called verbatim by the Pallas kernels; the backward is the
hand-derived transpose (docs/mechanisms_memory.md), checked against autodiff of reference.py.

The Triton kernel's three loop forms (pallas_gpu.BlockSizes) take their per-chunk math from here:
"fused" runs chunk_forward / chunk_backward in the loop; "split" runs only what the carry needs,
chunk_state_forward (W', S') / chunk_state_backward (the state cotangents), then the rest of
every chunk at once, forward_given_states / backward_given_cotangents; "hoisted" is "split"
whose loop steps (chunk_state_forward_hoisted / chunk_state_backward_hoisted) read the
state-independent terms precomputed for all chunks by hoisted_inputs: the gate algebra
(chunk_state_coefficients) and, backward, e's cotangent through y, P = -((q k^T) * A)^T dy.
Given those, the backward's state cotangents are, with (dW', dS') those of (W', S'):

  de = P - A[end, :] * (k dW') - theta * De[end, :] * (k dS')          [C, Dv]
  dW = q^T (wq * dy) + wq_end dW' + k^T (2 carry * de)
  dS = q^T (a * dy) + a_end dW' + ec_end dS'

Array contract of forward/backward (the api pads and prepares them): q, k [B, Tp, H, Dk];
v [B, Tp, H, Dv]; theta, lb, le [B, Tp, H] float32 (lb, le chunk-local cumulative logs);
seg [B, Tp] int32; carry, end [B, Tp] float32; w0, s0 [B, H, Dk, Dv] float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effattn.kernels import matmul


def dot(a, b, *, trans_a=False, trans_b=False, dtype=jnp.float32):
  """Matmul with f32 accumulation; operands cast to `dtype`, full precision when that is f32."""
  return matmul.dot(a.astype(dtype), b.astype(dtype), trans_a=trans_a, trans_b=trans_b)


def chunk_coefficients(theta, lb, le, seg, carry, end):
  """The gate algebra of one chunk (all [C] float32 but seg int32); returns a dict of
  Db, De, G = Db @ De, A, wq, ec, a [C] and their values at the end row."""
  c = theta.shape[0]
  i = jnp.arange(c)
  mask = (i[:, None] >= i[None, :]) & (seg[:, None] == seg[None, :])
  # Exponents are <= 0 where unmasked; clamping keeps masked entries from overflowing.
  d_b = jnp.where(mask, jnp.exp(jnp.minimum(lb[:, None] - lb[None, :], 0.0)), 0.0)
  d_e = jnp.where(mask, jnp.exp(jnp.minimum(le[:, None] - le[None, :], 0.0)), 0.0)
  g = dot(d_b, d_e)
  wq = carry * jnp.exp(lb)
  ec = carry * jnp.exp(le)
  a = jnp.sum(d_b * ec[None, :], axis=1)
  end_col = end[:, None]
  de_end = jnp.sum(end_col * d_e, axis=0)
  return dict(d_b=d_b, d_e=d_e, g=g, A=g * theta[None, :], wq=wq, ec=ec, a=a,
              A_end=jnp.sum(end_col * g, axis=0) * theta, de_end=de_end, m=theta * de_end,
              wq_end=jnp.sum(end * wq), a_end=jnp.sum(end * a), ec_end=jnp.sum(end * ec))


# The gate algebra the hoisted loops read, per token [C] (chunk_state_coefficients): A[end, :]
# and m = theta * De[end, :]; the chunk scalars wq_end, a_end, ec_end as their value at the
# chunk's end token and 0 elsewhere (the loop sums them back over the chunk, as chunk_coefficients
# does with `end`); wq and a. The forward reads FORWARD_COEFFICIENTS, the first 5.
STATE_COEFFICIENTS = ("A_end", "m", "wq_end", "a_end", "ec_end", "wq", "a")
FORWARD_COEFFICIENTS = STATE_COEFFICIENTS[:5]
_SCALARS = {"wq_end": "wq", "a_end": "a", "ec_end": "ec"}  # scalar -> its per-token term


def _per_token(co, end):
  return tuple(end * co[_SCALARS[n]] if n in _SCALARS else co[n] for n in STATE_COEFFICIENTS)


def chunk_state_coefficients(theta, lb, le, seg, carry, end):
  """The terms of chunk_coefficients the hoisted loops read: [C] f32 each, in
  STATE_COEFFICIENTS order. They depend on the gates and masks alone."""
  return _per_token(chunk_coefficients(theta, lb, le, seg, carry, end), end)


def _summed(coefficients):
  """chunk_state_coefficients (or its first few) back as chunk_coefficients' entries."""
  co = dict(zip(STATE_COEFFICIENTS, coefficients))
  return {n: jnp.sum(x) if n in _SCALARS else x for n, x in co.items()}


def _chunk_states(k, v, co, carry, w, s, dtype):
  """The chunk's prediction errors e [C, Dv] and its end states (w', s')."""
  e = 2.0 * (carry[:, None] * dot(k, w, dtype=dtype) - v.astype(jnp.float32))
  w_new = (co["wq_end"] * w + co["a_end"] * s
           - dot(k, co["A_end"][:, None] * e, trans_a=True, dtype=dtype))
  s_new = co["ec_end"] * s - dot(k, co["m"][:, None] * e, trans_a=True, dtype=dtype)
  return e, w_new, s_new


def chunk_state_forward(q, k, v, theta, lb, le, seg, carry, end, w, s, *, dtype=jnp.float32):
  """(w', s') of chunk_forward alone: the sequential part of the forward (the split forward's
  chunk loop; y then comes from chunk_forward over all chunks at once, given the states)."""
  co = chunk_coefficients(theta, lb, le, seg, carry, end)
  return _chunk_states(k, v, co, carry, w, s, dtype)[1:]


def chunk_state_forward_hoisted(k, v, carry, coefficients, w, s, *, dtype=jnp.float32):
  """chunk_state_forward given the chunk's FORWARD_COEFFICIENTS (hoisted_inputs): the hoisted
  forward's loop step, which reads neither q nor the raw gates."""
  return _chunk_states(k, v, _summed(coefficients), carry, w, s, dtype)[1:]


def chunk_forward(q, k, v, theta, lb, le, seg, carry, end, w, s, *, dtype=jnp.float32):
  """One chunk: q, k [C, Dk], v [C, Dv], gates/masks [C], w, s [Dk, Dv] f32 ->
  (y [C, Dv] f32, w', s')."""
  co = chunk_coefficients(theta, lb, le, seg, carry, end)
  e, w_new, s_new = _chunk_states(k, v, co, carry, w, s, dtype)
  p = dot(q, k, trans_b=True, dtype=dtype) * co["A"]
  y = (co["wq"][:, None] * dot(q, w, dtype=dtype) + co["a"][:, None] * dot(q, s, dtype=dtype)
       - dot(p, e, dtype=dtype))
  return y, w_new, s_new


def _de_from_y(qk, co, dy, dtype):
  """P = -((q k^T) * A)^T dy [C, Dv]: e's cotangent through y = ... - ((q k^T) * A) e, which
  does not depend on the carried state cotangents."""
  return -dot(qk * co["A"], dy, trans_a=True, dtype=dtype)


def _cotangent_chain(q, k, co, carry, dy, p, dw_new, ds_new, dtype):
  """The cotangents (dw, ds) of the chunk's starting (w, s) from those of (w', s'), given P
  (_de_from_y): the only part of the backward that needs the carry; with the terms of it the
  per-token gradients reuse."""
  k_dw = dot(k, dw_new, dtype=dtype)
  k_ds = dot(k, ds_new, dtype=dtype)
  # e feeds y (through P) and the new states through -k^T (coef * e).
  de = p - co["A_end"][:, None] * k_dw - co["m"][:, None] * k_ds
  dkw = 2.0 * carry[:, None] * de
  dw = (dot(q, co["wq"][:, None] * dy, trans_a=True, dtype=dtype) + co["wq_end"] * dw_new
        + dot(k, dkw, trans_a=True, dtype=dtype))
  ds = (dot(q, co["a"][:, None] * dy, trans_a=True, dtype=dtype) + co["a_end"] * dw_new
        + co["ec_end"] * ds_new)
  return dict(k_dw=k_dw, k_ds=k_ds, de=de, dkw=dkw, dw=dw, ds=ds)


def _state_cotangents(q, k, v, co, carry, w, dy, dw_new, ds_new, dtype):
  """_cotangent_chain with the terms chunk_backward adds: e and q k^T."""
  e = 2.0 * (carry[:, None] * dot(k, w, dtype=dtype) - v.astype(jnp.float32))
  qk = dot(q, k, trans_b=True, dtype=dtype)
  chain = _cotangent_chain(q, k, co, carry, dy, _de_from_y(qk, co, dy, dtype), dw_new, ds_new,
                           dtype)
  return dict(e=e, qk=qk, **chain)


def chunk_state_backward(q, k, v, theta, lb, le, seg, carry, end, w, s, dy, dw_new, ds_new, *,
                         dtype=jnp.float32):
  """(dw, ds) of chunk_backward alone: the sequential part of the backward (the split
  backward's chunk loop; the per-token gradients then come from chunk_backward over all
  chunks at once, given the (dw', ds') this loop saw at each chunk)."""
  co = chunk_coefficients(theta, lb, le, seg, carry, end)
  t = _state_cotangents(q, k, v, co, carry, w, dy.astype(jnp.float32), dw_new, ds_new, dtype)
  return t["dw"], t["ds"]


def chunk_state_backward_hoisted(q, k, carry, p, coefficients, dy, dw_new, ds_new, *,
                                 dtype=jnp.float32):
  """chunk_state_backward given the chunk's P and STATE_COEFFICIENTS (hoisted_inputs): the
  hoisted backward's loop step, which reads neither v, the raw gates nor the chunk's states."""
  t = _cotangent_chain(q, k, _summed(coefficients), carry, dy.astype(jnp.float32), p, dw_new,
                       ds_new, dtype)
  return t["dw"], t["ds"]


def chunk_backward(q, k, v, theta, lb, le, seg, carry, end, w, s, dy, dw_new, ds_new, *,
                   dtype=jnp.float32):
  """Transpose of chunk_forward given the chunk's starting (w, s) and the cotangents of
  (y, w', s'). Returns (dq, dk, dv, dtheta, dlb, dle, dw, ds), all float32."""
  co = chunk_coefficients(theta, lb, le, seg, carry, end)
  dy = dy.astype(jnp.float32)
  t = _state_cotangents(q, k, v, co, carry, w, dy, dw_new, ds_new, dtype)
  e, qk, k_dw, k_ds, de, dkw, dw, ds = (t[n] for n in ("e", "qk", "k_dw", "k_ds", "de", "dkw",
                                                       "dw", "ds"))
  dy_e = dot(dy, e, trans_b=True, dtype=dtype)           # [C, C]
  dqk = -dy_e * co["A"]
  dq = (co["wq"][:, None] * dot(dy, w, trans_b=True, dtype=dtype)
        + co["a"][:, None] * dot(dy, s, trans_b=True, dtype=dtype) + dot(dqk, k, dtype=dtype))
  dk = (dot(dqk, q, trans_a=True, dtype=dtype) + dot(dkw, w, trans_b=True, dtype=dtype)
        - dot(co["A_end"][:, None] * e, dw_new, trans_b=True, dtype=dtype)
        - dot(co["m"][:, None] * e, ds_new, trans_b=True, dtype=dtype))
  # The scalar gate algebra, backwards.
  end_col = end[:, None]
  d_a_mat = -dy_e * qk + end_col * (-jnp.sum(k_dw * e, axis=1))[None, :]
  dm = -jnp.sum(k_ds * e, axis=1)
  dwq = jnp.sum(dy * dot(q, w, dtype=dtype), axis=1) + end * jnp.sum(dw_new * w)
  da = jnp.sum(dy * dot(q, s, dtype=dtype), axis=1) + end * jnp.sum(dw_new * s)
  dtheta = jnp.sum(d_a_mat * co["g"], axis=0) + dm * co["de_end"]
  dg = d_a_mat * theta[None, :]
  d_db = dot(dg, co["d_e"], trans_b=True) + da[:, None] * co["ec"][None, :]
  d_de = dot(co["d_b"], dg, trans_a=True) + end_col * (dm * theta)[None, :]
  dec = end * jnp.sum(ds_new * s) + jnp.sum(co["d_b"] * da[:, None], axis=0)
  z_b = d_db * co["d_b"]
  z_e = d_de * co["d_e"]
  dlb = dwq * co["wq"] + jnp.sum(z_b, axis=1) - jnp.sum(z_b, axis=0)
  dle = dec * co["ec"] + jnp.sum(z_e, axis=1) - jnp.sum(z_e, axis=0)
  return dq, dk, -2.0 * de, dtheta, dlb, dle, dw, ds


def _to_chunks(x, chunk):
  """[B, Tp, H, D] -> [N, B, H, C, D] and [B, Tp] -> [N, B, C]."""
  b, tp = x.shape[:2]
  x = x.reshape(b, tp // chunk, chunk, *x.shape[2:])
  return jnp.transpose(x, (1, 0, 3, 2, 4) if x.ndim == 5 else (1, 0, 2))


def _from_chunks(x):
  """[N, B, H, C, D] -> [B, N*C, H, D] (the inverse of _to_chunks)."""
  n, b, h, c, d = x.shape
  return jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(b, n * c, h, d)


def _per_head(fn, num_extra: int):
  """vmaps a per-(row, head, chunk) function over [B, H]: its 9 token arguments (the 3 masks
  shared by the heads of a row) and `num_extra` per-head arguments after them."""
  head = jax.vmap(fn, in_axes=(0,) * 6 + (None,) * 3 + (0,) * num_extra)
  return jax.vmap(head)


def _tokens(q, k, v, theta, lb, le, seg, carry, end, chunk):
  gates = [_to_chunks(x[..., None], chunk)[..., 0] for x in (theta, lb, le)]
  return ([_to_chunks(x, chunk) for x in (q, k, v)] + gates
          + [_to_chunks(x, chunk) for x in (seg, carry, end)])


def forward(q, k, v, theta, lb, le, seg, carry, end, w0, s0, *, chunk: int,
            dtype=jnp.float32, save_states: bool = True):
  """All chunks in order. Returns (y [B, Tp, H, Dv] f32, w_T, s_T, states) where states =
  (w, s) at the start of every chunk [N, B, H, Dk, Dv] (None unless save_states)."""
  step_fn = _per_head(lambda *a: chunk_forward(*a, dtype=dtype), 2)

  def step(state, xs):
    w, s = state
    y, w_new, s_new = step_fn(*xs, w, s)
    return (w_new, s_new), (y, (w, s) if save_states else None)

  (w, s), (y, states) = jax.lax.scan(step, (w0, s0),
                                     _tokens(q, k, v, theta, lb, le, seg, carry, end, chunk))
  return _from_chunks(y), w, s, states


def backward(q, k, v, theta, lb, le, seg, carry, end, states, dy, dw_t, ds_t, *, chunk: int,
             dtype=jnp.float32):
  """All chunks in reverse. Returns f32 (dq, dk, dv, dtheta, dlb, dle, dw0, ds0)."""
  step_fn = _per_head(lambda *a: chunk_backward(*a, dtype=dtype), 5)
  xs = _tokens(q, k, v, theta, lb, le, seg, carry, end, chunk)
  xs.append(_to_chunks(dy, chunk))

  def step(carry_ct, inputs):
    dw, ds = carry_ct
    *tok, dy_c, (w, s) = inputs
    dq, dk, dv, dth, dlb, dle, dw, ds = step_fn(*tok, w, s, dy_c, dw, ds)
    return (dw, ds), (dq, dk, dv, dth, dlb, dle)

  (dw0, ds0), grads = jax.lax.scan(step, (dw_t, ds_t), xs + [states], reverse=True)
  dq, dk, dv = (_from_chunks(g) for g in grads[:3])
  dth, dlb, dle = (_from_chunks(g[..., None])[..., 0] for g in grads[3:])
  return dq, dk, dv, dth, dlb, dle, dw0, ds0


def _all_chunks(fn, tokens, per_chunk, chunk: int, num_outputs: int):
  """fn(9 token slices [C, ...], *per-chunk args) of every (row, head, chunk) at once (no
  chunk loop); per_chunk: (array, layout) pairs, "tokens" [B, Tp, H, ...] or "states"
  [B, H, N, Dk, Dv]. Returns fn's first num_outputs outputs in the token layout."""
  b, tp = tokens[0].shape[:2]
  n = tp // chunk

  def chunks(x):  # [B, Tp, H, ...] -> [B, H, N, C, ...]; masks [B, Tp] -> [B, N, C]
    x = x.reshape(b, n, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 3, 1) if x.ndim > 3 else x

  tok = [chunks(x) for x in tokens]
  extra = [chunks(x) if kind == "tokens" else x for x, kind in per_chunk]
  out = lambda *a: fn(*a)[:num_outputs]  # noqa: E731
  # Every argument is mapped over its leading (B, H, N) axes but the masks, which are the
  # row's: mapped over (B, N), shared by its heads.
  per_head = (0,) * 6 + (None,) * 3 + (0,) * len(per_chunk)
  over_n = jax.vmap(out)
  over_h = jax.vmap(over_n, in_axes=per_head)
  outs = jax.vmap(over_h)(*tok, *extra)

  def tokens_back(x):  # [B, H, N, C, ...] -> [B, Tp, H, ...]
    x = jnp.moveaxis(x, 1, 3)
    return x.reshape(b, tp, *x.shape[3:])
  return tuple(tokens_back(o) for o in outs)


def forward_given_states(q, k, v, theta, lb, le, seg, carry, end, states, *, chunk: int,
                         dtype=jnp.float32):
  """y [B, Tp, H, Dv] f32 of every chunk at once, given the chunk-start states (w, s), each
  [B, H, N, Dk, Dv]: chunk_forward vmapped over (B, H, N)."""
  fn = lambda *a: chunk_forward(*a, dtype=dtype)  # noqa: E731
  w, s = states
  return _all_chunks(fn, (q, k, v, theta, lb, le, seg, carry, end),
                     ((w, "states"), (s, "states")), chunk, 1)[0]


def backward_given_cotangents(q, k, v, theta, lb, le, seg, carry, end, states, cotangents, dy,
                              *, chunk: int, dtype=jnp.float32):
  """The per-token gradients of every chunk at once (no chunk loop), given the chunk-start
  states and the state cotangents (dw', ds') entering each chunk from its right, both
  [B, H, N, Dk, Dv] pairs: chunk_backward vmapped over (B, H, N). Returns f32 (dq, dk, dv,
  dtheta, dlb, dle), the layouts of backward's."""
  fn = lambda *a: chunk_backward(*a, dtype=dtype)  # noqa: E731
  (w, s), (dw, ds) = states, cotangents
  return _all_chunks(fn, (q, k, v, theta, lb, le, seg, carry, end),
                     ((w, "states"), (s, "states"), (dy, "tokens"), (dw, "states"),
                      (ds, "states")), chunk, 6)


def hoisted_inputs(q, k, v, theta, lb, le, seg, carry, end, dy=None, *, chunk: int,
                   dtype=jnp.float32):
  """What the hoisted loops read, for every chunk at once (no loop): the 7
  chunk_state_coefficients [B, Tp, H] f32 (STATE_COEFFICIENTS order) and, given dy
  [B, Tp, H, Dv] (the backward), P = -((q k^T) * A)^T dy [B, Tp, H, Dv] f32 last."""
  def fn(q, k, v, theta, lb, le, seg, carry, end, *dy_chunk):
    co = chunk_coefficients(theta, lb, le, seg, carry, end)
    out = _per_token(co, end)
    if dy_chunk:
      qk = dot(q, k, trans_b=True, dtype=dtype)
      out += (_de_from_y(qk, co, dy_chunk[0].astype(jnp.float32), dtype),)
    return out
  extra = () if dy is None else ((dy, "tokens"),)
  return _all_chunks(fn, (q, k, v, theta, lb, le, seg, carry, end), extra, chunk,
                     len(STATE_COEFFICIENTS) + len(extra))
