"""Which custom kernels a computation really contains, read from its lowered or compiled text.

A benchmark row or a test that claims "our kernel ran" reads it here, from the program XLA is
given or runs, not from the function that was called: XLA drops a kernel whose outputs nothing
uses (a fwd+bwd timed through the gradients alone lost its forward kernel: 3 kernels compiled
instead of 4), and a dispatcher may fall back to another path.

Two text forms are read, one instruction per line:
  StableHLO  `jax.jit(f).lower(*args).as_text()` (or an export's `mlir_module()`):
             `stablehlo.custom_call @TARGET(...) {... name = "linear_scan" ...}`
  HLO        `jax.jit(f).lower(*args).compile().as_text()`, `lowered.as_text(dialect="hlo")`:
             `custom-call(...), custom_call_target="TARGET", ...,
              metadata={op_name=".../linear_scan/pallas_call"}`
A custom kernel is a custom call whose target is a Pallas/Triton, Mosaic GPU, Mosaic TPU or
cuDNN fused-attention call (`KERNEL_TARGETS`); cuBLAS matmuls, LAPACK and other library calls
are custom calls but not kernels of ours. Counts are of instructions in the program (a kernel in
both branches of a lax.cond counts twice, one in a loop body once), not of launches.

Lowering for another platform needs no device: `jax.jit(f).trace(*args).lower(
lowering_platforms=("cuda",))` on a CPU machine gives the Triton custom calls a GPU would run.
Interpret-mode pallas_calls (CPU tests) are inlined as ordinary HLO, so they are no custom call;
their names survive in the debug locations of the lowered module (`located_pallas_names`) and in
the jaxpr (`pallas_call_names`).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax

# Custom-call targets of kernel launches, by family.
KERNEL_TARGETS = {
    "__gpu$xla.gpu.triton": "triton",       # Pallas Triton lowering, XLA compiles the IR
    "triton_kernel_call": "triton",         # jax-triton / Pallas with the kernel compiled by jax
    "triton_kernel_call_ffi": "triton",
    "mosaic_gpu": "mosaic_gpu",
    "mosaic_gpu_v2": "mosaic_gpu",
    "tpu_custom_call": "mosaic_tpu",
}
CUDNN_ATTENTION_PREFIX = "__cudnn$fmha"     # cuDNN fused attention, forward and backward

# One instruction's custom-call target in either text form.
_TARGET = re.compile(r'stablehlo\.custom_call @"?([^\s("]+)"?\(|custom_call_target="([^"]+)"'
                     r'|call_target_name = "([^"]+)"')
# A quoted string, optionally after a key we read; scanning string by string never starts a
# match inside a string (the kernel IR blobs in backend configs are strings).
_QUOTED = re.compile(r'(?:(?<![\w.])(name|kernel_name|op_name)\s*=\s*)?"((?:[^"\\]|\\.)*)"')
_LOCATION = re.compile(r'(?:loc\(|op_name=)"([^"]*)/pallas_call[^"/]*"')


@dataclasses.dataclass(frozen=True)
class CustomCall:
  """One custom-call instruction: its target, the kernel family (None: not a kernel of ours)
  and the kernel's name where the text carries one (Triton `name`, TPU `kernel_name`, or the
  pallas_call's name in the op_name metadata)."""

  target: str
  family: str | None
  name: str | None

  @property
  def label(self) -> str:
    return self.name or self.target


def family_of(target: str) -> str | None:
  if target.startswith(CUDNN_ATTENTION_PREFIX):
    return "cudnn"
  return KERNEL_TARGETS.get(target)


def _unwrap(component: str) -> str:
  """'transpose(jvp(linear_scan))' -> 'linear_scan' (transformation wrappers of a name)."""
  while True:
    m = re.fullmatch(r"\w+\((.*)\)", component)
    if not m:
      return component
    component = m.group(1)


def _name_from_path(path: str) -> str | None:
  """The pallas_call's own name from a name-stack path '.../NAME/pallas_call'."""
  parts = [p for p in path.split("/") if p]
  return _unwrap(parts[-1]) if parts else None


