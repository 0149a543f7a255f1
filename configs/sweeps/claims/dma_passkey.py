"""Claim 8, retrieval half (Dynamic Mask Attention, Shi et al. 2025): keeping W keys per query
matches dense attention on long-context retrieval and holds past the training length better than
a sliding window of the same W.

    python scripts/sweep.py --config configs/sweeps/claims/dma_passkey.py --per_device 8

At configs/sweeps/claims/passkey_512.py's size with W = 128: softmax MHA, a sliding window of
128 and dynamic_mask keeping 128 keys per query. 27 variants (MHA's shared with
landmark_passkey.py), estimated ~20 minutes of an H200 (not measured).
"""

from configs.sweeps.claims import passkey_512


def get_sweep():
  return passkey_512.subset(["mha", "swa128", "dynamic_mask"])
