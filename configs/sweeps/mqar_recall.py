"""The README's sweep: MQAR's recall gap in four runs that finish on a 2-core CPU.

    python scripts/sweep.py --config configs/sweeps/mqar_recall.py

configs/mqar.py (Zoology's attention-only recipe: 2 layers, d_model 64, here 4 heads of 16,
vocabulary 256) at T = 64 with 8 key-value pairs, 500 steps of batch 64, one seed. Four
mechanisms, one per answer to "can it recall a key it saw 60 tokens ago": softmax MHA (attends
to everything), a sliding window of 32 tokens (cannot see far pairs), linear attention (a
fixed-size state: the gap Zoology measured) and routing (softmax within content-based
clusters). Each at its own learning rate, as Zoology picks the best one per mechanism: softmax
leaves MQAR's plateau by step 400 at 1e-2 (seeds 0-2; at 3e-3 only one seed of three had left
it by step 600), routing stays on it at 1e-2 and recalls at 3e-3, and the window and linear
attention stay on it at either. Gated DeltaNet is left out: at this budget it stays below even
linear attention's plateau (0.35 s a step here; docs/sweeps.md has the runs), so its MQAR row
is configs/sweeps/claims/gated_deltanet_mqar.py, on a GPU. Measured on the 2-core CPU: docs/sweeps.md ("The README sweep on a CPU"). The full
grid (every registered mechanism, two lengths) is configs/sweeps/mqar_mechanisms.py, a GPU sweep.
"""

from configs.sweeps.common import CPU_MQAR, sweep

_LR = "optimizer.learning_rate"
_VARIANTS = [
    {"label": "mha", "model.attention.name": "softmax", _LR: 1e-2},
    {"label": "swa32", "model.attention.name": "softmax", "model.attention.window": 32, _LR: 1e-2},
    {"label": "linear", "model.attention.name": "linear", "model.position": "learned", _LR: 1e-2},
    {"label": "routing", "model.attention.name": "routing", _LR: 3e-3},
]


def get_sweep():
  fixed = {**CPU_MQAR, "train.steps": 500,
           "train.eval_examples": 256,  # train.py's own last eval; eval.py reports 1,000
           "eval.max_examples": 1000, "checkpoint.every": 500, "checkpoint.keep": 1}
  return sweep("mqar_recall", "configs/mqar.py", fixed, _VARIANTS, seq_lens=[64])
