"""Byte-level text at T = 2,048, shared by claims 2 (routing), 4 (lightning) and 8 (DMA).

Not a claim of its own: routing_text.py, lightning_text.py and dma_text.py each run a subset of
VARIANTS under one sweep name, so the runs they share (softmax MHA, the window of 512) train once.

configs/text.py (the local Python standard library, packed rows with segment ids) at
T = 2,048: 2 layers, d_model 256, 4 heads of 64, SwiGLU, 1,500 steps of 8 x 2,048 bytes (the
tokens a step of configs/sweeps/text_heads.py), learning rates 1e-3 / 2e-3 / 4e-3 x 3 seeds;
validation loss in nats per byte. The budget W = 512 (a quarter of the context) is what each
sparse mechanism may attend per query: the sliding window's width, routing's local window and,
with 4 clusters of a 2,048-token row, its mean cluster size, and the keys dynamic_mask keeps.
Estimated (not measured) from text_heads (about 3 minutes of training a variant with 7 sharing
an H100, at a quarter of this T): ~5 minutes a variant with --per_device 8 on an H200.
"""

from configs.sweeps import families
from configs.sweeps.claims import common

W = 512
_ROUTING_ONLY = {"model.attention.name": "routing", "model.attention.routing.routing_heads": 4}
VARIANTS = {v["label"]: v for v in families.variants(window=W)}
VARIANTS.update({
    # every head routed, 4 clusters (mean cluster 512 = W) / one cluster (causal softmax with
    # routing's shared, normalized query-key projection)
    "routing-all": {"label": "routing-all", **_ROUTING_ONLY,
                    "model.attention.routing.num_clusters": 4},
    "routing-c1": {"label": "routing-c1", **_ROUTING_ONLY,
                   "model.attention.routing.num_clusters": 1},
    # lightning without its per-head decay: plain linear attention inside the same block
    "lightning-nodecay": {**VARIANTS["lightning"], "label": "lightning-nodecay",
                          "model.attention.lightning.decay": "none"},
})
LEARNING_RATES = [1e-3, 2e-3, 4e-3]


def subset(labels: list[str]) -> dict:
  unknown = [label for label in labels if label not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown text_2048 variants {unknown}; known: {sorted(VARIANTS)}")
  return common.sweep("text_2048", "configs/text.py",
                      fixed={**common.text_fixed(2048), "data.seq_len": 2048},
                      attention=[VARIANTS[label] for label in labels],
                      learning_rates=LEARNING_RATES, metric="eval_loss")
