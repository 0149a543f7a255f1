"""MQAR at the families size, shared by claims 3 (MALA), 6 (MoH) and gated DeltaNet's row.

Not a claim of its own: mala_mqar.py, moh_mqar.py and gated_deltanet_mqar.py each run a subset of
these variants under the same sweep name, so the runs they share (softmax MHA, linear) train once
and the others resume or skip them.

configs/mqar.py at T = 256 with 32 key-value pairs (vocabulary 512), d_model 256, 4 heads of 64,
2,000 steps of batch 64 (configs/sweeps/mqar_families.py's budget), learning rates 1e-3 / 3e-3 /
1e-2 x 3 seeds, float32 at model.matmul_precision "tensorfloat32". Measured: claim 3's 27
variants took 7 minutes with --per_device 27 on one H200 (2026-12-04).
"""

from configs.sweeps.claims import common

FIXED = {"model.d_model": 256, "model.num_heads": 4, "data.mqar.vocab_size": 512,
         "data.mqar.num_pairs": 32, "data.seq_len": 256, "train.steps": 2000,
         "train.batch_size": 64, "train.eval_every": 0, "train.eval_examples": 1000,
         "checkpoint.every": 1000, "checkpoint.keep": 1,
         # float32 matmuls on TF32, kernels included: linear's, MALA's and gated DeltaNet's
         # kernels passed at TF32 against exact float32 on an H200 (docs/benchmarks.md); MoH's
         # take the backend's default either way. On the CPU nothing changes.
         "model.matmul_precision": "tensorfloat32"}
LEARNING_RATES = [1e-3, 3e-3, 1e-2]


def subset(labels: list[str], attention: list[dict] = ()) -> dict:
  """The variants of `labels` (configs/sweeps/families.py) and the extra `attention` variants.

  Every variant also runs the attention-entropy probe (claim 3's; effattn/evaluate/entropy.py,
  cheap), so that the sweeps sharing these runs evaluate them alike; it reports the layers
  whose mechanism exposes its weights (softmax, linear, mala) and None for the others."""
  return common.sweep("mqar_256", "configs/mqar.py", fixed=FIXED,
                      attention=common.pick(labels, window=64) + list(attention),
                      learning_rates=LEARNING_RATES, metric="eval_accuracy",
                      eval_tasks=("accuracy", "entropy"))
