"""MQAR across mechanisms x sequence lengths x seeds x learning rates (Zoology's figure 2 grid).

    python scripts/sweep.py --config configs/sweeps/mqar_mechanisms.py --per_device 12

Mechanisms: softmax MHA, GQA (4 query heads in 2 groups sharing a key/value head) and a
sliding window of 32 tokens, plus every other mechanism registered in effattn.attention when
the sweep starts, each with its default options. The window cannot see keys more than 32 tokens
back, so its accuracy falls as the sequence grows: the quality cost that efficient mechanisms
try to avoid.

A GPU sweep: 600 steps of batch 64 (softmax leaves MQAR's plateau near step 500); the 24
variants it had on 2026-11-30 ran in 3 minutes with 12 processes sharing one H200
(--per_device 12, docs/quality.md). On a 2-core CPU each variant takes 2-12 minutes, too long
for the whole grid: the README's CPU sweep is configs/sweeps/mqar_recall.py (four of these
mechanisms at T = 64). 4 heads of 16 dimensions, so every registered mechanism builds with its
default options (SQA halves and quarters the heads). Run a subset with
--filter 'attention=(mha|linear),'; widen it from the command line, e.g.
--axis data.seq_len=64,128,256,512 --axis seed=0,1,2
--axis optimizer.learning_rate=1e-3,3e-3,1e-2 (an --axis replaces the axis of the same key).
"""

from configs.sweeps import families
from configs.sweeps.common import CPU_MQAR, sweep
from effattn import attention

# Mechanisms with a dedicated variant above; every other registered name is added as is.
_BASELINES = [v for v in families.variants(window=32) if v["label"] in ("mha", "gqa", "swa32")]


def mechanisms() -> list[dict]:
  extra = [{"label": name, "model.attention.name": name}
           for name in attention.names() if name != "softmax"]
  return _BASELINES + extra


def get_sweep():
  return sweep("mqar_mechanisms", "configs/mqar.py", {**CPU_MQAR, "checkpoint.every": 200},
               mechanisms(), seq_lens=[64, 128], learning_rates=[3e-3])
