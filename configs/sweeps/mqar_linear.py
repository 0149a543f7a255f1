"""MQAR: softmax vs the linear-scan family (linear, MALA, lightning) at equal size and budget.

    python scripts/sweep.py --config configs/sweeps/mqar_linear.py

Same model for every variant (configs/mqar.py, Zoology's recipe: 2 attention-only layers,
d_model 64, here 4 heads of 16) and the same budget (600 steps of batch 64, AdamW 3e-3), sized
like configs/sweeps/mqar_mechanisms.py for a CPU (a few minutes per variant on 2 cores).
Positions: the linear-scan mechanisms take no RoPE (it would break the positive features their
normalizers rely on), so they get learned absolute positions; softmax runs with its usual RoPE
and, as the control for the position change, with learned positions too. Lightning's decay is
its own recency signal on top. Results: docs/mechanisms_linear.md.
"""

from configs.sweeps.common import CPU_MQAR, sweep


def get_sweep():
  learned = {"model.position": "learned"}
  return sweep("mqar_linear", "configs/mqar.py", {**CPU_MQAR, "checkpoint.every": 300}, [
      {"label": "softmax-rope", "model.attention.name": "softmax"},
      {"label": "softmax-learned", "model.attention.name": "softmax", **learned},
      {"label": "linear", "model.attention.name": "linear", **learned},
      {"label": "mala", "model.attention.name": "mala", **learned},
      {"label": "lightning", "model.attention.name": "lightning", **learned},
  ], seq_lens=[64], learning_rates=[3e-3])
