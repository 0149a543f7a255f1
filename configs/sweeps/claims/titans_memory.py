"""Claim 9, ablation (Titans, Behrouz et al. 2025, its ablation table): a deep neural memory
against a linear one. The paper's other two ablations, without momentum and without weight decay
(forgetting), need options the memory does not have yet (docs/claims.md: TODO).

    python scripts/sweep.py --config configs/sweeps/claims/titans_memory.py --per_device 6

At configs/sweeps/claims/passkey_1024.py's size: Titans MAG with the default linear memory
(depth 1, shared with titans_passkey.py) and with a 2-layer MLP memory (depth 2). 12 variants,
estimated ~20 minutes of an H200 (not measured).
"""

from configs.sweeps.claims import passkey_1024


def get_sweep():
  return passkey_1024.subset(["titans-mag", "titans-mag-deep"])
