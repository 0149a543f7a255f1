"""Passkey retrieval beyond a local window for every mechanism family (the GPU-sized grid).

    python scripts/sweep.py --config configs/sweeps/passkey_families.py

configs/passkey.py (a 5-digit key hidden at a random depth in filler, asked for at the end)
at T = 512 with d_model 256 and 4 heads of 64 dimensions, 2,000 steps of batch 32. The window
budget W = 128 is a quarter of the context: the sliding-window baseline sees the key only when
it sits in the last 128 tokens, so accuracy above that share needs retrieval from further back.
eval.py's passkey grid (lengths 1x, 2x, 4x x depths) runs after training. Variants: see
configs/sweeps/families.py. Results: docs/quality.md.
"""

from configs.sweeps import families
from configs.sweeps.common import sweep


def get_sweep():
  fixed = {"model.d_model": 256, "model.num_heads": 4, "data.passkey.train_examples": 20_000,
           "train.steps": 2000, "train.batch_size": 32, "train.eval_every": 0,
           "train.eval_examples": 500, "checkpoint.every": 1000, "checkpoint.keep": 1}
  return sweep("passkey_families", "configs/passkey.py", fixed, families.variants(window=128),
               seq_lens=[512], learning_rates=[1e-3], eval_tasks=("accuracy", "passkey"))
