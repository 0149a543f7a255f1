"""Claim 6, text half (MoH, Jin et al. 2024): with 50-90% of its heads active per token, MoH
matches or beats MHA of the same size.

    python scripts/sweep.py --config configs/sweeps/claims/moh_text.py --per_device 8

At configs/sweeps/claims/text_512.py's size: softmax MHA, MoH with 3 of 4 heads active (75%)
and 2 of 4 (50%). 27 variants (MHA's shared with sqa_text.py), estimated ~10 minutes of an H200
(not measured). 90% active needs 10 or more heads: not in this grid.
"""

from configs.sweeps.claims import text_512


def get_sweep():
  return text_512.subset(["mha", "moh75", "moh50"])
