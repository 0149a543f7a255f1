"""Passkey retrieval trained at T = 512 and probed to 16x, shared by claims 5 (landmark) and 8
(DMA).

Not a claim of its own: landmark_passkey.py and dma_passkey.py each run a subset under one sweep
name, so softmax MHA trains once for both.

configs/sweeps/passkey_families.py's setting (configs/passkey.py at T = 512, d_model 256,
4 heads of 64, 2,000 steps of batch 32) with learning rates 3e-4 / 1e-3 / 2e-3 x 3 seeds. After
training, eval.py's passkey grid runs on full-length prompts of 512, 1,024, 2,048, 4,096 and
8,192 tokens (1x, 2x, 4x, 8x, 16x) x 5 depths, 16 prompts a cell; the sweep's own metric is the
held-out accuracy at the training length, the grid is in each variant's eval_passkey.json.
Estimated (not measured) from passkey_families' run: ~5 minutes of training a variant with 8
sharing a GPU, plus the grid (up to 8k tokens: a minute or two for softmax, more for landmark,
whose grouped softmax is the slowest training step of docs/benchmarks.md).
"""

from configs.sweeps.claims import common

LEARNING_RATES = [3e-4, 1e-3, 2e-3]
LENGTHS = (512, 1024, 2048, 4096, 8192)


def subset(labels: list[str], extra: dict[str, dict] | None = None) -> dict:
  """The variants of `labels` (configs/sweeps/families.py), `extra[label]`'s overrides added."""
  extra = extra or {}
  return common.sweep(
      "passkey_512", "configs/passkey.py",
      fixed=common.passkey_fixed(512, LENGTHS),
      attention=[{**v, **extra.get(v["label"], {})} for v in common.pick(labels, window=128)],
      learning_rates=LEARNING_RATES, metric="eval_accuracy", eval_tasks=("accuracy", "passkey"))
