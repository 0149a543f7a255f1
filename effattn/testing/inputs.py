"""Random inputs shared by the tests: seeded by a case's name, so every worker draws the same."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np


def case_key(name: str) -> jax.Array:
  """A PRNG key derived from a test case's name (stable across processes, unlike hash())."""
  return jax.random.key(zlib.crc32(name.encode()))


def random_inputs(batch: int = 2, length: int = 12, d_model: int = 32, seed: int = 1):
  """x [B, T, d_model] float32 ~ N(0, 1) and positions [B, T] = 0..T-1 int32."""
  x = jax.random.normal(jax.random.key(seed), (batch, length, d_model), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return x, positions


def two_segments(b: int, t: int, cut: int) -> jax.Array:
  """segment_ids [B, T]: row 0 is [1]*cut + [2]*(t-cut), the other rows one segment (a batch
  that mixes packed and unpacked rows)."""
  seg = np.ones((b, t), np.int32)
  seg[0, cut:] = 2
  return jnp.asarray(seg)
