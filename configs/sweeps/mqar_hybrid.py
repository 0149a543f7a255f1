"""MQAR: hybrid stacks (model.pattern) against their pure parents at equal size and budget.

    python scripts/sweep.py --config configs/sweeps/mqar_hybrid.py

Four attention-only layers of d_model 64 and 4 heads (configs/mqar.py otherwise), 600 steps of
batch 64 as in configs/sweeps/mqar_linear.py, sized for a CPU. The hybrids put one softmax layer
in every four: last (`3*lightning,softmax`, the usual placement), first (`softmax,3*lightning`)
and with Gated DeltaNet (`3*gated_deltanet,softmax`, the 3:1 of Qwen3-Next-style stacks). The
question: does one softmax layer in four buy softmax's recall at a quarter of its cost?
Learned positions for every variant, as the linear-scan mechanisms take no RoPE.
"""

from configs.sweeps import mqar_linear
from configs.sweeps.common import sweep


def get_sweep():
  # mqar_linear's model width and budget, at 4 layers with learned positions throughout.
  fixed = {**mqar_linear.get_sweep()["fixed"], "model.num_layers": 4,
           "model.position": "learned"}
  return sweep("mqar_hybrid", "configs/mqar.py", fixed, [
      {"label": "softmax", "model.attention.name": "softmax"},
      {"label": "lightning", "model.attention.name": "lightning"},
      {"label": "lightning3_softmax1", "model.pattern": "3*lightning,softmax"},
      {"label": "softmax1_lightning3", "model.pattern": "softmax,3*lightning"},
      {"label": "gated_deltanet", "model.attention.name": "gated_deltanet"},
      {"label": "gated_deltanet3_softmax1", "model.pattern": "3*gated_deltanet,softmax"},
  ], seq_lens=[64])
