"""Issue 20 item 4: gated DeltaNet (Yang et al. 2025) closes much of linear attention's MQAR
recall gap (a 3:1 hybrid with softmax closing it is a TODO of docs/claims.md: hybrid stacks are
not in the model yet).

    python scripts/sweep.py --config configs/sweeps/claims/gated_deltanet_mqar.py --per_device 9

softmax MHA, linear and gated DeltaNet at configs/sweeps/claims/mqar_256.py's size: 27 variants
(MHA's and linear's shared with mala_mqar.py), estimated ~30 minutes of an H200 (not measured).
"""

from configs.sweeps.claims import mqar_256


def get_sweep():
  return mqar_256.subset(["mha", "linear", "gated_deltanet"])
