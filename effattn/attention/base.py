"""The attention interface every mechanism implements, and the pieces they share.

A mechanism is an `nnx.Module` registered by name (see registry.py) and built as

    attn = registry.build(cfg, d_model=..., num_heads=..., rngs=..., layer_idx=..., ...)

Training / full-sequence call:

    y, aux = attn(x, positions=positions, segment_ids=segment_ids, causal=True, train=False)

  x, y: [B, T, d_model]; positions: [B, T] int32 (position of each token inside its segment,
  used by RoPE); segment_ids: [B, T] int32 or None (0 = padding, tokens attend only inside their
  own segment); aux: dict of scalars. Keys starting with `loss_` are already weighted by the
  mechanism's config and the trainer adds them to the loss; every key is logged.

Decoding (prefill of a prompt, then one token at a time):

    cache = attn.init_cache(batch, max_len, dtype)
    y, cache = attn.decode(x, positions=positions, cache=cache)

  x: [B, T, d_model] with T >= 1 new tokens that follow the ones already in `cache`. Decoding a
  sequence in any split equals the causal full forward pass (the decode oracle).

Static attributes of a module (anything that is not an nnx.Variable) become part of the nnx
GraphDef, which jit uses as a cache key: they must be hashable. Keep ints, floats, strings,
tuples and `self.opts` (frozen); never store the ConfigDict itself.

Non-gradient state (routing centroids, memory carried across segments) lives in variables of the
kind `AttentionState`: the trainer differentiates only `nnx.Param` and checkpoints everything.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from effattn.kernels import dispatch
# Masks are the softmax op's; mechanisms reach them as base.attention_mask / base.sequence_index.
from effattn.kernels.softmax.common import attention_mask, sequence_index  # noqa: F401


class AttentionState(nnx.Variable):
  """Non-gradient state of a mechanism, updated inside the train step and checkpointed."""


class Attention(nnx.Module):
  """Base class: stores the shared sizes and validates them once.

  Subclasses implement `__call__`, `init_cache` and `decode` (see `AttentionModule`).
  """

  registered_name: str = "?"
  # The mechanism's own options and their defaults; configs/base.py exposes them as
  # `model.attention.<name>.<option>` and `self.opts.<option>` reads them.
  DEFAULTS: dict[str, Any] = {}
  # The op families (effattn/kernels/<family>) the mechanism calls: `impl` must name a path
  # of one of them, and `self.op_impl(op)` is what each op gets (kernels/dispatch.py's rule).
  OPS: tuple[str, ...] = ()

  def __init__(
      self,
      cfg: Any,
      *,
      d_model: int,
      num_heads: int,
      rngs: nnx.Rngs,
      layer_idx: int = 0,
      num_layers: int = 1,
      dtype: Any = jnp.float32,
      rope_theta: float | None = 10000.0,
  ):
    del rngs
    if num_heads <= 0 or d_model % num_heads:
      raise ValueError(
          f"model.num_heads={num_heads} must divide model.d_model={d_model}; pick a divisor"
      )
    self.opts = mechanism_options(cfg, type(self).registered_name, type(self).DEFAULTS)
    self.d_model = d_model
    self.num_heads = num_heads
    head_dim = cfg.get("head_dim", None) if hasattr(cfg, "get") else None
    self.head_dim = int(head_dim or d_model // num_heads)
    self.layer_idx = layer_idx
    self.num_layers = num_layers
    self.dtype = dtype
    self.rope_theta = rope_theta
    self.impl = cfg.get("impl", "auto") if hasattr(cfg, "get") else "auto"
    dispatch.check_mechanism_impl(self.impl, type(self).OPS, type(self).registered_name)

  def op_impl(self, op: str) -> str:
    """The impl op family `op` runs with under this mechanism's `impl`."""
    return dispatch.op_impl(self.impl, op)


def _frozen(value: Any) -> Any:
  return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def mechanism_options(cfg: Any, name: str, defaults: dict[str, Any]):
  """Merges `cfg.<name>` over `defaults` into a frozen, hashable record (attribute access).

  Unknown option names fail naming the field.
  """
  given = {}
  if hasattr(cfg, "get") and cfg.get(name) is not None:
    section = cfg.get(name)
    given = dict(section.items()) if hasattr(section, "items") else dict(section)
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} in model.attention.{name}; "
                     f"known: {sorted(defaults)}")
  merged = {k: _frozen(v) for k, v in {**defaults, **given}.items()}
  return _options_class(name, tuple(merged))(**merged)


@functools.lru_cache(maxsize=None)
def _options_class(name: str, fields: tuple[str, ...]) -> type:
  # One class per field set, so equal options compare (and hash) equal across modules.
  return dataclasses.make_dataclass(f"{name}_options", list(fields), frozen=True)


class AttentionModule(Protocol):
  """What the model relies on; every registered mechanism satisfies it."""

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               causal: bool = True, train: bool = False) -> tuple[jax.Array, dict]: ...

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Any: ...

  def decode(self, x: jax.Array, *, positions: jax.Array, cache: Any) -> tuple[jax.Array, Any]: ...


def dense(d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype: Any, use_bias: bool = False,
          scale: float = 1.0) -> nnx.Linear:
  """A bias-free projection with f32 params and `dtype` compute (mixed precision)."""
  return nnx.Linear(
      d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nnx.initializers.variance_scaling(scale, "fan_in", "normal"), rngs=rngs)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, T, H*D] -> [B, T, H, D]."""
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
  """[B, T, H, D] -> [B, T, H*D]."""
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def repeat_kv(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, T, H_kv, D] -> [B, T, H, D]: each key/value head serves H / H_kv query heads."""
  return jnp.repeat(x, num_heads // x.shape[2], axis=2)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (half-split layout). x: [B, T, H, D], positions: [B, T]."""
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {d}; set model.position='learned'")
  freqs = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  angles = positions.astype(jnp.float32)[..., None, None] * freqs  # [B, T, 1, D/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
