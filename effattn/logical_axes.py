"""Logical axis names of parameters and activations, and the rule table that maps them to mesh axes.

Every parameter of the model names what each of its dimensions is (flax's `out_sharding`
variable metadata, as `nnx.with_partitioning` sets it), and the residual stream and the
attention heads are constrained by name where a block begins and ends:

    kernel = nnx.Linear(d, h * hd, kernel_init=logical_axes.init(base_init, ("embed", "heads"),
                                                                 head_dim=hd), ...)
    x = logical_axes.constrain(x, ("act_batch", "act_length", "act_embed"))

`config.mesh.rules` (configs/base.py) is the table from names to mesh axes, as MaxText's
`logical_axis_rules`: (logical name, mesh axis | tuple of mesh axes | None) pairs. A dimension
takes the first rule for its name whose mesh axes

  - all exist on the mesh with size > 1 (axes of size 1 are dropped from a tuple first; a rule
    left with none is passed over, so the next rule for the name can apply),
  - are not used by an earlier dimension of the same array, and
  - divide the dimension in whole units: a `*heads` dimension of a parameter holds H heads of
    `head_dim` features each and splits only between heads (H, not H x head_dim, must divide),
    so a GQA group or the one kv head of MQA is never cut.

A rule whose axes are None ends the search: the dimension stays whole (replicated). So does a
dimension no rule fits. A dimension named None is whole.

Parameters with no names (a mechanism's extras it did not name: gates, convolutions, memory
weights, routing centroids) keep the rule that came before the table: their largest dimension
that divides by the fsdp size is split over `fsdp`, nothing over `tensor`
(`fallback_spec`, effattn/train/sharding.py).

Activation constraints apply only while the trainer's context is on (`use_rules`, entered by
train/sharding.py's `ambient` on a mesh of more than one device, with `jax.set_mesh`). Without
it `constrain` returns its input itself, so the one-device program is the one without this
module. The rules are read when a function is traced: a jitted function keeps the constraints
it was traced with.

The names (configs/base.py's table maps them):

  parameters   vocab (token rows, LM-head columns), embed (d_model), heads (H x head_dim of the
               query-like projections: q, gates of the attention output, the output
               projection's rows), kv_heads (H_kv x head_dim of k and v), mlp (the MLP hidden
               width), norm (norm scales)
  activations  act_batch, act_length, act_embed ([B, T, d_model] at block boundaries),
               act_heads ([B, T, H, D] inside attention, as kernels/mesh.py splits heads),
               act_mlp ([B, T, F] between the MLP's up and down projections), act_vocab
               (logits [B, T, V], and the rows of the embedding table where it is looked up)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Sequence

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from effattn.ranges import ConfigError

Rules = tuple[tuple[str, Any], ...]

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("effattn_logical_rules",
                                                                      default=None)


def metadata(names: Sequence[str | None], head_dim: int | None = None) -> dict[str, Any]:
  """The variable metadata of a parameter whose dims are `names`: flax's `out_sharding` and, for
  `*heads` dims, their unit (`head_dim` features per head). eager_sharding=False: the value is
  placed by the trainer (param_shardings), never when the module is built."""
  names = tuple(names)
  units = tuple(head_dim if head_dim and name and name.endswith("heads") else 1 for name in names)
  return {"out_sharding": names, "shard_units": units, "eager_sharding": False}


def init(initializer: Callable, names: Sequence[str | None], *,
         head_dim: int | None = None) -> Callable:
  """`initializer` (for nnx.Linear's kernel_init / bias_init) whose parameter carries `names`."""
  return nnx.with_partitioning(initializer, tuple(names), **{
      k: v for k, v in metadata(names, head_dim).items() if k != "out_sharding"})


def param(value: jax.Array, names: Sequence[str | None], *,
          head_dim: int | None = None) -> nnx.Param:
  """An nnx.Param holding `value` whose dims are `names`."""
  return nnx.Param(value, **metadata(names, head_dim))


def names_of(variable: nnx.Variable) -> tuple[tuple, tuple] | None:
  """(names, units) of an annotated variable, None for one without names."""
  meta = variable.get_metadata()
  names = meta.get("out_sharding")
  if not names:
    return None
  return tuple(names), tuple(meta.get("shard_units") or (1,) * len(names))


def check_rules(rules, mesh_axes: Sequence[str]) -> Rules:
  """The table as tuples (config.json gives lists); ConfigError naming a malformed entry."""
  table = []
  for entry in rules:
    if (not isinstance(entry, (list, tuple)) or len(entry) != 2
        or not isinstance(entry[0], str)):
      raise ConfigError(f"mesh.rules entry {entry!r} must be a (logical name, mesh axis or tuple "
                        "of mesh axes or None) pair")
    name, axes = entry
    if axes is not None:
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      unknown = [a for a in axes if a not in mesh_axes]
      if unknown or not axes:
        raise ConfigError(f"mesh.rules entry {tuple(entry)!r} names mesh axis "
                          f"{unknown[0] if unknown else '()'!r}; the mesh has "
                          f"{', '.join(mesh_axes)} (None keeps the dimension whole)")
    table.append((name, axes))
  return tuple(table)


def spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules,
         axis_sizes: dict[str, int], units: Sequence[int] | None = None) -> P:
  """The PartitionSpec the rules give an array of `shape` whose dims are `names` on a mesh of
  `axis_sizes` (its axes that may be split over). The module docstring has the rule."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match an array of shape "
                     f"{tuple(shape)}")
  units = tuple(units) if units is not None else (1,) * len(shape)
  used: set[str] = set()
  dims = []
  for name, size, unit in zip(names, shape, units):
    dims.append(None)
    if name is None:
      continue
    for logical, axes in rules:
      if logical != name:
        continue
      if axes is None:
        break
      axes = (axes,) if isinstance(axes, str) else axes
      axes = tuple(a for a in axes if axis_sizes.get(a, 1) > 1)
      n = math.prod(axis_sizes[a] for a in axes)
      if not axes or used.intersection(axes) or size % unit or (size // unit) % n:
        continue
      used.update(axes)
      dims[-1] = axes[0] if len(axes) == 1 else axes
      break
  return P(*dims)


@contextlib.contextmanager
def use_rules(rules: Rules):
  """Activations traced inside are constrained by `rules` on the ambient mesh (jax.set_mesh)."""
  token = _RULES.set(tuple(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def current_rules() -> Rules | None:
  return _RULES.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """x laid out as the rules place `names` on the ambient mesh; x itself outside `use_rules`
  or without a mesh. Axes an enclosing shard_map made manual are left alone."""
  rules = _RULES.get()
  if rules is None:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  manual = set(getattr(mesh, "manual_axes", ()))
  free = {a: n for a, n in mesh.shape.items() if a not in manual}
  if all(n == 1 for n in free.values()):
    return x
  return jax.lax.with_sharding_constraint(x, spec(names, x.shape, rules, free))


# The layouts constrained in the model.
RESIDUAL = ("act_batch", "act_length", "act_embed")  # [B, T, d_model]
HEADS = ("act_batch", "act_length", "act_heads", None)  # [B, T, H, D]
MLP_HIDDEN = ("act_batch", "act_length", "act_mlp")  # [B, T, F]
LOGITS = ("act_batch", "act_length", "act_vocab")  # [B, T, V]
