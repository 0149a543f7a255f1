"""The chunked linear scan in plain jnp: the fast path on any backend and the kernels' blueprint.

The sequence is cut into chunks of C tokens. Inside a chunk the op is masked attention (two
matmuls with the decay matrix); across chunks a [Dk, Dv] state is carried by `lax.scan`. The
Pallas kernels compute exactly these per-chunk formulas (chunk_coefficients below), so this file
is also their readable specification.

Chunk-local notation: i, j in [0, C) token offsets, L = number of real tokens in the chunk (the
last chunk may be padded), g the head's log-decay. The carried state enters and leaves as

  causal   o_i += e^{g (i+1)} q_i S          S <- e^{g L} S + sum_j e^{g (L-1-j)} k_j^T v_j
  reverse  o_i += e^{g (L-1-i)} q_i S        S <- e^{g L} S + sum_j e^{g (j+1)}   k_j^T v_j

(the reverse weights are the causal ones mirrored), and inside the chunk
P_ij = (q_i . k_j) e^{g |i-j|} for j <= i (causal) or j >= i (reverse).

Packed sequences: `runs` [B, T] (non-decreasing run ids, reference.segment_runs). A chunk's
carried state belongs to the run at the chunk edge it came through ("edge": the token before the
chunk for causal, the token after it for reverse); token i reads it only if runs_i == edge, the
state survives the chunk only if the run at the far end still equals edge, and only tokens of
that far-end run are added to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunk_coefficients(g, length, chunk: int, reverse: bool):
  """Decay factors of one chunk, as the kernels compute them.

  Args:
    g: log-decay, scalar or [H] float32 (broadcast over the leading axes of the results).
    length: number of real tokens L in the chunk (scalar int, traced allowed).
    chunk: C.
    reverse: the anti-causal (transposed) direction.

  Returns:
    decay [..., C, C] (zero where masked or padded), w_q [..., C] (state -> query),
    w_k [..., C] (key -> next state), keep [...] (state -> next state), all float32.
  """
  g = jnp.asarray(g, jnp.float32)[..., None]
  i = jnp.arange(chunk)
  valid = i < length
  diff = i[:, None] - i[None, :]
  dist = -diff if reverse else diff
  # Exponents are clamped at 0 before exp so masked entries never overflow.
  decay = jnp.where((dist >= 0) & valid[None, :], jnp.exp(g[..., None] * jnp.maximum(dist, 0)), 0.)
  w_in = jnp.exp(g * (i + 1))                                             # e^{g (i+1)}
  w_out = jnp.where(valid, jnp.exp(g * jnp.maximum(length - 1 - i, 0)), 0.)  # e^{g (L-1-i)}
  w_q, w_k = (w_out, w_in * valid) if reverse else (w_in, w_out)
  keep = jnp.exp(g[..., 0] * length)
  return decay, w_q, w_k, keep


def chunk_edges(runs_c, reverse: bool):
  """[B, N, C] chunked run ids -> [B, N] run id of the state entering each chunk."""
  if reverse:
    # The state comes from the next chunk's first token; the last chunk's from the last token
    # (padding repeats the last real run id).
    return jnp.concatenate([runs_c[:, 1:, 0], runs_c[:, -1:, -1]], axis=1)
  return jnp.concatenate([runs_c[:, :1, 0], runs_c[:, :-1, -1]], axis=1)


def pad_to_chunks(x, chunk: int, value=0):
  """Pads axis 1 (T) up to a multiple of `chunk` with `value`."""
  t = x.shape[1]
  n = -(-t // chunk)
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, n * chunk - t)
  return jnp.pad(x, widths, constant_values=value)


def pad_runs(runs, chunk: int):
  """Pads run ids by repeating the last one, so padding never opens a new run."""
  t = runs.shape[1]
  n = -(-t // chunk)
  return jnp.concatenate([runs, jnp.repeat(runs[:, -1:], n * chunk - t, axis=1)], axis=1)


def _mm(spec, a, b):
  """einsum accumulating in f32. XLA:CPU has no bf16 x bf16 -> f32 dot, so upcast there."""
  if jax.default_backend() == "cpu" and a.dtype != jnp.float32:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def scan_chunked(q, k, v, log_decay, initial_state, runs=None, *, reverse: bool = False,
                 scale: float = 1.0, chunk_size: int = 64, out_dtype=None):
  """Chunked linear scan (causal or reverse direction; see reference.py for the math).

  Args:
    q, k: [B, T, H, Dk]; v: [B, T, H, Dv] (same dtype; matmuls run in it with f32 accumulation).
    log_decay: [H] float32, <= 0.
    initial_state: [B, H, Dk, Dv] float32.
    runs: [B, T] int32 non-decreasing run ids, or None for one sequence per row.
    reverse: anti-causal direction.
    scale: multiplies the output.
    chunk_size: C (any positive int; clipped to T).
    out_dtype: dtype of o (default q.dtype).

  Returns:
    (o [B, T, H, Dv], final_state [B, H, Dk, Dv] float32).
  """
  b, t, h, _ = q.shape
  c = max(1, min(chunk_size, t))
  n = -(-t // c)
  dt = q.dtype
  out_dtype = out_dtype or dt
  g = log_decay.astype(jnp.float32)

  def chunks(x):  # [B, T, ...] -> [N, B, C, ...]
    x = pad_to_chunks(x, c)
    return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

  lengths = jnp.minimum(c, t - jnp.arange(n) * c)
  xs = {"q": chunks(q), "k": chunks(k), "v": chunks(v), "length": lengths}
  if runs is not None:
    runs_c = pad_runs(runs, c).reshape(b, n, c)
    xs["runs"] = jnp.moveaxis(runs_c, 1, 0)                              # [N, B, C]
    xs["edge"] = jnp.moveaxis(chunk_edges(runs_c, reverse), 1, 0)        # [N, B]

  def body(state, x):
    decay, w_q, w_k, keep = chunk_coefficients(g, x["length"], c, reverse)  # [H, C, C], [H, C]
    w_q = jnp.broadcast_to(w_q.T[None], (b, c, h))                           # [B, C, H]
    w_k = jnp.broadcast_to(w_k.T[None], (b, c, h))
    keep = jnp.broadcast_to(keep[None], (b, h))
    scores = _mm("bihd,bjhd->bhij", x["q"], x["k"]) * decay[None]
    if runs is not None:
      r, edge = x["runs"], x["edge"]
      far = jnp.min(r, axis=1) if reverse else jnp.max(r, axis=1)            # run at the far end
      scores = scores * (r[:, :, None] == r[:, None, :])[:, None]
      w_q = w_q * (r == edge[:, None])[..., None]
      w_k = w_k * (r == far[:, None])[..., None]
      keep = keep * (far == edge)[:, None]
    o = _mm("bhij,bjhe->bihe", scores.astype(dt), x["v"])
    o = o + _mm("bihd,bhde->bihe", (x["q"] * w_q[..., None]).astype(dt), state.astype(dt))
    state = keep[..., None, None] * state + _mm(
        "bihd,bihe->bhde", (x["k"] * w_k[..., None]).astype(dt), x["v"])
    return state, (o * scale).astype(out_dtype)

  final, o = jax.lax.scan(body, initial_state.astype(jnp.float32), xs, reverse=reverse)
  o = jnp.moveaxis(o, 0, 1).reshape(b, n * c, h, v.shape[-1])[:, :t]
  return o, final
