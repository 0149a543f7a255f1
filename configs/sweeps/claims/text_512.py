"""Byte-level text at T = 512 with the head-efficiency mechanisms, shared by claims 6 (MoH) and
7 (SQA).

Not a claim of its own: moh_text.py and sqa_text.py each run a subset under one sweep name, so
softmax MHA trains once for both.

configs/sweeps/text_heads.py's setting (configs/text.py at T = 512, 2 layers, d_model 256,
4 heads of 64, SwiGLU, 1,500 steps of batch 32) with learning rates 1e-3 / 2e-3 / 4e-3 x 3 seeds;
validation loss in nats per byte. Estimated (not measured) from text_heads' run: about 3 minutes
of training a variant with 7 sharing an H100, so ~2-3 minutes with --per_device 8 on an H200.
"""

from configs.sweeps.claims import common

LEARNING_RATES = [1e-3, 2e-3, 4e-3]


def subset(labels: list[str]) -> dict:
  return common.sweep("text_512", "configs/text.py",
                      fixed={**common.text_fixed(512), "data.seq_len": 512},
                      attention=common.pick(labels, window=128),
                      learning_rates=LEARNING_RATES, metric="eval_loss")
