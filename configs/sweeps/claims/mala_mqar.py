"""Claim 3 (MALA, Fan et al. 2025): magnitude-aware linear attention recalls between linear
attention and softmax on MQAR (the accuracy part of the claim; the per-head attention-entropy
part needs a probe that eval.py does not have yet, see docs/claims.md).

    python scripts/sweep.py --config configs/sweeps/claims/mala_mqar.py --per_device 9

softmax MHA, linear (elu+1) and MALA, both with learned positions, at configs/sweeps/claims/
mqar_256.py's size: 3 mechanisms x 3 rates x 3 seeds = 27 variants, estimated ~30 minutes of an
H200 (not measured).
"""

from configs.sweeps.claims import mqar_256


def get_sweep():
  return mqar_256.subset(["mha", "linear", "mala"])
