"""Building blocks shared by every model: norms, the gated MLP, token and position embeddings."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from effattn import logical_axes


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in f32 and returned in the input dtype."""

  def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale = logical_axes.param(jnp.ones((dim,), jnp.float32), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class GatedMLP(nnx.Module):
  """SwiGLU feed-forward: W_down(silu(W_gate x) * W_up x). [B, T, d] -> [B, T, d].

  Megatron's layout under the trainer's rules: gate and up split their hidden columns
  ("mlp"), down its hidden rows, so the hidden [B, T, F] never leaves its shard and only the
  output is summed over the tensor axis."""

  def __init__(self, d_model: int, hidden: int, *, dtype: Any, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    init = nnx.initializers.lecun_normal()  # nnx.Linear's default, named
    columns = logical_axes.init(init, ("embed", "mlp"))
    self.gate = nnx.Linear(d_model, hidden, kernel_init=columns, **kw)
    self.up = nnx.Linear(d_model, hidden, kernel_init=columns, **kw)
    self.down = nnx.Linear(hidden, d_model, kernel_init=logical_axes.init(init, ("mlp", "embed")),
                           **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = jax.nn.silu(self.gate(x)) * self.up(x)
    return self.down(logical_axes.constrain(hidden, logical_axes.MLP_HIDDEN))


class Embed(nnx.Module):
  """Token embedding [V, d]; `attend` reuses it as a tied output projection.

  rows: the logical name of the table's rows ("vocab"; None for learned positions)."""

  def __init__(self, vocab_size: int, d_model: int, *, dtype: Any, rngs: nnx.Rngs,
               rows: str | None = "vocab"):
    self.dtype = dtype
    # Where it is looked up the table keeps its rows' split (a vocab-parallel lookup) and is
    # whole over d_model.
    self.lookup_axes = ("act_vocab" if rows == "vocab" else None, None)
    self.embedding = logical_axes.param(
        jax.random.normal(rngs.params(), (vocab_size, d_model), jnp.float32) * d_model ** -0.5,
        (rows, "embed"))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    # Under the trainer's rules the lookup is vocab-parallel: each tensor shard looks up its
    # rows of the table, gathered whole over d_model (FSDP), and the results are summed. Left
    # to itself XLA kept d_model split over fsdp, then rematerialized the whole lookup output
    # to split its batch over fsdp.
    table = logical_axes.constrain(self.embedding[...], self.lookup_axes)
    return jnp.take(table, tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return x @ self.embedding[...].astype(self.dtype).T


def default_mlp_hidden(d_model: int) -> int:
  """8/3 d rounded up to a multiple of 32: SwiGLU at the parameter count of a 4d MLP."""
  return -(-int(8 * d_model / 3) // 32) * 32
