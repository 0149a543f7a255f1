"""The README's sweep: MQAR's recall gap in four runs that finish on a 2-core CPU.

    python scripts/sweep.py --config configs/sweeps/mqar_recall.py

configs/mqar.py (Zoology's attention-only recipe: 2 layers, d_model 64, here 4 heads of 16,
vocabulary 256) at T = 64 with 8 key-value pairs, 600 steps of batch 64 at lr 3e-3, one seed:
the budget at which softmax attention has just left MQAR's plateau (it jumps near step 500).
Four mechanisms, one per answer to "can it recall a key it saw 60 tokens ago": softmax MHA
(attends to everything), a sliding window of 32 tokens (cannot see far pairs), linear attention
(a fixed-size state: the gap Zoology measured) and routing (softmax within content-based
clusters). Gated DeltaNet is left out: its chunked delta rule runs ~4 s a step on this CPU, ten
times softmax (its MQAR row: configs/sweeps/claims/gated_deltanet_mqar.py, on a GPU).
Measured on the 2-core CPU: docs/sweeps.md ("The README sweep on a CPU"). The full grid (every
registered mechanism, two lengths) is configs/sweeps/mqar_mechanisms.py, a GPU sweep.
"""

from configs.sweeps.common import CPU_MQAR, sweep

_VARIANTS = [
    {"label": "mha", "model.attention.name": "softmax"},
    {"label": "swa32", "model.attention.name": "softmax", "model.attention.window": 32},
    {"label": "linear", "model.attention.name": "linear", "model.position": "learned"},
    {"label": "routing", "model.attention.name": "routing"},
]


def get_sweep():
  fixed = {**CPU_MQAR,
           "train.eval_examples": 256,  # train.py's own last eval; eval.py reports 1,000
           "eval.max_examples": 1000, "checkpoint.every": 600, "checkpoint.keep": 1}
  return sweep("mqar_recall", "configs/mqar.py", fixed, _VARIANTS, seq_lens=[64],
               learning_rates=[3e-3])
