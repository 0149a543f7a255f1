"""Claim 7 (Sparse Query Attention, Filipek 2025, its dense-model table): validation loss in the
order MHA < GQA ~ sSQA < SQA < xSQA, with the size of each gap.

    python scripts/sweep.py --config configs/sweeps/claims/sqa_text.py --per_device 8

At configs/sweeps/claims/text_512.py's size: softmax MHA (4 / 4 heads), GQA (4 / 2), sSQA (2 / 2),
SQA (2 / 1) and xSQA (1 / 1). 45 variants (MHA's shared with moh_text.py), estimated ~15 minutes
of an H200 (not measured).
"""

from configs.sweeps.claims import text_512


def get_sweep():
  return text_512.subset(["mha", "gqa", "ssqa", "sqa", "xsqa"])