def _kernel_name(line: str) -> str | None:
  names = {}
  for m in _QUOTED.finditer(line):
    if m.group(1) and m.group(1) not in names:
      names[m.group(1)] = m.group(2)
  if "name" in names:
    return names["name"]
  if "kernel_name" in names:
    return names["kernel_name"]
  op_name = names.get("op_name", "")
  if "/pallas_call" in op_name:
    return _name_from_path(op_name.split("/pallas_call")[0])
  return None


def custom_calls(text: str) -> list[CustomCall]:
  """Every custom-call instruction in StableHLO or HLO text, in order."""
  calls = []
  for line in text.splitlines():
    m = _TARGET.search(line)
    if m is None:
      continue
    target = next(g for g in m.groups() if g)
    family = family_of(target)
    calls.append(CustomCall(target, family, _kernel_name(line) if family else None))
  return calls


def kernels(text: str) -> list[CustomCall]:
  """The custom kernels (Pallas/Triton, Mosaic GPU/TPU, cuDNN attention) in the text."""
  return [c for c in custom_calls(text) if c.family is not None]


def kernel_names(text: str) -> list[str]:
  """Each kernel's name (its target where the text names none), in order, with repeats."""
  return [c.label for c in kernels(text)]


def count_kernels(text: str) -> int:
  return len(kernels(text))


def compiled_text(fn, *args, **kwargs) -> str:
  """The HLO text XLA compiled for jax.jit(fn)(*args, **kwargs) (fn may already be jitted)."""
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  return jitted.lower(*args, **kwargs).compile().as_text()


def located_pallas_names(text: str) -> set[str]:
  """Names of the pallas_calls in the debug locations of a lowered module
  (`lowered.as_text(debug_info=True)`) or the op_name metadata of HLO text; these survive
  interpret mode, where the kernel body is inlined as ordinary ops."""
  return {n for n in (_name_from_path(p) for p in _LOCATION.findall(text)) if n}


def pallas_call_names(fn, *args) -> list[str]:
  """Names of every pallas_call in the jaxpr of fn(*args), nested jaxprs included, in order.

  The jaxpr shows what was traced, before XLA removes dead code; a custom_vjp shows its primal
  function (not its fwd rule) until it is differentiated."""
  names = []

  def sub_jaxprs(value):
    if hasattr(value, "eqns"):
      yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
      yield value.jaxpr
    elif isinstance(value, (tuple, list)):
      for v in value:
        yield from sub_jaxprs(v)

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        names.append(eqn.params["name"])
      for value in eqn.params.values():
        for sub in sub_jaxprs(value):
          walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


# Collectives of compiled (partitioned) HLO text: the op (async pairs counted once, at -start),
# and its replica groups in any of XLA's three forms: explicit `{{0,1},{2,3}}`, iota
# `[4,2]<=[8]` (groups of the last dim's size), or mesh axes `mesh['axis_0'=4,'axis_1'=2]
# {'axis_0'}`, maybe with `device_ids=(...)` before the braces (groups over the axes named in
# the braces).
_COLLECTIVE = re.compile(r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")
_MESH_AXIS = re.compile(r"'(\w+)'=(\d+)")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction: its op and the devices in each of its groups (None: every
  device, or point-to-point for collective-permute)."""

  op: str
  group_size: int | None


def collectives(text: str) -> list[Collective]:
  """Every collective of compiled HLO text (`jax.jit(f).lower(...).compile().as_text()`), in
  order. Counts are of instructions, as for kernels (one in a loop body counts once)."""
  found = []
  for line in text.splitlines():
    m = _COLLECTIVE.search(line)
    if m is None or "=" not in line[:m.start() + 1]:
      continue
    size = None
    if (g := _EXPLICIT_GROUPS.search(line)) is not None:
      size = len(g.group(1).split("}")[0].strip("{").split(","))
    elif (g := _IOTA_GROUPS.search(line)) is not None:
      size = int(g.group(1).split(",")[-1])
    elif (g := _MESH_GROUPS.search(line)) is not None:
      sizes = {name: int(n) for name, n in _MESH_AXIS.findall(g.group(1))}
      axes = re.findall(r"'(\w+)'", g.group(2))
      if axes and all(a in sizes for a in axes):
        size = math.prod(sizes[a] for a in axes)
    found.append(Collective(m.group(1), size))
  return found
