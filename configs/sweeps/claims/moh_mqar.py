"""Claim 6, MQAR half (MoH, Jin et al. 2024): with 50-75% of its heads active per token, MoH
matches or beats MHA of the same size.

    python scripts/sweep.py --config configs/sweeps/claims/moh_mqar.py --per_device 9

softmax MHA, MoH with 3 of 4 heads (the defaults: 1 shared + top-2 of 3) and 2 of 4 (1 shared +
top-1 of 3) at configs/sweeps/claims/mqar_256.py's size: 27 variants (MHA's shared), estimated
~30 minutes of an H200 (not measured). 90% active needs 10 or more heads: not in this grid.
"""

from configs.sweeps.claims import mqar_256


def get_sweep():
  return mqar_256.subset(["mha", "moh75", "moh50"])
