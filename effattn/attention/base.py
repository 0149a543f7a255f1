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

from effattn import logical_axes
from effattn.kernels import dispatch
from effattn.ranges import ConfigError, Range

# Masks are the softmax op's; mechanisms reach them as base.attention_mask / base.sequence_index.
from effattn.kernels.softmax.common import attention_mask, sequence_index  # noqa: F401


class AttentionState(nnx.Variable):
  """Non-gradient state of a mechanism, updated inside the train step and checkpointed."""


# Shared fields of model.attention besides `impl`; None is each one's default ("derive it").
SHARED_FIELDS = ("num_kv_heads", "head_dim", "window")
_SHARED_RANGE = Range(1, integer=True, none_ok=True)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What a mechanism's validation sees besides its own options: the model's sizes, the shared
  fields as given (None: unset) and, at config time, the compute dtype and data.seq_len."""

  d_model: int
  num_heads: int
  head_dim: int  # the head dim in use (model.attention.head_dim or d_model / num_heads)
  num_kv_heads: int | None
  window: int | None
  impl: str = "auto"
  dtype: Any = None
  seq_len: int | None = None

  @classmethod
  def read(cls, cfg: Any, *, d_model: int, num_heads: int, dtype: Any = None,
           seq_len: int | None = None) -> "Sizes":
    """The shared fields of an attention config (a ConfigDict or a mapping), read once."""
    get = cfg.get if hasattr(cfg, "get") else (lambda key, default=None: default)
    head_dim = get("head_dim", None)
    return cls(d_model=d_model, num_heads=num_heads,
               head_dim=int(head_dim or d_model // num_heads),
               num_kv_heads=get("num_kv_heads", None), window=get("window", None),
               impl=get("impl", None) or "auto",
               dtype=None if dtype is None else jnp.dtype(dtype), seq_len=seq_len)

  def given(self, field: str) -> bool:
    """Whether shared `field` is set to something other than its default."""
    value = getattr(self, field)
    if field == "num_kv_heads":
      return value not in (None, self.num_heads)
    if field == "head_dim":
      return value != self.d_model // self.num_heads
    return value is not None


def check_power_of_two(field: str, value: int, minimum: int) -> None:
  """ConfigError naming `field` unless `value` is a power of two >= minimum (kernel tiles)."""
  if not isinstance(value, int) or value < minimum or value & (value - 1):
    raise ConfigError(f"{field}={value!r} must be a power of two >= {minimum}; try 64")


class Attention(nnx.Module):
  """Base class: reads the shared fields once and validates the mechanism's config.

  Subclasses implement `__call__`, `init_cache` and `decode` (see `AttentionModule`) and declare
  what they take: DEFAULTS (their options), OPS (the op families they call), SUPPORTS (the shared
  fields they honor), CHOICES / RANGES (allowed values of their options) and, for checks across
  fields, `check`. `validate_config` runs all of it against a whole config before anything runs.
  """

  registered_name: str = "?"
  # The mechanism's own options and their defaults; configs/base.py exposes them as
  # `model.attention.<name>.<option>` and `self.opts.<option>` reads them.
  DEFAULTS: dict[str, Any] = {}
  # The op families (effattn/kernels/<family>) the mechanism calls: `impl` must name a path
  # of one of them, and `self.op_impl(op)` is what each op gets (kernels/dispatch.py's rule).
  OPS: tuple[str, ...] = ()
  # The shared fields (SHARED_FIELDS) it honors; any other one set to a non-default value fails
  # naming the field and the mechanism (`supports` may depend on the options).
  SUPPORTS: tuple[str, ...] = ()
  # Allowed values of string options, and ranges (effattn.ranges) of numeric ones.
  CHOICES: dict[str, tuple] = {}
  RANGES: dict[str, Range] = {}
  # Causal by construction (model.causal=False fails at config time).
  CAUSAL_ONLY: bool = False
  # Runs with its tokens split over mesh.sequence (context parallelism,
  # kernels/context_parallel.py): every op it calls has a context-parallel path and nothing else
  # in it depends on token order. "causal": with model.causal=True only. `context_parallel` may
  # refuse more options.
  CONTEXT_PARALLEL: bool | str = False
  # Options for the tiny test model (d_model 64, 4 heads, T = 32) where DEFAULTS would not
  # exercise the mechanism there (blocks or windows longer than T); the mechanism suite
  # (tests/attention/test_mechanisms.py) builds every registered mechanism with them.
  TINY: dict[str, Any] = {}

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
    sizes = Sizes.read(cfg, d_model=d_model, num_heads=num_heads, dtype=dtype)
    self.opts = type(self).validate(cfg, sizes)
    self.sizes = sizes
    self.d_model = d_model
    self.num_heads = num_heads
    self.head_dim = sizes.head_dim
    self.num_kv_heads = int(sizes.num_kv_heads or num_heads)  # read only where supported
    self.window = sizes.window
    self.impl = sizes.impl
    self.layer_idx = layer_idx
    self.num_layers = num_layers
    self.dtype = dtype
    self.rope_theta = rope_theta

  def op_impl(self, op: str) -> str:
    """The impl op family `op` runs with under this mechanism's `impl`."""
    return dispatch.op_impl(self.impl, op)

  def attention_weights(self, x, *, positions, segment_ids=None, causal=True):
    """The weight a_ij of every key j in every query i's output, float32 [B, H, T, T] (0 where
    j is masked), from the mechanism's own score definition: o_i = sum_j a_ij v_j. For analysis
    at small T (O(T^2) memory; evaluate/entropy.py). x: [B, T, d_model] (the layer's input).

    Mechanisms that define one: softmax (and GQA / a window), linear (phi(q_i) . phi(k_j) over
    its normalizer), mala (its magnitude-aware scores, which may be negative). The others do
    not form them (a recurrent state, a memory, routed or landmark-gated groups): a request for
    theirs is refused in one line."""
    del x, positions, segment_ids, causal
    raise ValueError(
        f"{self.registered_name} does not expose its attention weights; the mechanisms that do: "
        "softmax, linear, mala (the entropy eval leaves the others' layers out)")

  # -- what the mechanism supports -----------------------------------------------------------

  @classmethod
  def supports(cls, field: str, opts) -> bool:
    """Whether shared `field` means something for these options."""
    del opts
    return field in cls.SUPPORTS

  @classmethod
  def query_heads(cls, opts, num_heads: int, num_kv_heads: int | None) -> int:
    """The query heads the key/value heads are shared by (SQA has fewer than the model)."""
    del opts, num_kv_heads
    return num_heads

  @classmethod
  def context_parallel(cls, opts, sizes: Sizes, causal: bool) -> str:
    """"" when these options run with mesh.sequence > 1, else why not (a config-time check)."""
    del opts, sizes
    if not cls.CONTEXT_PARALLEL:
      return "it has no context-parallel path"
    if cls.CONTEXT_PARALLEL == "causal" and not causal:
      return "its bidirectional form has no cross-device path"
    return ""

  @classmethod
  def check_context_parallel(cls, opts, sizes: Sizes, causal: bool, sequence: int) -> None:
    """ConfigError naming the mechanism and mesh.sequence when it cannot run with T split over
    `sequence` devices (checked at config time, and again where a model is traced)."""
    why_not = cls.context_parallel(opts, sizes, causal) if sequence > 1 else ""
    if why_not:
      raise ConfigError(f"mesh.sequence={sequence}: {cls.registered_name} cannot run "
                        f"context-parallel ({why_not}); set mesh.sequence=1 or pick a mechanism "
                        "that can (docs/scaling.md)")

  @classmethod
  def check(cls, opts, sizes: Sizes) -> None:
    """The mechanism's checks across its options and the sizes; ConfigError naming the field."""

  @classmethod
  def op_shapes(cls, opts, sizes: Sizes) -> dict[str, Any]:
    """The shapes its ops see (keys of the dispatcher's limits), for config-time checks of a
    forced impl."""
    del opts
    return {"head_dim": sizes.head_dim, "Dk": sizes.head_dim, "Dv": sizes.head_dim,
            "dtype": sizes.dtype}

  @classmethod
  def validate(cls, cfg: Any, sizes: Sizes):
    """Checks the shared fields, impl and the options; returns the options (frozen)."""
    name = cls.registered_name
    opts = mechanism_options(cfg, name, cls.DEFAULTS)
    for field in SHARED_FIELDS:
      _SHARED_RANGE.check(f"model.attention.{field}", getattr(sizes, field))
    for field in SHARED_FIELDS:
      if sizes.given(field) and not cls.supports(field, opts):
        honored = [f for f in SHARED_FIELDS if cls.supports(f, opts)]
        raise ConfigError(f"model.attention.{field}={getattr(sizes, field)!r} is not supported "
                          f"by {name} (it honors {', '.join(honored) or 'none of them'}); "
                          "leave it unset")
    kv = sizes.num_kv_heads
    if kv is not None and cls.supports("num_kv_heads", opts):
      heads = cls.query_heads(opts, sizes.num_heads, kv)
      if heads % kv:
        raise ConfigError(f"model.attention.num_kv_heads={kv} must divide the {heads} query "
                          f"heads (model.num_heads={sizes.num_heads})")
    dispatch.check_mechanism_impl(sizes.impl, cls.OPS, name)
    for field, choices in cls.CHOICES.items():
      if getattr(opts, field) not in choices:
        raise ConfigError(f"model.attention.{name}.{field}={getattr(opts, field)!r} must be one "
                          f"of {choices}")
    for field, allowed in cls.RANGES.items():
      allowed.check(f"model.attention.{name}.{field}", getattr(opts, field))
    cls.check(opts, sizes)
    return opts

  @classmethod
  def validate_config(cls, config, attention: Any = None) -> None:
    """Config-time validation against the whole config: model sizes, dtype, data.seq_len, and
    whether a forced impl's kernels take this model's shapes (on their device). `attention` is
    the attention config to check: config.model.attention, or one entry of model.pattern's."""
    m = config.model
    attention = m.attention if attention is None else attention
    if cls.CAUSAL_ONLY and not m.causal:
      raise ConfigError(f"model.causal=False: {cls.registered_name} is causal by construction; "
                        "set model.causal=True or pick another mechanism")
    sizes = Sizes.read(attention, d_model=m.d_model, num_heads=m.num_heads, dtype=m.dtype,
                       seq_len=config.data.seq_len)
    opts = cls.validate(attention, sizes)
    cls.check_context_parallel(opts, sizes, m.causal, config.mesh.get("sequence", 1))
    shapes = cls.op_shapes(opts, sizes)
    for op in cls.OPS:
      dispatch.check_forced_shapes(sizes.impl, op, cls.registered_name, **shapes)


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
    raise ConfigError(f"unknown option(s) {unknown} in model.attention.{name}; "
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


def fallback_aux(op: str, *fracs) -> dict[str, jax.Array]:
  """The aux entry `<op>_fallback_frac` of the runtime fallbacks an op reported (ops called
  with return_fallback_frac=True; None: the path taken has none): the largest fraction of batch
  rows that took one, or {} when no path could fall back. The trainer logs it as aux/<key>."""
  fracs = [f for f in fracs if f is not None]
  if not fracs:
    return {}
  return {f"{op}_fallback_frac": functools.reduce(jnp.maximum, fracs)}


# Logical names of a projection's kernel [d_in, d_out] (effattn/logical_axes.py): Megatron's
# column-parallel q / k / v (and other per-head projections of x) split their output heads,
# the row-parallel output projection its input heads; `head_dim` makes the split whole heads.
COLUMNS = ("embed", "heads")
KV_COLUMNS = ("embed", "kv_heads")
ROWS = ("heads", "embed")
FUSED = ("embed", None)  # q | k | v (or gates) side by side: only the d_model rows split


def dense(d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype: Any, use_bias: bool = False,
          scale: float = 1.0, axes: tuple | None = None, head_dim: int | None = None
          ) -> nnx.Linear:
  """A bias-free projection with f32 params and `dtype` compute (mixed precision).

  axes: the logical names of the kernel's (input, output) dims (COLUMNS, KV_COLUMNS, ROWS,
  FUSED); None leaves it unnamed (the fallback rule of logical_axes). head_dim: the features
  per head of a `*heads` dim."""
  kernel_init = nnx.initializers.variance_scaling(scale, "fan_in", "normal")
  bias_init = nnx.initializers.zeros_init()
  if axes is not None:
    kernel_init = logical_axes.init(kernel_init, axes, head_dim=head_dim)
    bias_init = logical_axes.init(bias_init, axes[1:], head_dim=head_dim)
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)


