"""Issue 20 item 4: gated DeltaNet (Yang et al. 2025) closes much of linear attention's MQAR
recall gap, and a 3:1 hybrid with softmax (three gated DeltaNet layers to one softmax layer, as
Qwen3-Next-style stacks place them) closes it.

    python scripts/sweep.py --config configs/sweeps/claims/gated_deltanet_mqar.py --per_device 27

softmax MHA, linear and gated DeltaNet at configs/sweeps/claims/mqar_256.py's size (2 layers),
and the hybrid `3*gated_deltanet,softmax` (model.pattern) at 4 layers beside a pure gated
DeltaNet of 4 layers, so that the softmax layer, not the depth, is what the hybrid adds. 5 x 3
rates x 3 seeds = 45 variants (MHA's and linear's 18 shared with mala_mqar.py), about 10
minutes of an H200 for the 27 new ones (scaled from claim 3's measured 7; not measured).
"""

from configs.sweeps.claims import mqar_256

HYBRID = [
    {"label": "gated_deltanet-4l", "model.attention.name": "gated_deltanet",
     "model.num_layers": 4},
    {"label": "gated_deltanet3_softmax1", "model.pattern": "3*gated_deltanet,softmax",
     "model.num_layers": 4},
]


def get_sweep():
  return mqar_256.subset(["mha", "linear", "gated_deltanet"], attention=HYBRID)
