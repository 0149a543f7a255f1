"""One tolerance table and one `assert_close` for every comparison of a path with its reference.

Rounding errors of the independent terms of a sum add like a random walk, so the error of an
output grows with the square root of the number of terms behind it (a dot over D, a softmax
over T keys, a scan over T steps). The bound of every comparison is

    atol = ATOL[dtype] * sqrt(reduction) * max(1, max |want|),   rtol = 0

`dtype` is the precision the compared values were computed in (bfloat16 inputs: "bfloat16",
also for an lse or a gradient the kernel returns in float32), `reduction` the length of the
longest sum behind one output, and the scale keeps the bound relative for large values and
absolute near zero (gradients that cancel). The same bound holds on every machine: there is no
CI-only loosening.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Absolute error per sqrt(reduction) for values of magnitude <= 1, measured on the kernels of
# effattn/kernels against reference.py (the largest ratio seen is well below 1).
ATOL = {
    np.dtype(jnp.float32): 2e-6,
    np.dtype(jnp.bfloat16): 4e-3,
}


def tolerance(dtype, reduction: int = 1, scale: float = 1.0) -> float:
  """The absolute tolerance for values of magnitude `scale` computed in `dtype`."""
  dtype = np.dtype(dtype)
  if dtype not in ATOL:
    raise ValueError(f"no tolerance for dtype {dtype}; known: {[str(d) for d in ATOL]} (add one "
                     "to effattn/testing/tolerances.py, measured against the reference)")
  if reduction < 1:
    raise ValueError(f"reduction={reduction} must be >= 1 (terms summed per output)")
  return ATOL[dtype] * math.sqrt(reduction) * max(1.0, float(scale))


def _computed_dtype(*arrays) -> np.dtype:
  """The lowest float precision among the arrays (float32 for float64 or integer values)."""
  floats = {np.dtype(a.dtype) for a in arrays
            if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)}
  low = sorted(floats - {np.dtype(np.float64), np.dtype(np.float32)}, key=str)
  return low[0] if low else np.dtype(np.float32)


def assert_close(name: str, want, got, *, dtype=None, reduction: int = 1) -> None:
  """Asserts `got` equals the reference `want` within `tolerance(dtype, reduction, max|want|)`.

  name: what is compared (printed first in the one-line failure). want, got: arrays of one
  shape (a scalar `want` is broadcast); non-finite values (-inf lse of empty rows) must sit at
  the same places with the same values. dtype: the precision of the computation (default: the
  lowest float precision of want and got).
  """
  dtype = _computed_dtype(want, got) if dtype is None else np.dtype(dtype)
  want, got = np.asarray(want).astype(np.float64), np.asarray(got).astype(np.float64)
  if want.ndim == 0 and got.ndim:
    want = np.broadcast_to(want, got.shape)
  if want.shape != got.shape:
    raise AssertionError(f"{name}: shape {got.shape} != the reference's {want.shape}")
  finite = np.isfinite(want)
  if not np.array_equal(finite, np.isfinite(got)) or not np.array_equal(
      want[~finite], got[~finite], equal_nan=True):
    bad = np.argwhere((finite != np.isfinite(got)) | (~finite & (want != got)))
    where = tuple(int(i) for i in bad[0]) if len(bad) else ()
    raise AssertionError(f"{name}: non-finite values differ from the reference's ({len(bad)} "
                         f"elements, first at {where}: want {want[where]}, got {got[where]})")
  if not finite.any():
    return
  scale = float(np.abs(want[finite]).max())
  atol = tolerance(dtype, reduction, scale)
  err = np.where(finite, np.abs(got - want), 0.0)
  if err.max() > atol:
    where = np.unravel_index(int(err.argmax()), err.shape)
    where = tuple(int(i) for i in where)
    raise AssertionError(
        f"{name}: max |got - want| = {err.max():.3g} > atol {atol:.3g} = {ATOL[dtype]:g} "
        f"({dtype}) * sqrt({reduction}) * {max(1.0, scale):.3g}; at {where}: want "
        f"{want[where]:.6g}, got {got[where]:.6g}; {int((err > atol).sum())} of {err.size} "
        "elements off")


def assert_trees_close(name: str, want, got, **kwargs) -> None:
  """`assert_close` on every leaf of two pytrees of one structure, each named by its path
  (e.g. `grads.q_proj.kernel`); None leaves must be None in both."""
  want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want, is_leaf=_is_none)
  got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got, is_leaf=_is_none)
  if want_def != got_def:
    raise AssertionError(f"{name}: tree structure {got_def} != the reference's {want_def}")
  for (path, w), (_, g) in zip(want_leaves, got_leaves):
    label = f"{name}{jax.tree_util.keystr(path)}"
    if w is None or g is None:
      if (w is None) != (g is None):
        raise AssertionError(f"{label}: {'None' if g is None else 'a value'} where the "
                             f"reference has {'None' if w is None else 'a value'}")
      continue
    assert_close(label, w, g, **kwargs)


def _is_none(x) -> bool:
  return x is None
