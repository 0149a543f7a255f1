"""MQAR quality of every mechanism family at one size and budget (the GPU-sized grid).

    python scripts/sweep.py --config configs/sweeps/mqar_families.py

Zoology's attention-only recipe (configs/mqar.py: 2 layers, no MLP) widened to d_model 256 with
4 heads of 64 dimensions, so on a GPU every mechanism runs its Pallas kernel; 32 key-value
pairs in T = 256 tokens, keys and values from a 512-token vocabulary; 2,000 steps of batch 64.
The window budget W = 64 covers the key-value block but not the far queries, so the
sliding-window baseline shows what is lost without long-range recall. Variants: see
configs/sweeps/families.py. Results: docs/quality.md.
"""

from configs.sweeps import families
from configs.sweeps.common import sweep


def get_sweep():
  fixed = {"model.d_model": 256, "model.num_heads": 4, "data.mqar.vocab_size": 512,
           "data.mqar.num_pairs": 32, "train.steps": 2000, "train.batch_size": 64,
           "train.eval_every": 0, "train.eval_examples": 1000, "checkpoint.every": 1000,
           "checkpoint.keep": 1}
  # Zoology reports the best learning rate per mechanism; 3e-3 was run only where 1e-3 stayed
  # below 90% (docs/quality.md says which).
  return sweep("mqar_families", "configs/mqar.py", fixed, families.variants(window=64),
               seq_lens=[256], learning_rates=[1e-3, 3e-3])
