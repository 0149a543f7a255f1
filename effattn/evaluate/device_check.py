"""The check a bench script runs on the device before it times a kernel: each output and
gradient's max error relative to the oracle's largest magnitude (at least 1), against a
tolerance that fits the dtype."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# bf16 inputs: about 2^-8 per rounding, summed over a reduction; f32: the oracle's own noise.
TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-4}


def relative_errors(names, want, got) -> dict[str, float]:
  """{name: max |want - got| / max(1, max |want|)}; inf where got is not finite."""
  errs = {}
  for name, a, g in zip(names, want, got):
    a, g = np.asarray(a, np.float32), np.asarray(g, np.float32)
    errs[name] = (float(np.abs(a - g).max() / max(1.0, np.abs(a).max()))
                  if np.all(np.isfinite(g)) else float("inf"))
  return errs


def passes(errs: dict[str, float], dtype) -> bool:
  return max(errs.values()) < TOLERANCE[jnp.dtype(dtype).name]


def failed(row: dict, error: Exception) -> dict:
  """A check row for a path that raised instead of returning: its error, no pass."""
  return {**row, "error": f"{type(error).__name__}: {str(error)[:500]}",
          "max_rel_err": {"all": float("inf")}, "ok": False}
