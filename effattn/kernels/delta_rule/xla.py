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

Only the state carries across chunks, so the op is three passes, and the kernels keep the
sequential one lean (two matmuls per chunk forward, three backward):
  1. every chunk in parallel: T, W, U                                   (chunk_inverse, chunk_wy)
  2. the chunks in order: Delta = U - W S, S' = keep S + (diag(omega) K)^T Delta   (walk_forward)
  3. every chunk in parallel: O from Delta and the chunk's entering state       (chunk_output)
The backward (derived in docs/mechanisms_linear.md) mirrors it: within-chunk cotangents in
parallel (chunk_dlocal), the chunks in reverse for the state's cotangent dS = (diag(gq) Q)^T dO
+ keep dS' - W^T dDelta with dDelta = P^T dO + diag(omega) K dS' (walk_backward), then every
chunk's input gradients in parallel (backward_setup, chunk_backward_block, _finish).

The per-chunk functions act on one (batch row, head, chunk) and are called verbatim by the
Pallas kernels; the Dv-dependent ones take a block of value columns, so a kernel can walk Dv in
blocks (the backward's partial sums add over blocks). This file runs them with vmap and
lax.scan.

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


def state_gates(gcum, carry=None, tail=None):
  """(gq [C], omega [C], keep []) of one chunk: the decay of the entering state at each token,
  of each token's delta at the chunk's end, and of the state across the chunk (module
  docstring), with the segment masks applied."""
  g_last = _last(gcum)
  gq, omega, keep = jnp.exp(gcum), jnp.exp(g_last - gcum), jnp.exp(g_last)
  if carry is None:
    return gq, omega, keep
  return gq * carry, omega * tail, keep * _last(carry)


def chunk_inverse(k, beta, gcum, runs=None, *, dtype):
  """T = (I + A)^{-1} of one chunk [C, C] float32, by forward substitution on the whole tile."""
  return forward_substitution(wy_block(k, k, beta, gcum, gcum, runs, runs, diagonal=True,
                                       dtype=dtype))


def chunk_w(tinv, k, beta, gq, *, dtype):
  """W = T diag(b gq) K [C, Dk] (float32)."""
  return dot(tinv, k * (beta * gq)[:, None], dtype=dtype)


def chunk_wy(tinv, k, v, beta, gq, *, dtype):
  """(W, U = T diag(b) V [C, Dv]) of one chunk (float32)."""
  return chunk_w(tinv, k, beta, gq, dtype=dtype), dot(tinv, v * beta[:, None], dtype=dtype)


def walk_forward(k, omega, keep, w, u, state, *, dtype):
  """The sequential part of the forward, one chunk and one block of value columns: u [C, bv],
  state [Dk, bv] float32 -> (Delta [C, bv], the state after the chunk)."""
  delta = u - dot(w, state, dtype=dtype)
  k_out = k * omega[:, None]
  return delta, keep * state + dot(k_out, delta, trans_a=True, dtype=dtype)


def scores(q, k, decay, *, dtype):
  """P = Q K^T * D [C, C] float32: the within-chunk attention of the outputs."""
  return dot(q, k, trans_b=True, dtype=dtype) * decay


def chunk_output(q, p, gq, delta, state, *, dtype):
  """O = diag(gq) Q S + P Delta for one block of value columns (before the scale)."""
  return gq[:, None] * dot(q, state, dtype=dtype) + dot(p, delta, dtype=dtype)


def chunk_dlocal(p, do, *, dtype):
  """P^T dO: the within-chunk part of Delta's cotangent (do already scaled)."""
  return dot(p, do, trans_a=True, dtype=dtype)


def walk_backward(q, k, gq, omega, keep, w, dlocal, do, dstate, *, dtype):
  """The sequential part of the backward, one chunk and one block of value columns: from the
  cotangent dstate [Dk, bv] of the state leaving the chunk -> (dDelta [C, bv], the cotangent
  of the state entering it). do is already scaled."""
  ddelta = dlocal + dot(k * omega[:, None], dstate, dtype=dtype)
  q_in = q * gq[:, None]
  return ddelta, (dot(q_in, do, trans_a=True, dtype=dtype) + keep * dstate
                  - dot(w, ddelta, trans_a=True, dtype=dtype))


def backward_setup(q, k, beta, gcum, tinv, w, runs=None, carry=None, tail=None):
  """What a chunk's backward needs besides the value columns (w: chunk_wy's W)."""
  gq, omega, keep = state_gates(gcum, carry, tail)
  decay = block_decay(gcum, gcum, runs, runs, diagonal=True)
  return dict(q=q, k=k, beta=beta, tinv=tinv, runs=runs, decay=decay, gq=gq, omega=omega,
              keep=keep, w=w)


def chunk_backward_block(ctx, v, do, state, dstate, ddelta, *, dtype):
  """One block of value columns of a chunk's backward: v, do, ddelta [C, bv]; state (entering)
  and dstate (cotangent of the state leaving) [Dk, bv]. Returns (dv [C, bv], partial sums) to
  add over blocks before chunk_backward_finish.

  With X = T^T dDelta (= T^T dU): dV = diag(b) X, T^T dW = -X S^T, and the inverse's
  dA = -T^T dT T^T = -X Delta^T (since U - W S = Delta)."""
  q, k, beta, tinv, gq, omega = (ctx[n] for n in ("q", "k", "beta", "tinv", "gq", "omega"))
  u = dot(tinv, v * beta[:, None], dtype=dtype)
  delta = u - dot(ctx["w"], state, dtype=dtype)
  x = dot(tinv, ddelta, trans_a=True, dtype=dtype)
  m1 = dot(do, state, trans_b=True, dtype=dtype)                           # dO S^T
  m3 = dot(delta, dstate, trans_b=True, dtype=dtype)                       # Delta dS'^T
  y = -dot(x, state, trans_b=True, dtype=dtype)                            # T^T dW
  q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
  partial = dict(
      dq=gq[:, None] * m1, qm1=jnp.sum(q32 * m1, axis=1),
      dk=omega[:, None] * m3 + (beta * gq)[:, None] * y,
      ky=jnp.sum(k32 * y, axis=1), km3=jnp.sum(k32 * m3, axis=1),
      dp=dot(do, delta, trans_b=True, dtype=dtype),                        # dO Delta^T
      xd=dot(x, delta, trans_b=True, dtype=dtype),                         # X Delta^T
      vx=jnp.sum(v.astype(jnp.float32) * x, axis=1),
      dkeep=jnp.sum(state * dstate))
  return beta[:, None] * x, partial


def accumulate(total, partial):
  return partial if total is None else jax.tree.map(jnp.add, total, partial)


def chunk_backward_finish(ctx, acc, *, dtype):
  """The value-independent rest of a chunk's backward from the summed partials.

  Returns (dq, dk [C, Dk], dbeta, dgcum [C]) float32; dgcum is the gradient of the chunk-local
  cumulative gate (the api turns it into the per-token gate's by a reverse cumsum).
  """
  q, k, beta, decay = (ctx[n] for n in ("q", "k", "beta", "decay"))
  gq, omega = ctx["gq"], ctx["omega"]
  c = q.shape[0]
  i = jnp.arange(c)
  strict = i[:, None] > i[None, :]
  if ctx["runs"] is not None:
    strict = strict & (ctx["runs"][:, None] == ctx["runs"][None, :])
  da = jnp.where(strict, -acc["xd"], 0.0)                                  # on A's support
  qk = dot(q, k, trans_b=True, dtype=dtype)
  kk = dot(k, k, trans_b=True, dtype=dtype)
  dkk = beta[:, None] * da * decay
  dqk = acc["dp"] * decay
  dq = acc["dq"] + dot(dqk, k, dtype=dtype)
  dk = (acc["dk"] + dot(dqk, q, trans_a=True, dtype=dtype) + dot(dkk, k, dtype=dtype)
        + dot(dkk, k, trans_a=True, dtype=dtype))
  dbeta = acc["vx"] + gq * acc["ky"] + jnp.sum(da * kk * decay, axis=1)
  dgq = beta * acc["ky"] + acc["qm1"]
  # D_ij = e^{G_i - G_j}: its cotangent times D goes to G_i and, negated, to G_j.
  z = (acc["dp"] * qk + beta[:, None] * da * kk) * decay
  dg_last = jnp.sum(acc["km3"] * omega) + acc["dkeep"] * ctx["keep"]
  dg = (jnp.sum(z, axis=1) - jnp.sum(z, axis=0) + dgq * gq - acc["km3"] * omega
        + jnp.where(i == c - 1, dg_last, 0.0))
  return dq, dk, dbeta, dg


# The same per-chunk gradients split in two halves with smaller live sets (pallas_gpu's
# backward="split"): the "scores" half (dq and the parts of dk, dg from O and the leaving state,
# computable per block of key columns) and the "WY" half (dv, dbeta and the parts of dk, dg from
# the inverse). Both are linear in their partial sums, so dk = dk_a + dk_b, dg = dg_a + dg_b
# (and dg_a, computed per block of key columns, adds over the blocks). delta is the chunk's
# Delta (the forward's, saved).


def scores_backward_block(do, delta, state, dstate, *, dtype):
  """One block of value columns of the scores half: do, delta [C, bv]; state, dstate: rows of
  one block of key columns [bk, bv]. Returns partial sums to add over value blocks."""
  return dict(m1=dot(do, state, trans_b=True, dtype=dtype),                # dO S^T
              m3=dot(delta, dstate, trans_b=True, dtype=dtype),            # Delta dS'^T
              dp=dot(do, delta, trans_b=True, dtype=dtype),                # dO Delta^T
              dkeep=jnp.sum(state * dstate))


def scores_backward_finish(q, k, gq, omega, keep, decay, acc, *, dtype):
  """The scores half from its summed partials, for one block of key columns q, k [C, bk]:
  (dq, dk_a [C, bk], dg_a [C]) float32 (dg_a: this block's share of the gate gradient)."""
  c = q.shape[0]
  i = jnp.arange(c)
  m1, m3 = acc["m1"], acc["m3"]
  dqk = acc["dp"] * decay
  dq = gq[:, None] * m1 + dot(dqk, k, dtype=dtype)
  dk = omega[:, None] * m3 + dot(dqk, q, trans_a=True, dtype=dtype)
  qm1 = jnp.sum(q.astype(jnp.float32) * m1, axis=1)
  km3 = jnp.sum(k.astype(jnp.float32) * m3, axis=1)
  z = dqk * dot(q, k, trans_b=True, dtype=dtype)
  dg_last = jnp.sum(km3 * omega) + acc["dkeep"] * keep
  dg = (jnp.sum(z, axis=1) - jnp.sum(z, axis=0) + qm1 * gq - km3 * omega
        + jnp.where(i == c - 1, dg_last, 0.0))
  return dq, dk, dg


def wy_backward_block(tinv, v, beta, delta, ddelta, state, *, dtype):
  """One block of value columns of the WY half: v, delta, ddelta [C, bv], state [Dk, bv].
  Returns (dv [C, bv], partial sums): X = T^T dDelta, dV = diag(b) X, T^T dW = -X S^T and
  dA = -X Delta^T on A's support."""
  x = dot(tinv, ddelta, trans_a=True, dtype=dtype)
  return beta[:, None] * x, dict(y=-dot(x, state, trans_b=True, dtype=dtype),
                                 xd=dot(x, delta, trans_b=True, dtype=dtype),
                                 vx=jnp.sum(v.astype(jnp.float32) * x, axis=1))


def wy_backward_finish(k, beta, gq, decay, runs, acc, *, dtype):
  """The WY half from its summed partials: (dk_b [C, Dk], dbeta [C], dg_b [C]) float32."""
  c = k.shape[0]
  i = jnp.arange(c)
  strict = i[:, None] > i[None, :]
  if runs is not None:
    strict = strict & (runs[:, None] == runs[None, :])
  da = jnp.where(strict, -acc["xd"], 0.0)
  kk = dot(k, k, trans_b=True, dtype=dtype)
  dkk = beta[:, None] * da * decay
  y = acc["y"]
  dk = ((beta * gq)[:, None] * y + dot(dkk, k, dtype=dtype)
        + dot(dkk, k, trans_a=True, dtype=dtype))
  ky = jnp.sum(k.astype(jnp.float32) * y, axis=1)
  z = dkk * kk
  dbeta = acc["vx"] + gq * ky + jnp.sum(da * kk * decay, axis=1)
  dg = jnp.sum(z, axis=1) - jnp.sum(z, axis=0) + beta * ky * gq
  return dk, dbeta, dg


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


def _every_chunk(fn, tokens, masks=(None, None, None)):
  """fn over every (chunk, row, head): tokens are [N, B, H, ...] (or None), masks [N, B, C]
  (shared by the heads of a row) or None."""
  axes = (0,) * len(tokens) + (None,) * len(masks)
  per_row = jax.vmap(fn, in_axes=axes)
  return jax.vmap(jax.vmap(per_row))(*tokens, *masks)


def _walk(fn, state, tokens, reverse=False):
  """lax.scan over the chunks of fn(tokens..., state) -> (out, state), vmapped over [B, H].
  Returns (final state, stacked outs, the state entering each chunk's step)."""
  per_head = jax.vmap(jax.vmap(fn))

  def step(carry, xs):
    out, new = per_head(*xs, carry)
    return new, (out, carry)

  final, (outs, entering) = jax.lax.scan(step, state, tokens, reverse=reverse)
  return final, outs, entering


def inverses(x: Chunked, chunk: int, dtype):
  """T = (I + A)^{-1} of every chunk: [N, B, H, C, C] float32 (a triangular solve in XLA)."""
  def one(k, beta, g, runs, *_):
    a = wy_block(k, k, beta, g, g, runs, runs, diagonal=True, dtype=dtype)
    eye = jnp.eye(a.shape[0], dtype=jnp.float32)
    return jax.scipy.linalg.solve_triangular(eye + a, eye, lower=True, unit_diagonal=True)
  return _every_chunk(one, [to_chunks(a, chunk) for a in (x.k, x.beta, x.gcum)],
                      _masks(x, chunk))


def _masks(x: Chunked, chunk: int):
  return [None if m is None else to_chunks(m, chunk) for m in (x.runs, x.carry, x.tail)]


def _gates(x: Chunked, chunk: int):
  """(gq, omega, keep) of every chunk: [N, B, H, C], [N, B, H, C], [N, B, H]."""
  return _every_chunk(lambda g, runs, carry, tail: state_gates(g, carry, tail),
                      [to_chunks(x.gcum, chunk)], _masks(x, chunk))


def _decay(g, runs, *_):
  return block_decay(g, g, runs, runs, diagonal=True)


def forward(x: Chunked, s0, *, chunk: int, scale: float, dtype):
  """All chunks: the inverses and W, U in parallel, the state walk, then the outputs in
  parallel. Returns (o [B, Tp, H, Dv] float32, final state, residuals) with residuals =
  (T [N, B, H, C, C], the state entering every chunk [N, B, H, Dk, Dv])."""
  q, k, v, beta, g = (to_chunks(a, chunk) for a in (x.q, x.k, x.v, x.beta, x.gcum))
  masks = _masks(x, chunk)
  tinv = inverses(x, chunk, dtype)
  gq, omega, keep = _gates(x, chunk)
  w, u = _every_chunk(lambda *a: chunk_wy(*a, dtype=dtype), [tinv, k, v, beta, gq], [])
  final, delta, states = _walk(lambda *a: walk_forward(*a, dtype=dtype), s0,
                               (k, omega, keep, w, u))

  def out(q, k, g, gq, delta, state, runs, *_):
    p = scores(q, k, _decay(g, runs), dtype=dtype)
    return chunk_output(q, p, gq, delta, state, dtype=dtype)
  o = _every_chunk(out, [q, k, g, gq, delta, states], masks)
  return scale * from_chunks(o), final, (tinv, states)


def backward(x: Chunked, residuals, do, dfinal, *, chunk: int, scale: float, dtype):
  """Gradients from the cotangents of o [B, Tp, H, Dv] and of the final state: W and the
  within-chunk cotangents in parallel, the reverse walk for the state's cotangent, then every
  chunk's gradients in parallel. Returns (dq, dk, dv, dbeta, dgcum, ds0), float32."""
  tinv, states = residuals
  q, k, v, beta, g = (to_chunks(a, chunk) for a in (x.q, x.k, x.v, x.beta, x.gcum))
  do = to_chunks(scale * do.astype(jnp.float32), chunk)
  masks = _masks(x, chunk)
  gq, omega, keep = _gates(x, chunk)
  w = _every_chunk(lambda *a: chunk_w(*a, dtype=dtype), [tinv, k, beta, gq], [])
  dlocal = _every_chunk(
      lambda q, k, g, do, runs, *_: chunk_dlocal(scores(q, k, _decay(g, runs), dtype=dtype), do,
                                                 dtype=dtype), [q, k, g, do], masks)
  ds0, ddelta, dstates = _walk(lambda *a: walk_backward(*a, dtype=dtype),
                               dfinal.astype(jnp.float32),
                               (q, k, gq, omega, keep, w, dlocal, do), reverse=True)

  def local(q, k, v, beta, g, tinv, w, do, state, dstate, ddelta, runs, carry, tail):
    ctx = backward_setup(q, k, beta, g, tinv, w, runs, carry, tail)
    dv, partial = chunk_backward_block(ctx, v, do, state, dstate, ddelta, dtype=dtype)
    return (dv,) + chunk_backward_finish(ctx, partial, dtype=dtype)

  dv, dq, dk, dbeta, dg = _every_chunk(
      local, [q, k, v, beta, g, tinv, w, do, states, dstates, ddelta], masks)
  return (from_chunks(dq), from_chunks(dk), from_chunks(dv), from_chunks(dbeta),
          from_chunks(dg), ds0)
