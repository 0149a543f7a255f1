"""Proof that a kernel, not a fallback, ran: the pallas_call names in a lowered program.

Read with effattn/kernels/hlo.py, the one reader of kernels in HLO. On CPU the kernels run in
the Pallas interpreter, which inlines them as ordinary ops; their names survive in the debug
locations of the lowered module.
"""

from __future__ import annotations

import jax

from effattn.kernels import hlo


def lowered_pallas_names(fn, *args) -> set[str]:
  """Names of the pallas_calls in the lowered program of jax.jit(fn)(*args), or of `fn` when
  it is already a `jax.stages.Lowered`. A jitted `fn` is lowered as it is (its cached trace,
  with the paths chosen when it was first traced)."""
  if isinstance(fn, jax.stages.Lowered):
    lowered = fn
  else:
    lowered = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args)
  return hlo.located_pallas_names(lowered.as_text(debug_info=True))


def assert_kernels_ran(names, fn, *args) -> None:
  """Every name in `names` is a pallas_call of the lowered jax.jit(fn)(*args)."""
  found = lowered_pallas_names(fn, *args)
  missing = sorted(set(names) - found)
  assert not missing, f"pallas_calls {missing} not in the lowered program (found {sorted(found)})"
