"""What every chunked path of the delta rule shares: padding, chunk-local gates, segment masks.

The api pads T up to a multiple of the chunk C with tokens that change nothing (q = k = v = 0,
b = 0, g = 0: a padded token writes no delta and decays nothing) and hands every path one
`Chunked` record. Per-token arrays stay in the [B, Tp, H, ...] layout of the inputs.

Segment masks (packed sequences; None without segment_ids), per token on the padded axis:
  runs   int32 run index (reference.segment_runs; padding repeats the last run)
  carry  1.0 where the token is in the run of the state entering its chunk (the run of the token
         before the chunk; chunk 0: the first token's run, which owns the initial state)
  tail   1.0 where the token is in the run of its chunk's last token (the run whose state
         leaves the chunk)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from effattn.kernels.linear_scan.reference import segment_runs
from effattn.kernels.linear_scan.xla import chunk_edges, pad_runs, pad_to_chunks


class Chunked(NamedTuple):
  """Padded inputs of one call: q, k [B, Tp, H, Dk], v [B, Tp, H, Dv] (input dtype); beta and
  gcum [B, Tp, H] float32 (gcum: log gates summed from the start of each chunk); runs, carry,
  tail [B, Tp] or None (module docstring)."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  beta: jax.Array
  gcum: jax.Array
  runs: jax.Array | None
  carry: jax.Array | None
  tail: jax.Array | None


def chunk_cumsum(x: jax.Array, chunk: int) -> jax.Array:
  """[B, Tp, H] -> the cumulative sum along T restarted at every chunk (float32)."""
  b, padded, h = x.shape
  x = x.astype(jnp.float32).reshape(b, padded // chunk, chunk, h)
  return jnp.cumsum(x, axis=2).reshape(b, padded, h)


def segment_masks(segment_ids: jax.Array, chunk: int):
  """[B, T] segment ids -> (runs int32, carry f32, tail f32), each [B, Tp]."""
  runs = pad_runs(segment_runs(segment_ids), chunk)
  b, padded = runs.shape
  runs_c = runs.reshape(b, padded // chunk, chunk)
  carry = runs_c == chunk_edges(runs_c, reverse=False)[..., None]
  tail = runs_c == runs_c[..., -1:]
  flat = lambda m: m.reshape(b, padded).astype(jnp.float32)
  return runs, flat(carry), flat(tail)


def prepare(q, k, v, log_gate, beta, segment_ids, chunk: int) -> Chunked:
  """Pads every input to a multiple of `chunk` and builds the chunk-local gates and masks."""
  pad = lambda x: pad_to_chunks(x, chunk)
  masks = (None,) * 3 if segment_ids is None else segment_masks(segment_ids, chunk)
  return Chunked(pad(q), pad(k), pad(v), pad(beta.astype(jnp.float32)),
                 chunk_cumsum(pad(log_gate), chunk), *masks)
