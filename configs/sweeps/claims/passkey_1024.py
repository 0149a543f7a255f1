"""Passkey retrieval trained at T = 1,024 and probed at 2k-16k, shared by claim 9's two sweeps
(Titans' variants, and its memory ablation).

Not a claim of its own: titans_passkey.py and titans_memory.py each run a subset under one sweep
name, so Titans MAG (depth 1) with the number needle trains once for both.

configs/passkey.py at T = 1,024, d_model 256, 4 heads of 64, 2,000 steps of batch 16 (the tokens
a step of passkey_512.py), learning rates 3e-4 / 1e-3 x 3 seeds (MAC and MAL diverged at 1e-3 on
passkey in bf16 before MAC's store_norm, docs/quality.md). W = 256, a quarter of the context,
for the window and Titans MAG / MAL's attention. After training, eval.py's passkey grid runs at
1,024, 2,048, 4,096, 8,192 and 16,384 tokens x 5 depths, 16 prompts a cell (eval_passkey.json).
Estimated (not measured): ~5-8 minutes a variant with --per_device 6 on an H200, the 16k row of
the grid included (docs/benchmarks.md: the Titans MAG step at T = 16k is 0.19x MHA's).

The needle axis (S-NIAH's needle kinds): the 5-digit number of the landmark protocol, or a word
of effattn.data.passkey.WORDS (data.passkey.needle), trained and probed with the same kind; a
word key is up to 8 letters, so its shortest training prompt is 113 tokens, not 104.
"""

from configs.sweeps import families
from configs.sweeps.claims import common
from effattn.data import passkey

W = 256
LEARNING_RATES = [3e-4, 1e-3]
LENGTHS = (1024, 2048, 4096, 8192, 16384)
VARIANTS = {v["label"]: v for v in families.variants(window=W)}
# The paper's ablation (its table 5) starts from a deep memory (a 2-layer MLP) and takes one
# piece away at a time: the linear memory (depth 1, a matrix: our default), no momentum (eta = 0),
# no weight decay (no forgetting, alpha = 0).
_MEMORY = "model.attention.neural_memory."
VARIANTS["titans-mag-deep"] = {**VARIANTS["titans-mag"], "label": "titans-mag-deep",
                               _MEMORY + "depth": 2}
VARIANTS["titans-mag-deep-nomomentum"] = {**VARIANTS["titans-mag-deep"],
                                          "label": "titans-mag-deep-nomomentum",
                                          _MEMORY + "momentum": False}
VARIANTS["titans-mag-deep-nodecay"] = {**VARIANTS["titans-mag-deep"],
                                       "label": "titans-mag-deep-nodecay",
                                       _MEMORY + "weight_decay": False}
NEEDLES = {
    "number": {"label": "number", "data.passkey.needle": "number"},
    "word": {"label": "word", "data.passkey.needle": "word",
             "data.passkey.min_length": passkey.min_length(5, False, "word")},
}


def subset(labels: list[str], needles: list[str]) -> dict:
  return common.sweep(
      "passkey_1024", "configs/passkey.py",
      fixed=common.passkey_fixed(1024, LENGTHS),
      attention=[VARIANTS[label] for label in labels],
      axes={"needle": [NEEDLES[n] for n in needles]}, learning_rates=LEARNING_RATES,
      metric="eval_accuracy", eval_tasks=("accuracy", "passkey"))
