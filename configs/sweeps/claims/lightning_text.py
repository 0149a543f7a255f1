"""Claim 4 (Lightning Attention-2 / TransNormerLLM, Qin et al. 2024): quality close to softmax on
text at T = 2,048 with per-head decay; the speed half (training time flat in T) is a benchmark
row of docs/benchmarks.md, not this sweep.

    python scripts/sweep.py --config configs/sweeps/claims/lightning_text.py --per_device 8

At configs/sweeps/claims/text_2048.py's size: softmax MHA, lightning with TransNormerLLM's
per-head, per-layer decay (the default), lightning without decay, and linear (elu+1), the
linear family with learned positions. 4 mechanisms x 3 rates x 3 seeds = 36 variants (MHA's
shared with routing_text.py and dma_text.py), estimated ~25 minutes of an H200 (not measured).
"""

from configs.sweeps.claims import text_2048


def get_sweep():
  return text_2048.subset(["mha", "lightning", "lightning-nodecay", "linear"])
