"""Building attention mechanisms for tests: by hand (`build`) or at the tiny size every
registered mechanism is tested at (`tiny_model`), and which Pallas kernels a mechanism has;
a hybrid stack at that size (`tiny_mixed_model`, MIXED_PATTERN) and its blocks as one module
of the attention interface (`Stack`), so that the common oracles apply to it unchanged.

    module = build("linear", linear={"feature_map": "relu"}, num_kv_heads=2)

    config = tiny_model("routing")  # configs/base.py at d_model 64, 4 heads, routing's TINY
    module = registry.build(config.model.attention, d_model=64, num_heads=4, rngs=nnx.Rngs(0))

    stack = Stack(Transformer(tiny_mixed_model().model, rngs=nnx.Rngs(0)))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from effattn.attention import base, registry
from effattn.kernels import dispatch
from effattn.model import pattern as model_pattern
from effattn.ranges import ConfigError
from effattn.testing.configs import base_config

# The tiny model: head dim 16 (the smallest most kernels take), GQA in groups of two where the
# mechanism allows it.
D_MODEL = 64
NUM_HEADS = 4
PLATFORMS = ("gpu", "tpu")
# Head dims tried, smallest first, until every Pallas kernel of the mechanism takes one.
_KERNEL_HEAD_DIMS = (16, 32, 64, 128)
# Lightning, sliding-window MQA softmax and Gated DeltaNet in one stack, each with its own
# cache (Gated DeltaNet on its reference path, an entry's own impl: it compiles fastest).
MIXED_PATTERN = "lightning,softmax:window=4:num_kv_heads=1,gated_deltanet:impl=reference"


def attention_config(name: str, **fields) -> ml_collections.ConfigDict:
  """An attention config like configs/base.py builds, with `fields` overriding.

  Mechanism options go in a nested dict under the mechanism's name, e.g.
  attention_config("linear", linear={"feature_map": "relu"}).
  """
  cfg = {"name": name, "num_kv_heads": None, "head_dim": None, "window": None, "impl": "reference"}
  cfg.update(fields)
  return ml_collections.ConfigDict(cfg)


def build(name: str, *, d_model: int = 32, num_heads: int = 4, seed: int = 0, **fields):
  """The mechanism `name` on the reference path unless `impl=` says otherwise."""
  return registry.build(attention_config(name, **fields), d_model=d_model, num_heads=num_heads,
                        rngs=nnx.Rngs(seed))


def kernel_platforms(name: str) -> tuple[str, ...]:
  """The platforms ("gpu", "tpu") on which some op of mechanism `name` has a Pallas kernel that
  the interpreter can run (`dispatch.interpret_kernels(platform)` runs it on CPU)."""
  ops = registry.get(name).OPS
  return tuple(p for p in PLATFORMS if any(
      path.is_pallas and path.interpretable and path.platform == p
      for op in ops for path in dispatch.family(op).paths))


def tiny_model(name: str, config=None) -> ml_collections.ConfigDict:
  """A configs/base.py tree (`config`, else a fresh one) shrunk to the tiny model the mechanism
  suite runs: one attention-only layer of width D_MODEL with NUM_HEADS heads, mechanism `name`
  with its DEFAULTS updated by its TINY options, key/value heads shared in pairs where it
  honors num_kv_heads, and the smallest head dim its Pallas kernels take where the default is
  too small (on every platform it has kernels for)."""
  config = base_config() if config is None else config
  cls = registry.get(name)
  m = config.model
  m.d_model, m.num_heads, m.num_layers, m.mlp = D_MODEL, NUM_HEADS, 1, "none"
  attn = m.attention
  attn.name = name
  attn[name].update(cls.TINY)
  sizes = dict(d_model=D_MODEL, num_heads=NUM_HEADS, dtype="float32")
  if _accepts(cls, attn, sizes, num_kv_heads=NUM_HEADS // 2):
    attn.num_kv_heads = NUM_HEADS // 2
  head_dim = _kernel_head_dim(cls, attn, sizes)
  if head_dim != D_MODEL // NUM_HEADS:
    attn.head_dim = head_dim
  return config


def tiny_mixed_model(config=None, pattern: str = MIXED_PATTERN) -> ml_collections.ConfigDict:
  """The mechanism suite's tiny model (D_MODEL, NUM_HEADS, attention only) as a hybrid stack:
  one layer per entry of `pattern`, each entry with its mechanism's TINY options."""
  config = base_config() if config is None else config
  m = config.model
  m.d_model, m.num_heads, m.mlp = D_MODEL, NUM_HEADS, "none"
  m.pattern = pattern
  entries = model_pattern.parse(pattern)  # one period, counts expanded: a layer each
  m.num_layers = len(entries)
  for name in {entry.name for entry in entries}:
    m.attention[name].update(registry.get(name).TINY)
  return config


