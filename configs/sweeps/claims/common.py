"""What every claim sweep shares: three seeds, the family variants by label, the text model.

Each claim sweep (one file per claim of docs/claims.md) is a resumable grid of variants x its
learning-rate grid x SEEDS; scripts/sweep.py reports per mechanism the learning rate with the best
mean over the seeds, with that mean's std, min, max and n (`select` names the learning-rate axis;
any other axis stays a column, and a panel of the plots).
"""

from configs.sweeps import families

SEEDS = [0, 1, 2]
LEARNING_RATE = "optimizer.learning_rate"

# Zoology's grid of MQAR difficulties: (T, key-value pairs) from (64, 4) to (512, 64).
ZOOLOGY_TASKS = [
    {"label": f"T{t}-p{p}", "data.seq_len": t, "data.mqar.num_pairs": p}
    for t, p in ((64, 4), (128, 8), (256, 16), (512, 64))
]
# Zoology's learning-rate grid, np.logspace(-4, -2, 4) rounded to two digits.
ZOOLOGY_LEARNING_RATES = [1e-4, 4.6e-4, 2.2e-3, 1e-2]


def pick(labels: list[str], window: int) -> list[dict]:
  """The variants of configs/sweeps/families.py with these labels, in this order."""
  by_label = {v["label"]: v for v in families.variants(window=window)}
  unknown = [label for label in labels if label not in by_label]
  if unknown:
    raise ValueError(f"unknown family labels {unknown}; known: {sorted(by_label)}")
  return [by_label[label] for label in labels]


# Byte-level text (configs/text.py: the local Python standard library, packed rows), the
# text_heads size: 2 layers, d_model 256, 4 heads of 64, SwiGLU; 16k tokens a step.
def text_fixed(seq_len: int, steps: int = 1500) -> dict:
  return {
      "model.d_model": 256,
      "model.num_heads": 4,
      "train.steps": steps,
      "train.batch_size": max(16_384 // seq_len, 1),
      "train.eval_every": 0,
      "checkpoint.every": steps,
      "checkpoint.keep": 1,
  }


# Passkey retrieval (configs/passkey.py), the passkey_families size: d_model 256, 4 heads of 64,
# 2,000 steps of 16k tokens; eval.py's passkey grid at `lengths` after training.
def passkey_fixed(seq_len: int, lengths: tuple[int, ...]) -> dict:
  return {"model.d_model": 256, "model.num_heads": 4, "data.seq_len": seq_len,
          "data.passkey.train_examples": 20_000, "train.steps": 2000,
          "train.batch_size": 16_384 // seq_len, "train.eval_every": 0,
          "train.eval_examples": 500, "checkpoint.every": 1000, "checkpoint.keep": 1,
          "eval.passkey.lengths": lengths}


def sweep(name: str, config: str, fixed: dict, attention: list[dict], learning_rates: list[float],
          metric: str, axes: dict | None = None, **keys) -> dict:
  """A claim sweep: attention x `axes` x learning rates x SEEDS (the last varies fastest), the
  learning rate picked per cell by its mean over the seeds; `keys` adds get_sweep() keys
  (eval_tasks, plot_x)."""
  return {
      "name": f"claims_{name}",
      "config": config,
      "fixed": fixed,
      "axes": {"attention": attention, **(axes or {}), LEARNING_RATE: learning_rates,
               "seed": SEEDS},
      "select": [LEARNING_RATE],
      "plot_series": "attention",
      "metric": metric,
      **keys,
  }
