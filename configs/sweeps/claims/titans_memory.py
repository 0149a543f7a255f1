"""Claim 9, ablation (Titans, Behrouz et al. 2025, its ablation table): from a deep neural memory,
take away one piece at a time: a linear memory instead, no momentum, no weight decay
(forgetting).

    python scripts/sweep.py --config configs/sweeps/claims/titans_memory.py --per_device 6

At configs/sweeps/claims/passkey_1024.py's size with the number needle: Titans MAG with a 2-layer
MLP memory (depth 2, the paper's deep memory), with the linear memory (depth 1, shared with
titans_passkey.py), and the deep memory without momentum (neural_memory.momentum=False: eta = 0)
and without weight decay (weight_decay=False: alpha = 0). 4 x 2 rates x 3 seeds = 24 variants,
estimated ~40 minutes of an H200 (not measured; the deep memory has no kernel).
"""

from configs.sweeps.claims import passkey_1024


def get_sweep():
  return passkey_1024.subset(["titans-mag-deep", "titans-mag", "titans-mag-deep-nomomentum",
                              "titans-mag-deep-nodecay"], needles=["number"])