class Stack(nnx.Module):
  """The blocks of a model (norms, attention, residual; no embedding or head) as one module
  with the attention interface: x [B, T, d_model] -> (y, aux), init_cache / decode, so the
  common oracles (effattn/testing/oracles.py) check a hybrid stack as they check a mechanism.
  aux holds each term's mean over the layers that report it, as the Transformer's does."""

  def __init__(self, model):
    self.blocks = model.blocks  # the blocks alone: parameters outside them do not reach y

  def __call__(self, x, *, positions, segment_ids=None, causal=True, train=False):
    terms: dict[str, list] = {}
    for block in self.blocks:
      x, aux = block(x, positions=positions, segment_ids=segment_ids, causal=causal,
                     train=train)
      for key, value in aux.items():
        terms.setdefault(key, []).append(value)
    return x, {key: jnp.mean(jnp.stack(values)) for key, values in terms.items()}

  def init_cache(self, batch, max_len, dtype=None):
    return [block.attn.init_cache(batch, max_len, dtype) for block in self.blocks]

  def decode(self, x, *, positions, cache):
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache = block.decode(x, positions=positions, cache=layer_cache)
      new_cache.append(layer_cache)
    return x, new_cache


def _with(attn: ml_collections.ConfigDict, **fields) -> dict:
  cfg = attn.to_dict()
  cfg.update(fields)
  return cfg


def _accepts(cls, attn, sizes: dict, **fields) -> bool:
  cfg = _with(attn, **fields)
  try:
    cls.validate(cfg, base.Sizes.read(cfg, **sizes))
  except ConfigError:
    return False
  return True


def _kernel_head_dim(cls, attn, sizes: dict) -> int:
  """The default head dim, else the smallest one the mechanism honors and every one of its
  interpretable Pallas kernels takes (the default when none does: the suite then says so)."""
  default = D_MODEL // NUM_HEADS
  platforms = kernel_platforms(cls.registered_name)
  candidates = [default] + [d for d in _KERNEL_HEAD_DIMS if d > default]
  for head_dim in candidates:
    cfg = _with(attn, head_dim=None if head_dim == default else head_dim)
    if head_dim != default and not _accepts(cls, attn, sizes, head_dim=head_dim):
      continue
    s = base.Sizes.read(cfg, **sizes)
    shapes = cls.op_shapes(cls.validate(cfg, s), s)
    if all(_fits(f"pallas_{p}", op, cls.registered_name, shapes)
           for p in platforms for op in cls.OPS):
      return head_dim
  return default


def _fits(impl: str, op: str, mechanism: str, shapes: dict[str, Any]) -> bool:
  try:
    dispatch.check_forced_shapes(impl, op, mechanism, **shapes)
  except ConfigError:
    return False
  return True


@nnx.jit(static_argnames=("causal", "train"))
def _call(m, x, positions, segment_ids, causal, train):
  return m(x, positions=positions, segment_ids=segment_ids, causal=causal, train=train)


@nnx.jit
def _decode(m, x, positions, cache):
  return m.decode(x, positions=positions, cache=cache)


class Jitted:
  """A module with jit-compiled forward and decode (the same interface), for oracle loops.

  Ops choose their path when traced: a Jitted module traced outside `interpret_kernels` keeps
  the paths it chose there."""

  def __init__(self, module):
    self.module = module

  def __call__(self, x, *, positions, segment_ids=None, causal=True, train=False):
    return _call(self.module, x, positions, segment_ids, causal, train)

  def init_cache(self, batch, max_len, dtype=None):
    return self.module.init_cache(batch, max_len, dtype)

  def decode(self, x, *, positions, cache):
    return _decode(self.module, x, positions, cache)


def params_and_rest(module) -> tuple[Any, Any, Any]:
  """(graphdef, params, rest) of a module: what the trainer differentiates (nnx.Param) and
  what it carries (AttentionState and the rest)."""
  return nnx.split(module, nnx.Param, ...)


def perturb_params(module, scale: float = 0.05, seed: int = 0):
  """Adds scale * N(0, 1) to every nnx.Param of `module` in place (returns it): a point near
  init where zero-initialized parameters (a gate's scale) no longer hide the paths they
  multiply."""
  params = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(module, jax.tree.unflatten(treedef, [
      p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]))
  return module


def loss_terms(aux: dict) -> jax.Array | float:
  """The sum of a mechanism's `loss_*` aux terms (what the trainer adds to the loss)."""
  return sum(v for k, v in aux.items() if k.startswith("loss_"))
