"""Claim 3 (MALA, Fan et al. 2025): magnitude-aware scores are sharper than linear attention's
(lower attention entropy per head), and MALA recalls between linear attention and softmax on
MQAR.

    python scripts/sweep.py --config configs/sweeps/claims/mala_mqar.py --per_device 27

softmax MHA, linear (elu+1) and MALA, both with learned positions, at configs/sweeps/claims/
mqar_256.py's size: 3 mechanisms x 3 rates x 3 seeds = 27 variants, 7 minutes with 27 sharing
one H200 (measured, 2026-12-04; docs/claims.md has the result). After training, eval.py's `entropy` task (effattn/evaluate/entropy.py)
measures every head's attention entropy on 256 held-out rows from the mechanisms' own weights;
its means over layers and heads are the results table's eval_entropy* columns (eval_entropy_norm:
1 = uniform over the causal prefix, 0 = one key; *_targets: at the query positions, where MQAR
recalls), per head in each variant's eval_entropy.json.
"""

from configs.sweeps.claims import mqar_256


def get_sweep():
  return mqar_256.subset(["mha", "linear", "mala"])
