"""Byte-level language modelling with the head-efficiency mechanisms (the GPU-sized grid).

    python scripts/sweep.py --config configs/sweeps/text_heads.py

configs/text.py (the local Python standard library corpus, packed rows with segment ids)
widened to d_model 256 with 4 heads of 64 dimensions, T = 512, 1,500 steps of batch 32:
MHA, GQA and the SQA / MoH variants of configs/sweeps/families.py, compared by validation loss
(nats per byte). Results: docs/quality.md.
"""

from configs.sweeps import families
from configs.sweeps.common import sweep

_HEADS = ("mha", "gqa", "sqa", "ssqa", "xsqa", "moh75", "moh50")


def get_sweep():
  fixed = {"model.d_model": 256, "model.num_heads": 4, "train.steps": 1500,
           "train.batch_size": 32, "train.eval_every": 0, "checkpoint.every": 1500,
           "checkpoint.keep": 1}
  return sweep("text_heads", "configs/text.py", fixed,
               [v for v in families.variants(window=128) if v["label"] in _HEADS],
               seq_lens=[512], learning_rates=[2e-3], metric="eval_loss")
