"""Claim 8, text half (Dynamic Mask Attention, Shi et al. 2025): keeping W keys per query by a
learned, content-dependent mask matches dense attention at equal budget on text.

    python scripts/sweep.py --config configs/sweeps/claims/dma_text.py --per_device 8

At configs/sweeps/claims/text_2048.py's size: softmax MHA (dense), a sliding window of 512 and
dynamic_mask keeping 512 keys per query. 27 variants (MHA's and the window's shared with
routing_text.py), estimated ~20 minutes of an H200 (not measured).
"""

from configs.sweeps.claims import text_2048


def get_sweep():
  return text_2048.subset(["mha", "swa512", "dynamic_mask"])
