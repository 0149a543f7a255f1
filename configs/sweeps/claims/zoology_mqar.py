"""Claim 1 (Zoology, Arora et al. 2023, figure 2): softmax attention solves MQAR in every cell of
the (T, pairs) x d_model grid; where each efficient mechanism lands.

    python scripts/sweep.py --config configs/sweeps/claims/zoology_mqar.py --per_device 12

configs/mqar.py (2 attention-only layers, RoPE, 4 heads) with Zoology's vocabulary of 8,192,
(T, pairs) from (64, 4) to (512, 64), d_model 64 / 128 / 256, one variant per mechanism (the
defaults of configs/sweeps/families.py, window W = 32 for the window-based ones), 2,000 steps of
batch 64, Zoology's 4 learning rates x 3 seeds; the rate is picked per cell by its mean over
seeds. Plots: accuracy against d_model, a panel per (T, pairs), as the paper draws it.

Size: 12 mechanisms x 4 tasks x 3 widths x 4 rates x 3 seeds = 1,728 variants. Estimated (not
measured) from configs/sweeps/mqar_families.py (2,000 steps at T = 256, d_model 256, about ten
minutes a variant with 9 sharing an H100): about one variant a minute with --per_device 12 on an
H200, so ~30 hours in all. Run it in slices, e.g. --filter 'seed=0$' first (576 variants), or one
width: --filter 'd_model=128,'.
"""

from configs.sweeps.claims import common

MECHANISMS = ["mha", "swa32", "linear", "mala", "lightning", "gated_deltanet", "routing",
              "landmark", "dynamic_mask", "sqa", "moh75", "titans-mag"]


def get_sweep():
  return common.sweep(
      "zoology_mqar", "configs/mqar.py",
      fixed={"model.num_heads": 4, "data.mqar.vocab_size": 8192, "train.steps": 2000,
             "train.batch_size": 64, "train.eval_every": 0, "train.eval_examples": 1000,
             "checkpoint.every": 1000, "checkpoint.keep": 1},
      attention=common.pick(MECHANISMS, window=32),
      learning_rates=common.ZOOLOGY_LEARNING_RATES,
      metric="eval_accuracy",
      axes={"task": common.ZOOLOGY_TASKS, "model.d_model": [64, 128, 256]},
      plot_x="model.d_model")