def qkvo_projections(d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                     rngs: nnx.Rngs, dtype: Any) -> tuple[nnx.Linear, ...]:
  """The q [d_model -> H*D], k, v [d_model -> H_kv*D] and o [H*D -> d_model] projections of
  multi-head attention, made in that order (the order their kernels draw from `rngs`)."""
  cols = dict(rngs=rngs, dtype=dtype, head_dim=head_dim)
  return (dense(d_model, num_heads * head_dim, axes=COLUMNS, **cols),
          dense(d_model, num_kv_heads * head_dim, axes=KV_COLUMNS, **cols),
          dense(d_model, num_kv_heads * head_dim, axes=KV_COLUMNS, **cols),
          dense(num_heads * head_dim, d_model, axes=ROWS, **cols))


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, T, H*D] -> [B, T, H, D], heads over the mesh's tensor axis when the trainer's rules
  are on (logical_axes.HEADS; the split kernels/mesh.py gives a kernel's heads)."""
  x = x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)
  return logical_axes.constrain(x, logical_axes.HEADS) if x.ndim == 4 else x


def merge_heads(x: jax.Array) -> jax.Array:
  """[B, T, H, D] -> [B, T, H*D] (heads kept where they are: the input of a row-parallel
  output projection)."""
  if x.ndim == 4:
    x = logical_axes.constrain(x, logical_axes.HEADS)
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
