"""What the sweeps of configs/sweeps/ share: the CPU-sized MQAR budget and get_sweep()'s layout.

(The claim sweeps have their own layout, with seeds and a learning-rate grid picked per cell:
configs/sweeps/claims/common.py.)
"""

# configs/mqar.py (Zoology's recipe: 2 attention-only layers, d_model 64) at 4 heads of 16, 600
# steps of batch 64, evaluated once at the end on 1,000 examples: a few minutes per variant on a
# 2-core CPU, the budget at which softmax has just left MQAR's plateau (near step 500).
CPU_MQAR = {
    "model.num_heads": 4,
    "train.steps": 600,
    "train.batch_size": 64,
    "train.eval_every": 0,
    "train.eval_examples": 1000,
}


def sweep(name: str, config: str, fixed: dict, attention: list[dict], seq_lens: list[int], *,
          seeds: list[int] = (0,), learning_rates: list[float] | None = None,
          metric: str = "eval_accuracy", **keys) -> dict:
  """get_sweep()'s dict for attention variants (the plots' lines) x data.seq_len (their x axis)
  x seeds [x learning rates], the axes in that order (variant names follow it); `keys` adds
  get_sweep() keys (eval_tasks)."""
  axes = {"attention": attention, "data.seq_len": list(seq_lens), "seed": list(seeds)}
  if learning_rates is not None:
    axes["optimizer.learning_rate"] = list(learning_rates)
  return {"name": name, "config": config, "fixed": fixed, "axes": axes,
          "plot_x": "data.seq_len", "plot_series": "attention", "metric": metric, **keys}
