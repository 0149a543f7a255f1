"""Passkey retrieval trained at T = 1,024 and probed at 2k-16k, shared by claim 9's two sweeps
(Titans' variants, and its memory ablation).

Not a claim of its own: titans_passkey.py and titans_memory.py each run a subset under one sweep
name, so Titans MAG (depth 1) trains once for both.

configs/passkey.py at T = 1,024, d_model 256, 4 heads of 64, 2,000 steps of batch 16 (the tokens
a step of passkey_512.py), learning rates 3e-4 / 1e-3 x 3 seeds (MAC and MAL diverged at 1e-3 on
passkey in bf16 before MAC's store_norm, docs/quality.md). W = 256, a quarter of the context,
for the window and Titans MAG / MAL's attention. After training, eval.py's passkey grid runs at
1,024, 2,048, 4,096, 8,192 and 16,384 tokens x 5 depths, 16 prompts a cell (eval_passkey.json).
Estimated (not measured): ~5-8 minutes a variant with --per_device 6 on an H200, the 16k row of
the grid included (docs/benchmarks.md: the Titans MAG step at T = 16k is 0.19x MHA's).
"""

from configs.sweeps import families
from configs.sweeps.claims import common

W = 256
LEARNING_RATES = [3e-4, 1e-3]
LENGTHS = (1024, 2048, 4096, 8192, 16384)
VARIANTS = {v["label"]: v for v in families.variants(window=W)}
# A deep memory (a 2-layer MLP) against the default linear one (depth 1: a matrix).
VARIANTS["titans-mag-deep"] = {**VARIANTS["titans-mag"], "label": "titans-mag-deep",
                               "model.attention.neural_memory.depth": 2}


def subset(labels: list[str]) -> dict:
  return common.sweep(
      "passkey_1024", "configs/passkey.py",
      fixed=common.passkey_fixed(1024, LENGTHS),
      attention=[VARIANTS[label] for label in labels], learning_rates=LEARNING_RATES,
      metric="eval_accuracy", eval_tasks=("accuracy", "passkey"))
