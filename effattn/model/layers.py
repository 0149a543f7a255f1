"""Building blocks shared by every model: norms, the gated MLP, token and position embeddings."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in f32 and returned in the input dtype."""

  def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class GatedMLP(nnx.Module):
  """SwiGLU feed-forward: W_down(silu(W_gate x) * W_up x). [B, T, d] -> [B, T, d]."""

  def __init__(self, d_model: int, hidden: int, *, dtype: Any, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.gate = nnx.Linear(d_model, hidden, **kw)
    self.up = nnx.Linear(d_model, hidden, **kw)
    self.down = nnx.Linear(hidden, d_model, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Embed(nnx.Module):
  """Token embedding [V, d]; `attend` reuses it as a tied output projection."""

  def __init__(self, vocab_size: int, d_model: int, *, dtype: Any, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = nnx.Param(
        jax.random.normal(rngs.params(), (vocab_size, d_model), jnp.float32) * d_model ** -0.5)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return x @ self.embedding[...].astype(self.dtype).T


def default_mlp_hidden(d_model: int) -> int:
  """8/3 d rounded up to a multiple of 32: SwiGLU at the parameter count of a 4d MLP."""
  return -(-int(8 * d_model / 3) // 32) * 32
