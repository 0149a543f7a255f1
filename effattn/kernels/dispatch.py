"""One dispatcher for every op family: which path (`impl`) runs, and why.

Each family's api.py declares its paths once, in order of preference, with their limits:

    HEAD_DIM = dispatch.one_of("head_dim", (64, 128))
    FAMILY = dispatch.Family("block_sparse", (
        dispatch.Path("pallas_gpu", platform="gpu", limits=(HEAD_DIM,)),
        dispatch.Path("pallas_tpu", platform="tpu", limits=(HEAD_DIM,)),
        dispatch.Path("xla"),
        dispatch.Path("reference"),
    ))
    choice = FAMILY.choose(impl, interpret=interpret, head_dim=d)  # Choice(path, interpret)

Rules, the same for every family:
- `impl` is one word of one vocabulary (`impls()`): "auto", "pallas", or the name of a path of
  some family ("pallas_gpu", "pallas_tpu", "cudnn", "xla", "reference"). A new backend is one
  Path entry in its family's table; the vocabulary grows with it.
- "auto" takes the first path of the table that runs on this backend and whose limits allow
  the shapes. The choice and the reasons for skipping earlier paths are logged once
  (kernels/paths.py).
- "pallas" takes the first Pallas path of the table that can run here: a kernel of this
  backend, else (with interpret=True) any Pallas kernel in the interpreter.
- A forced path that cannot run raises one line naming why, and the path "auto" would run.
- Limits come in two kinds. `limits` are the kernel's contract, checked wherever it runs.
  `device_limits` are the hardware lowering's (Triton's 16-wide dots, Mosaic's 8-row tiles):
  checked on the device and under `interpret_kernels`, which stands in for the device, but not
  by a bare interpret=True call, since the interpreter has no such limit.
- `auto_limits` hold only where the dispatcher chooses ("auto", and "pallas" among its
  kernels): a path built but not yet checked on its device for some inputs (Mosaic GPU's
  window) stays out of "auto" while a call that names it runs it (so its device check can).

A mechanism that calls several ops has one impl (`model.attention.impl`); `op_impl` maps it to
each op: "auto", "xla" and "reference" reach every op as they are; a path an op has reaches it
as is ("pallas" reaches every op with a Pallas path); a path an op lacks means "auto" for that
op (impl="cudnn" on routing runs the local heads on cuDNN and the routed heads on auto).

Tests run a whole mechanism's Pallas path on CPU with

    with dispatch.interpret_kernels("gpu"):   # "auto" picks the GPU kernels, interpret=True
      y, aux = module(x, positions=positions)

and `dispatch.lower_for("gpu")` chooses as on a GPU without interpreting (to export a program
for a device this machine lacks). Both act when an op is traced: a jitted function traced
outside them keeps its paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, NamedTuple, Sequence

import jax

from effattn.kernels.paths import log_path_once
from effattn.ranges import ConfigError

PALLAS = "pallas"
AUTO = "auto"
# Paths every family has; a mechanism's impl reaches each of its ops unchanged for these.
UNIVERSAL = ("xla", "reference")
# The paths of today's families, so the vocabulary does not depend on which ops are imported.
_PATHS = ("pallas_gpu", "pallas_tpu", "cudnn") + UNIVERSAL
_PLATFORMS = ("gpu", "tpu")
_FAMILIES: dict[str, "Family"] = {}
# (platform, interpreted) that interpret_kernels / lower_for stand in for (innermost last).
_STAND_IN: list[tuple[str, bool]] = []


class PathError(ValueError):
  """A forced path cannot run these inputs here; the message says why and what would run."""


@dataclasses.dataclass(frozen=True)
class Limit:
  """A condition on some of an op's shapes: `why(**{k: shapes[k] for k in needs})` is "" when
  they fit, else the reason. Checked only when the caller gives every key in `needs`
  (config-time checks know the head dim but not the batch's segments)."""

  needs: tuple[str, ...]
  why: Callable[..., str]

  def check(self, shapes: dict) -> str:
    if any(k not in shapes for k in self.needs):
      return ""
    return self.why(**{k: shapes[k] for k in self.needs})


def one_of(key: str, values: Sequence) -> Limit:
  values = tuple(values)
  return Limit((key,), lambda **kw: "" if kw[key] in values else
               f"{key}={kw[key]} is not one of {values}")


def power_of_two(key: str, minimum: int) -> Limit:
  def why(**kw):
    x = kw[key]
    return "" if x >= minimum and not x & (x - 1) else (
        f"{key}={x} is not a power of two >= {minimum}")
  return Limit((key,), why)


def at_most(key: str, maximum: int, reason: str = "") -> Limit:
  return Limit((key,), lambda **kw: "" if kw[key] <= maximum else
               f"{key}={kw[key]} > {maximum}{f' ({reason})' if reason else ''}")


def multiple_of(key: str, factor: int) -> Limit:
  return Limit((key,), lambda **kw: "" if kw[key] % factor == 0 else
               f"{key}={kw[key]} is not a multiple of {factor}")


@dataclasses.dataclass(frozen=True)
class Path:
  """One implementation of an op.

  name: its `impl` word. platform: the backend it lowers for ("gpu" | "tpu"; None: any).
  interpretable: a Pallas kernel the Pallas interpreter can run off its device.
  limits / device_limits: see the module docstring. device: () -> "" or why this device cannot
  run it (e.g. a compute capability), checked on the device only. auto_limits: what "auto" and
  "pallas" apply on top of those, and naming the path does not: inputs it takes, built, but not
  yet checked on its device.
  """

  name: str
  platform: str | None = None
  limits: tuple[Limit, ...] = ()
  device_limits: tuple[Limit, ...] = ()
  device: Callable[[], str] | None = None
  interpretable: bool | None = None  # default: Pallas paths are
  auto_limits: tuple[Limit, ...] = ()

  def __post_init__(self):
    if self.name in (AUTO, PALLAS):
      raise ValueError(f"a path cannot be named {self.name!r}: it is an impl rule")
    if self.interpretable is None:
      object.__setattr__(self, "interpretable", self.is_pallas)

  @property
  def is_pallas(self) -> bool:
    return self.name.startswith("pallas_")


class Choice(NamedTuple):
  """The path an op runs and whether its Pallas kernel runs in the interpreter."""

  path: str
  interpret: bool


class Family:
  """An op's ordered table of paths; `choose` applies the rules of the module docstring."""

  def __init__(self, op: str, paths: Sequence[Path]):
    names = [p.name for p in paths]
    if len(set(names)) != len(names) or not set(UNIVERSAL) <= set(names):
      raise ValueError(f"{op}: paths {names} must be distinct and include {UNIVERSAL}")
    if op in _FAMILIES:
      raise ValueError(f"op family {op!r} is already declared")
    self.op = op
    self.paths = tuple(paths)
    _FAMILIES[op] = self

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(p.name for p in self.paths)

  def path(self, name: str) -> Path | None:
    return next((p for p in self.paths if p.name == name), None)

  # -- the rules ---------------------------------------------------------------------------

  def choose(self, impl: str, *, interpret: bool = False, **shapes) -> Choice:
    """The path `impl` selects for these shapes on this backend (logged once), or PathError."""
    if impl not in impls():
      raise PathError(f"{self.op} impl={impl!r} is not one of {impls()}")
    if impl == AUTO:
      choice, why = self._auto(shapes, interpret)
      log_path_once(self.op, choice.path, why)
      return choice
    candidates = self._forced_candidates(impl, interpret)
    reasons = []
    for path, bare_interpreter in candidates:
      why = self.why_not(path, shapes, bare_interpreter=bare_interpreter, chosen=impl == PALLAS)
      if not why:
        choice = Choice(path.name, self._interpreted(path, interpret))
        log_path_once(self.op, path.name, "forced, interpreted" if choice.interpret else "forced")
        return choice
      reasons.append(f"{path.name}: {why}" if impl == PALLAS else why)
    if not candidates:
      reasons.append(self._no_candidate(impl))
    fallback = self._auto(shapes, interpret)[0].path
    raise PathError(f"{self.op} impl={impl!r} cannot run: {'; '.join(reasons)}; "
                    f"impl='auto' would run {fallback}")

  def why_not(self, path: Path, shapes: dict, *, bare_interpreter: bool = False,
              chosen: bool = False) -> str:
    """"" when `path` runs these shapes here, else every reason it does not ("; "-joined).

    bare_interpreter: run a Pallas kernel in the interpreter off its device (interpret=True).
    chosen: the dispatcher picks the path ("auto", "pallas"), so its auto_limits hold too.
    """
    backend = jax.default_backend()
    native = path.platform in (None, backend)
    simulated = self._simulated(path)
    reasons = []
    if not (native or simulated or (bare_interpreter and path.interpretable)):
      hint = (" (interpret=True runs it in the Pallas interpreter; dispatch.lower_for"
              f"({path.platform!r}) lowers it for that platform)" if path.interpretable else "")
      reasons.append(f"backend is {backend}{hint}")
    limits = path.limits if bare_interpreter and not native else path.limits + path.device_limits
    limits += path.auto_limits if chosen else ()
    reasons += [r for r in (lim.check(shapes) for lim in limits) if r]
    if path.device is not None and not reasons:
      # A device check (a compute capability) needs the device: a stand-in cannot pass it.
      reasons += [r for r in ((path.device() if native else
                               f"its device check needs a real {path.platform}"),) if r]
    return "; ".join(reasons)

  def _auto(self, shapes: dict, interpret: bool) -> tuple[Choice, str]:
    skipped = []
    for path in self.paths:
      why = self.why_not(path, shapes, chosen=True)
      if not why:
        return Choice(path.name, self._interpreted(path, interpret)), "; ".join(skipped)
      skipped.append(f"{path.name}: {why}")
    raise AssertionError(f"{self.op}: no path runs ({'; '.join(skipped)})")  # xla always does

  def _simulated(self, path: Path) -> bool:
    """Whether interpret_kernels / lower_for make `path` count as running on its device."""
    if not _STAND_IN or path.platform is None or jax.default_backend() == path.platform:
      return False
    platform, interpreted = _STAND_IN[-1]
    return path.platform == platform and (path.interpretable or not interpreted)

  def _interpreted(self, path: Path, interpret: bool) -> bool:
    stand_in = self._simulated(path) and _STAND_IN[-1][1]
    return bool(path.interpretable and (interpret or stand_in))

  def _forced_candidates(self, impl: str, interpret: bool) -> list[tuple[Path, bool]]:
    """(path, runs in the bare interpreter) in the order a forced impl tries them."""
    if impl != PALLAS:
      path = self.path(impl)
      if path is None:
        return []
      native = path.platform in (None, jax.default_backend()) or self._simulated(path)
      return [(path, interpret and path.interpretable and not native)]
    pallas = [p for p in self.paths if p.is_pallas]
    here = [p for p in pallas
            if p.platform == jax.default_backend() or self._simulated(p)]
    elsewhere = [p for p in pallas if interpret and p.interpretable and p not in here]
    return [(p, False) for p in here] + [(p, True) for p in elsewhere]

  def _no_candidate(self, impl: str) -> str:
    if impl != PALLAS:
      return f"{self.op} has no {impl!r} path (its paths: {', '.join(self.names)})"
    if not any(p.is_pallas for p in self.paths):
      return f"{self.op} has no Pallas kernel"
    return (f"no Pallas kernel of {self.op} runs on backend {jax.default_backend()} "
            "(interpret=True runs one in the Pallas interpreter)")


def family(op: str) -> Family:
  if op not in _FAMILIES:
    raise ValueError(f"unknown op family {op!r}; declared: {sorted(_FAMILIES)}")
  return _FAMILIES[op]


def impls() -> tuple[str, ...]:
  """The impl vocabulary: auto, pallas, then the path names of every family (Pallas kernels
  first); a family that declares a new path (a new backend) adds its name."""
  names = set(_PATHS) | {p.name for fam in _FAMILIES.values() for p in fam.paths}
  pallas = sorted(n for n in names if n.startswith("pallas_"))
  rest = [n for n in ("cudnn",) + UNIVERSAL if n in names]
  others = sorted(names - set(pallas) - set(rest))
  return (AUTO, PALLAS, *pallas, *others, *rest)


@contextlib.contextmanager
def _standing_in(platform: str, interpreted: bool, what: str) -> Iterator[None]:
  if platform not in _PLATFORMS:
    raise ValueError(f"{what}({platform!r}): platform must be one of {_PLATFORMS}")
  _STAND_IN.append((platform, interpreted))
  try:
    yield
  finally:
    _STAND_IN.pop()


def interpret_kernels(platform: str) -> contextlib.AbstractContextManager[None]:
  """Test-only: within the block, "auto" and "pallas" off `platform` pick `platform`'s Pallas
  kernels and run them in the interpreter, with the device's limits; ops traced here only."""
  return _standing_in(platform, True, "interpret_kernels")


def lower_for(platform: str) -> contextlib.AbstractContextManager[None]:
  """Within the block, ops choose paths as on `platform` (its kernels, not interpreted): for
  exporting or lowering a program for a device this machine does not have (jax.export)."""
  return _standing_in(platform, False, "lower_for")


# -- a mechanism's impl and its ops --------------------------------------------------------------


def op_impl(impl: str, op: str) -> str:
  """The impl op `op` gets from a mechanism's `impl` (the rule of the module docstring)."""
  fam = family(op)
  if impl in (AUTO,) + UNIVERSAL or fam.path(impl) is not None:
    return impl
  if impl == PALLAS and any(p.is_pallas for p in fam.paths):
    return PALLAS
  return AUTO


def check_mechanism_impl(impl: str, ops: Sequence[str], mechanism: str) -> None:
  """ConfigError unless `impl` is a word of the vocabulary that some op of the mechanism has."""
  if impl not in impls():
    raise ConfigError(f"model.attention.impl={impl!r} is not one of {impls()}")
  if impl in (AUTO,) + UNIVERSAL:
    return
  if any(op_impl(impl, op) != AUTO for op in ops):
    return
  have = "; ".join(f"{op}: {', '.join(family(op).names)}" for op in ops)
  raise ConfigError(f"model.attention.impl={impl!r}: no op of {mechanism} has that path (its ops "
                    f"and paths: {have}); use auto, xla, reference or one of those")


def check_forced_shapes(impl: str, op: str, mechanism: str, **shapes) -> None:
  """Config-time check: ConfigError when the path `impl` forces on `op` cannot take these
  shapes on its device (whatever the machine validating the config is)."""
  forced = op_impl(impl, op)
  if forced == AUTO:
    return
  fam = family(op)
  paths = [p for p in fam.paths if p.is_pallas] if forced == PALLAS else [fam.path(forced)]
  reasons = []
  for path in paths:
    why = "; ".join(r for r in (lim.check(shapes) for lim in path.limits + path.device_limits)
                    if r)
    if not why:
      return
    reasons.append(f"{path.name}: {why}")
  raise ConfigError(f"model.attention.impl={impl!r}: {mechanism}'s {op} op cannot run it "
                    f"({'; '.join(reasons)}); use impl='auto'")
