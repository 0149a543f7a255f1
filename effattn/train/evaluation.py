"""Loss, accuracy and perplexity of a model over one split (the trainer's and eval.py's metric)."""

from __future__ import annotations

import jax
import numpy as np

from effattn import data as data_lib
from effattn import logical_axes
from effattn.train.sharding import put_batch
from effattn.train.step import make_eval_step

_EVAL_STEPS: dict = {}


def evaluate_split(graphdef, params, rest, data_cfg, split: str, *, batch_size: int,
                   max_examples: int | None = None, batch_sharding=None) -> dict[str, float]:
  """One pass over `split`: weighted mean loss, accuracy and perplexity over the target tokens.

  batch_sharding: each process reads only its rows of every batch and they form one global
  array (multi-host); None: the whole batch, on the default device.
  """
  # One compiled step per model structure and activation rules (jit's cache knows the ambient
  # mesh, not the rules the step was traced with).
  key = (graphdef, logical_axes.current_rules())
  if key not in _EVAL_STEPS:
    _EVAL_STEPS[key] = jax.jit(make_eval_step(graphdef))
  eval_step = _EVAL_STEPS[key]
  totals = {"loss_sum": 0.0, "correct_sum": 0.0, "weight_sum": 0.0}
  examples = 0
  i, n = (jax.process_index(), jax.process_count()) if batch_sharding is not None else (0, 1)
  for batch in data_lib.eval_batches(data_cfg, split, batch_size, max_examples=max_examples,
                                     process_index=i, process_count=n):
    if batch_sharding is not None:
      batch = put_batch(batch, batch_sharding)
    sums = jax.device_get(eval_step(params, rest, batch))
    examples += int(sums["example_sum"])
    for k in totals:
      totals[k] += float(sums[k])
  if totals["weight_sum"] == 0:
    raise ValueError(f"split {split!r} of data.name={data_cfg.name!r} has no weighted targets")
  loss = totals["loss_sum"] / totals["weight_sum"]
  return {"loss": loss, "accuracy": totals["correct_sum"] / totals["weight_sum"],
          "perplexity": float(np.exp(min(loss, 50.0))), "examples": float(examples)}
