"""The chunked gated delta rule in plain jnp: the fast path anywhere and the kernels' blueprint.

Inside a chunk of C tokens (offsets i, j; G the chunk-local cumulative log gate, so the decay
from token j to token i is D_ij = e^{G_i - G_j}, j <= i, same run; S the state entering the
chunk; masks carry/tail as in common.py), the deltas d_i = b_i (v_i - (a_i S_{i-1})^T k_i) solve

  (I + A) Delta = diag(b) V - diag(b gq) K S,    A = tril(diag(b) (K K^T * D), -1)

(the WY / UT transform: the chunk's C rank-one updates composed into one triangular solve), so
with T = (I + A)^{-1} (depends on k, b and the gates only):

  W = T diag(b gq) K   [C, Dk]     U = T diag(b) V   [C, Dv]      Delta = U - W S
  O  = diag(gq) Q S + (Q K^T * D) Delta                                      [C, Dv]
  S' = keep S + K^T diag(omega) Delta                                        [Dk, Dv]

gq_i = e^{G_i} carry_i (the state reaching token i), omega_j = e^{G_last - G_j} tail_j (token j
in the state leaving the chunk), keep = e^{G_last} carry_last. Every exponent is <= 0 for
log gates <= 0, and masked entries are exponentiated at 0, so no gate overflows.

The backward (derived in docs/mechanisms_linear.md) runs the chunks in reverse for the state
cotangent, dS = (diag(gq) Q)^T dO + keep dS' - W^T dDelta with dDelta = (QK^T * D)^T dO +
diag(omega) K dS', then every chunk's input gradients independently. The per-chunk functions
below act on one (batch row, head, chunk) and are called verbatim by the Pallas kernels; the
Dv-dependent parts take a block of value columns, so a kernel can walk Dv in blocks.

Array contract of `forward` / `backward` (the api pads and prepares them, common.Chunked):
q, k [B, Tp, H, Dk]; v [B, Tp, H, Dv]; beta, gcum [B, Tp, H] float32; runs, carry, tail
[B, Tp] or None; states [B, H, Dk, Dv] float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effattn.kernels.delta_rule.common import Chunked
from effattn.kernels.memory_chunk.xla import dot

# -- one chunk ----------------------------------------------------------------------------------


def block_decay(g_rows, g_cols, runs_rows=None, runs_cols=None, *, diagonal: bool,
                strict: bool = False):
  """D[i, j] = e^{g_rows[i] - g_cols[j]} where token j reaches token i, else 0 (float32).

  diagonal: rows and columns are the same tokens (causal mask, strict or with the diagonal);
  otherwise every column precedes every row. runs: same-run mask (packed sequences) or None.
  """
  diff = g_rows[:, None] - g_cols[None, :]
  mask = None
  if diagonal:
    i = jnp.arange(g_rows.shape[0])
    mask = i[:, None] > i[None, :] if strict else i[:, None] >= i[None, :]
  if runs_rows is not None:
    same = runs_rows[:, None] == runs_cols[None, :]
    mask = same if mask is None else mask & same
  if mask is None:
    return jnp.exp(diff)
  return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def wy_block(k_rows, k_cols, beta_rows, g_rows, g_cols, runs_rows=None, runs_cols=None, *,
             diagonal: bool, dtype):
  """A block of A = tril(diag(b) (K K^T * D), -1): rows' tokens against columns' tokens."""
  kk = dot(k_rows, k_cols, trans_b=True, dtype=dtype)
  decay = block_decay(g_rows, g_cols, runs_rows, runs_cols, diagonal=diagonal, strict=True)
  return beta_rows[:, None] * kk * decay


def forward_substitution(a):
  """(I + a)^{-1} for a strictly lower-triangular a [n, n] float32.

  Column sweep: after step j, row j of the inverse is final and its multiple a[:, j] is taken
  off every later row. Only masks, reductions and broadcasts, so every backend lowers it.
  """
  n = a.shape[0]
  i = jnp.arange(n)
  rows, cols = i[:, None], i[None, :]

  def body(j, inv):
    a_col = jnp.sum(jnp.where(cols == j, a, 0.0), axis=1, keepdims=True)     # [n, 1]
    inv_row = jnp.sum(jnp.where(rows == j, inv, 0.0), axis=0, keepdims=True)  # [1, n]
    return inv - a_col * inv_row

  return jax.lax.fori_loop(0, n - 1, body, (rows == cols).astype(jnp.float32))


def _last(x):
  """The last entry of a [C] vector (a masked sum: no dynamic indexing inside kernels)."""
  return jnp.sum(jnp.where(jnp.arange(x.shape[0]) == x.shape[0] - 1, x, 0.0))


def chunk_setup(q, k, beta, gcum, tinv, runs=None, carry=None, tail=None, *, dtype):
  """The value-independent quantities of one chunk.

  q, k [C, Dk]; beta, gcum [C] float32; tinv [C, C] = (I + A)^{-1}; runs [C] int32, carry,
  tail [C] float32 or None. Returns a dict (float32 arrays, q and k as given).
  """
  g_last = _last(gcum)
  decay = block_decay(gcum, gcum, runs, runs, diagonal=True)
  gq = jnp.exp(gcum)
  omega = jnp.exp(g_last - gcum)
  keep = jnp.exp(g_last)
  if carry is not None:
    gq, omega, keep = gq * carry, omega * tail, keep * _last(carry)
  qk = dot(q, k, trans_b=True, dtype=dtype)
  w = dot(tinv, k * (beta * gq)[:, None], dtype=dtype)
  return dict(q=q, k=k, beta=beta, tinv=tinv, runs=runs, decay=decay, qk=qk, p=qk * decay,
              gq=gq, omega=omega, keep=keep, w=w)


def chunk_forward(ctx, v, state, *, dtype):
  """One chunk, one block of value columns: v [C, bv], state [Dk, bv] float32 ->
  (o [C, bv] float32 before the output scale, the state after the chunk)."""
  u = dot(ctx["tinv"], v * ctx["beta"][:, None], dtype=dtype)
  delta = u - dot(ctx["w"], state, dtype=dtype)
  o = ctx["gq"][:, None] * dot(ctx["q"], state, dtype=dtype) + dot(ctx["p"], delta, dtype=dtype)
  k_out = ctx["k"] * ctx["omega"][:, None]
  return o, ctx["keep"] * state + dot(k_out, delta, trans_a=True, dtype=dtype)


def _ddelta(ctx, do, dstate, dtype):
  """Cotangent of Delta from the outputs and from the state after the chunk."""
  k_out = ctx["k"] * ctx["omega"][:, None]
  return dot(ctx["p"], do, trans_a=True, dtype=dtype) + dot(k_out, dstate, dtype=dtype)


def chunk_dstate(ctx, do, dstate, *, dtype):
  """Cotangent of the state entering the chunk from do [C, bv] (already times the output
  scale) and dstate [Dk, bv], the cotangent of the state leaving it."""
  ddelta = _ddelta(ctx, do, dstate, dtype)
  q_in = ctx["q"] * ctx["gq"][:, None]
  return (dot(q_in, do, trans_a=True, dtype=dtype) + ctx["keep"] * dstate
          - dot(ctx["w"], ddelta, trans_a=True, dtype=dtype))


def chunk_backward_block(ctx, v, do, state, dstate, *, dtype):
  """One block of value columns of a chunk's backward: v, do [C, bv]; state (entering) and
  dstate (cotangent of the state leaving) [Dk, bv]. Returns (dv [C, bv], partial sums), the
  partial sums to add over blocks before chunk_backward_finish."""
  u = dot(ctx["tinv"], v * ctx["beta"][:, None], dtype=dtype)
  delta = u - dot(ctx["w"], state, dtype=dtype)
  ddelta = _ddelta(ctx, do, dstate, dtype)
  x = dot(ctx["tinv"], ddelta, trans_a=True, dtype=dtype)                   # T^T dU
  partial = dict(
      m1=dot(do, state, trans_b=True, dtype=dtype),                          # dO S^T
      dp=dot(do, delta, trans_b=True, dtype=dtype),                          # dO Delta^T
      m3=dot(delta, dstate, trans_b=True, dtype=dtype),                      # Delta dS'^T
      dw=-dot(ddelta, state, trans_b=True, dtype=dtype),                     # dW
      xu=dot(x, u, trans_b=True, dtype=dtype),                               # X U^T
      vx=jnp.sum(v.astype(jnp.float32) * x, axis=1),
      dkeep=jnp.sum(state * dstate))
  return ctx["beta"][:, None] * x, partial


def accumulate(total, partial):
  return partial if total is None else jax.tree.map(jnp.add, total, partial)


def chunk_backward_finish(ctx, acc, *, dtype):
  """The value-independent rest of a chunk's backward from the summed partials.

  Returns (dq, dk [C, Dk], dbeta, dgcum [C]) float32; dgcum is the gradient of the chunk-local
  cumulative gate (the api turns it into the per-token gate's by a reverse cumsum).
  """
  q, k, beta, tinv, decay, w = (ctx[n] for n in ("q", "k", "beta", "tinv", "decay", "w"))
  gq, omega = ctx["gq"], ctx["omega"]
  c = q.shape[0]
  i = jnp.arange(c)
  strict = i[:, None] > i[None, :]
  if ctx["runs"] is not None:
    strict = strict & (ctx["runs"][:, None] == ctx["runs"][None, :])
  y = dot(tinv, acc["dw"], trans_a=True, dtype=dtype)                       # T^T dW
  # T = (I + A)^{-1}: dA = -T^T dT T^T = -(X U^T + Y W^T), on A's support only.
  da = jnp.where(strict, -(acc["xu"] + dot(y, w, trans_b=True, dtype=dtype)), 0.0)
  kk = dot(k, k, trans_b=True, dtype=dtype)
  dkk = beta[:, None] * da * decay
  ky = jnp.sum(k.astype(jnp.float32) * y, axis=1)
  dqk = acc["dp"] * decay
  dq = gq[:, None] * acc["m1"] + dot(dqk, k, dtype=dtype)
  dk = (dot(dqk, q, trans_a=True, dtype=dtype) + dot(dkk, k, dtype=dtype)
        + dot(dkk, k, trans_a=True, dtype=dtype) + (beta * gq)[:, None] * y
        + omega[:, None] * acc["m3"])
  dbeta = acc["vx"] + gq * ky + jnp.sum(da * kk * decay, axis=1)
  dgq = beta * ky + jnp.sum(q.astype(jnp.float32) * acc["m1"], axis=1)
  domega = jnp.sum(k.astype(jnp.float32) * acc["m3"], axis=1)
  # D_ij = e^{G_i - G_j}: its cotangent times D goes to G_i and, negated, to G_j.
  z = (acc["dp"] * ctx["qk"] + beta[:, None] * da * kk) * decay
  dg_last = jnp.sum(domega * omega) + acc["dkeep"] * ctx["keep"]
  dg = (jnp.sum(z, axis=1) - jnp.sum(z, axis=0) + dgq * gq - domega * omega
        + jnp.where(i == c - 1, dg_last, 0.0))
  return dq, dk, dbeta, dg


# -- all chunks -----------------------------------------------------------------------------


def to_chunks(x, chunk: int):
  """[B, Tp, H, D] -> [N, B, H, C, D]; [B, Tp, H] -> [N, B, H, C]; [B, Tp] -> [N, B, C]."""
  b, padded = x.shape[:2]
  x = x.reshape(b, padded // chunk, chunk, *x.shape[2:])
  perm = {5: (1, 0, 3, 2, 4), 4: (1, 0, 3, 2), 3: (1, 0, 2)}[x.ndim]
  return jnp.transpose(x, perm)


def from_chunks(x):
  """The inverse of to_chunks for [N, B, H, C, D] and [N, B, H, C]."""
  perm = (1, 0, 3, 2, 4) if x.ndim == 5 else (1, 0, 3, 2)
  x = jnp.transpose(x, perm)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _vmap_heads(fn, num_tokens: int, num_masks: int, num_rest: int):
  """vmaps fn(tokens..., masks..., rest...) over [B, H]; masks (runs/carry/tail) are shared by
  the heads of a row, None masks stay None."""
  axes = (0,) * num_tokens + (None,) * num_masks + (0,) * num_rest
  return jax.vmap(jax.vmap(fn, in_axes=axes), in_axes=(0,) * (num_tokens + num_masks + num_rest))


def _masks(x: Chunked, chunk: int):
  return [None if m is None else to_chunks(m, chunk) for m in (x.runs, x.carry, x.tail)]


def inverses(x: Chunked, chunk: int, dtype):
  """T = (I + A)^{-1} of every chunk: [N, B, H, C, C] float32."""
  def one(k, beta, g, runs):
    a = wy_block(k, k, beta, g, g, runs, runs, diagonal=True, dtype=dtype)
    eye = jnp.eye(a.shape[0], dtype=jnp.float32)
    return jax.scipy.linalg.solve_triangular(eye + a, eye, lower=True, unit_diagonal=True)
  fn = _vmap_heads(one, 3, 1, 0)
  return jax.vmap(fn)(to_chunks(x.k, chunk), to_chunks(x.beta, chunk), to_chunks(x.gcum, chunk),
                      _masks(x, chunk)[0])


def _setup(dtype):
  return lambda q, k, beta, g, tinv, runs, carry, tail: chunk_setup(
      q, k, beta, g, tinv, runs, carry, tail, dtype=dtype)


def forward(x: Chunked, s0, *, chunk: int, scale: float, dtype, save_states: bool = True):
  """All chunks in order. Returns (o [B, Tp, H, Dv] float32, final state, residuals) with
  residuals = (T [N, B, H, C, C], states entering every chunk [N, B, H, Dk, Dv]) or None."""
  tinv = inverses(x, chunk, dtype)
  setup = _setup(dtype)

  def one(q, k, v, beta, g, runs, carry, tail, tinv, state):
    ctx = setup(q, k, beta, g, tinv, runs, carry, tail)
    return chunk_forward(ctx, v, state, dtype=dtype)

  fn = _vmap_heads(one, 5, 3, 2)

  def step(state, xs):
    toks, masks, t_c = xs
    o, new = fn(*toks, *masks, t_c, state)
    return new, (o, state if save_states else None)

  toks = [to_chunks(a, chunk) for a in (x.q, x.k, x.v, x.beta, x.gcum)]
  final, (o, states) = jax.lax.scan(step, s0, (toks, _masks(x, chunk), tinv))
  return scale * from_chunks(o), final, ((tinv, states) if save_states else None)


def backward(x: Chunked, residuals, do, dfinal, *, chunk: int, scale: float, dtype):
  """Gradients from the cotangents of o [B, Tp, H, Dv] and of the final state.

  Returns (dq, dk, dv, dbeta, dgcum, ds0), float32.
  """
  tinv, states = residuals
  setup = _setup(dtype)
  do = scale * do.astype(jnp.float32)
  toks = [to_chunks(a, chunk) for a in (x.q, x.k, x.beta, x.gcum, do)]
  masks = _masks(x, chunk)

  def dstate_one(q, k, beta, g, do, runs, carry, tail, tinv, ds):
    return chunk_dstate(setup(q, k, beta, g, tinv, runs, carry, tail), do, ds, dtype=dtype)

  dstate_fn = _vmap_heads(dstate_one, 5, 3, 2)

  def step(ds, xs):
    toks_c, masks_c, t_c = xs
    return dstate_fn(*toks_c, *masks_c, t_c, ds), ds

  ds0, dstates = jax.lax.scan(step, dfinal.astype(jnp.float32), (toks, masks, tinv),
                              reverse=True)

  def local_one(q, k, beta, g, do, v, runs, carry, tail, tinv, state, ds):
    ctx = setup(q, k, beta, g, tinv, runs, carry, tail)
    dv, partial = chunk_backward_block(ctx, v, do, state, ds, dtype=dtype)
    return (dv,) + chunk_backward_finish(ctx, partial, dtype=dtype)

  local = jax.vmap(_vmap_heads(local_one, 6, 3, 3))
  dv, dq, dk, dbeta, dg = local(*toks, to_chunks(x.v, chunk), *masks, tinv, states, dstates)
  return (from_chunks(dq), from_chunks(dk), from_chunks(dv), from_chunks(dbeta),
          from_chunks(dg), ds0)
