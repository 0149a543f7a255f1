"""Loss and perplexity by position, at the training length and beyond it (length extrapolation).

    python eval.py --workdir runs/text --config.eval.task=positions

Does the model use long context, and does it still work past the length it was trained at? For
each length L = m * data.seq_len (m in `multiples`, default 1, 2, 4, 8) the held-out split is
built at L from the same task (data.seq_len overridden: synthetic tasks draw their examples at
L, text is packed into rows of L) and the per-token cross entropy is averaged in `num_buckets`
equal buckets of position. The position of a token is its position inside its segment (the
number of tokens of context it can see), so packed documents count from their own start.

A model that uses its context has a loss falling with position; one that extrapolates keeps that
loss flat or falling past the training length (the dashed line of the plot).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from effattn import data as data_lib
from effattn.evaluate import common
from effattn.evaluate.registry import register_eval_task, task_options
from effattn.train.state import split_model


@dataclasses.dataclass(frozen=True)
class PositionsOptions:
  """Options of eval.task=positions (config.eval.positions.<field>).

  Attributes:
    multiples: lengths to evaluate, as multiples of data.seq_len.
    num_buckets: equal-width position buckets per length.
    max_examples: examples per length (eval.max_examples, when set, wins); 0 = whole split.
    tokens_per_batch: tokens per forward pass (rows = tokens_per_batch // length, at least
      one); 0 = eval.batch_size * data.seq_len, so longer lengths use fewer rows.
  """

  multiples: tuple[int, ...] = (1, 2, 4, 8)
  num_buckets: int = 8
  max_examples: int = 256
  tokens_per_batch: int = 0

  def validate(self) -> None:
    if not self.multiples or any(int(m) != m or m < 1 for m in self.multiples):
      raise ValueError(f"eval.positions.multiples={self.multiples} must be positive integers, "
                       f"e.g. (1, 2, 4, 8)")
    if self.num_buckets < 1:
      raise ValueError(f"eval.positions.num_buckets={self.num_buckets} must be >= 1")
    if self.max_examples < 0 or self.tokens_per_batch < 0:
      raise ValueError("eval.positions.max_examples and tokens_per_batch must be >= 0")


def bucket_sums(values: np.ndarray, weights: np.ndarray, positions: np.ndarray, length: int,
                num_buckets: int) -> tuple[np.ndarray, np.ndarray]:
  """Per bucket: sum of weights * values and sum of weights. values/weights/positions [B, T]."""
  bucket = np.minimum(positions.astype(np.int64) * num_buckets // length, num_buckets - 1)
  w = weights.astype(np.float64).ravel()
  return (np.bincount(bucket.ravel(), w * values.astype(np.float64).ravel(), num_buckets),
          np.bincount(bucket.ravel(), w, num_buckets))


def _perplexity(loss: float) -> float:
  return float(np.exp(min(loss, 50.0)))


def _ratio(num: float, den: float) -> float | None:
  return float(num / den) if den > 0 else None


def evaluate_length(graphdef, params, rest, data_cfg: dict, split: str, *, train_len: int,
                    num_buckets: int, max_examples: int | None, tokens_per_batch: int) -> dict:
  """Loss/accuracy overall, by position bucket, and past the training length at one length."""
  length = data_cfg["seq_len"]
  rows = common.rows_per_batch(tokens_per_batch, length)
  loss_b = np.zeros(num_buckets)
  correct_b = np.zeros(num_buckets)
  weight_b = np.zeros(num_buckets)
  beyond = np.zeros(2)  # loss sum, weight of positions >= train_len
  examples = 0
  for batch in data_lib.eval_batches(data_cfg, split, rows, max_examples=max_examples):
    ce, correct = common.token_losses(graphdef, params, rest, batch)
    w, pos = batch["weights"], batch["positions"]
    examples += int(np.sum(np.any(w > 0, axis=-1)))
    ls, ws = bucket_sums(ce, w, pos, length, num_buckets)
    cs, _ = bucket_sums(correct, w, pos, length, num_buckets)
    loss_b += ls
    correct_b += cs
    weight_b += ws
    far = w * (pos >= train_len)
    beyond += (float(np.sum(ce * far)), float(np.sum(far)))
  total = weight_b.sum()
  if total == 0:
    raise ValueError(f"split {split!r} of data.name={data_cfg['name']!r} at length {length} has "
                     f"no weighted targets")
  loss = float(loss_b.sum() / total)
  buckets = []
  for i in range(num_buckets):
    bucket_loss = _ratio(loss_b[i], weight_b[i])
    buckets.append({
        "start": i * length // num_buckets, "end": (i + 1) * length // num_buckets,
        "loss": bucket_loss,
        "perplexity": None if bucket_loss is None else _perplexity(bucket_loss),
        "accuracy": _ratio(correct_b[i], weight_b[i]), "weight": float(weight_b[i])})
  beyond_loss = _ratio(*beyond)
  return {"length": length, "loss": loss, "perplexity": _perplexity(loss),
          "accuracy": float(correct_b.sum() / total), "tokens": float(total),
          "examples": examples, "loss_beyond_train_length": beyond_loss,
          "perplexity_beyond_train_length":
              None if beyond_loss is None else _perplexity(beyond_loss),
          "buckets": buckets}


def plot(result: dict, title: str):
  """Loss by position, one line per length; the training length dashed. -> matplotlib Figure."""
  from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

  fig = Figure(figsize=(7, 4.2), layout="constrained")
  ax = fig.add_subplot()
  for entry in result["lengths"]:
    pts = [((b["start"] + b["end"]) / 2, b["loss"]) for b in entry["buckets"]
           if b["loss"] is not None]
    if pts:
      x, y = zip(*pts)
      ax.plot(x, y, marker="o", ms=3, label=f"T={entry['length']}")
  ax.axvline(result["train_length"], color="k", ls="--", lw=1, label="training length")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("position in segment (bucket centre)")
  ax.set_ylabel("loss (nats / token)")
  ax.set_title(f"loss by position: {title}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return fig


@register_eval_task("positions", options=PositionsOptions)
def positions_task(model, config, workdir) -> dict:
  """Loss/perplexity by position bucket at multiples of the training length."""
  del workdir
  opts = task_options(config, "positions")
  common.require_lm(config, "positions")
  graphdef, params, rest = split_model(model)
  train_len = int(config.data.seq_len)
  max_examples = config.eval.max_examples or opts.max_examples or None
  tokens_per_batch = opts.tokens_per_batch or config.eval.batch_size * train_len
  lengths = []
  for m in sorted(set(int(m) for m in opts.multiples)):
    data_cfg = common.data_at_length(config.data, m * train_len)
    lengths.append(evaluate_length(graphdef, params, rest, data_cfg, config.eval.split,
                                   train_len=train_len, num_buckets=opts.num_buckets,
                                   max_examples=max_examples, tokens_per_batch=tokens_per_batch))
  result = {"train_length": train_len, "lengths": lengths}
  return {**result, "figure": plot(result, common.run_label(config))}
