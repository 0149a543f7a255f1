"""Claim 10 (Long Range Arena, Tay et al. 2021, table 1, ListOps): every mechanism at LRA's own
ListOps settings; the accuracy table.

    python scripts/sweep.py --config configs/sweeps/claims/listops.py --per_device 4

configs/listops.py (expressions of 500-2,000 tokens padded to T = 2,048, bidirectional, learned
positions, mean-pooled classifier) at the model and schedule of LRA's
lra_benchmarks/listops/configs/base_listops_config.py: 6 layers, d_model 512, 8 heads, MLP 2,048
(here SwiGLU of hidden 1,365, the same parameter count), batch 32, 5,000 steps, 1,000 warmup,
weight decay 0.1. LRA's "constant * linear_warmup * rsqrt_decay" with constant 0.05 peaks at
1.6e-3 and ends at 0.7e-3: a linear decay to 0.45 of the peak here, with the peak on a grid of
5e-4 / 1.6e-3 / 5e-3 x 3 seeds. Differences from LRA: mean pooling instead of a CLS token, AdamW,
and the mechanisms that are causal by construction (gated_deltanet, landmark, neural_memory)
run causally. Mechanisms: softmax MHA, GQA, a window of 512 and every other registered mechanism
with its defaults (configs/sweeps/mqar_mechanisms.py's list).

Size: 13 mechanisms x 3 rates x 3 seeds = 117 variants. Estimated (not measured) from
docs/benchmarks.md (a 118M model trains 0.6-0.8M tokens/s on an H200; this ~20M one is smaller
but the step is 65k tokens): ~10-20 minutes a variant alone, so ~25-40 hours of an H200 in all.
Run slices: --filter 'seed=0$' (39 variants) first.
"""

from configs.sweeps.claims import common
from configs.sweeps import mqar_mechanisms
from effattn import attention


def mechanisms() -> list[dict]:
  out = []
  for variant in mqar_mechanisms.mechanisms():
    variant = dict(variant)
    if variant["label"] == "swa32":
      variant.update(label="swa512", **{"model.attention.window": 512})
    if attention.get(variant["model.attention.name"]).CAUSAL_ONLY:
      variant.update(label=f"{variant['label']}-causal", **{"model.causal": True})
    out.append(variant)
  return out


def get_sweep():
  return common.sweep(
      "listops", "configs/listops.py",
      fixed={"model.d_model": 512, "model.num_heads": 8, "model.num_layers": 6,
             "model.mlp_hidden": 1365, "train.steps": 5000, "train.batch_size": 32,
             "optimizer.warmup_steps": 1000, "optimizer.weight_decay": 0.1,
             "optimizer.schedule": "linear", "optimizer.min_lr_ratio": 0.45,
             "train.eval_every": 0, "checkpoint.every": 1000, "checkpoint.keep": 1},
      attention=mechanisms(), learning_rates=[5e-4, 1.6e-3, 5e-3], metric="eval_accuracy")
