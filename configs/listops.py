"""ListOps (Long Range Arena): classify nested MAX/MIN/MED/SUM_MOD expressions into 10 values.

    python train.py --config configs/listops.py --workdir runs/listops

LRA's data (expressions of 500-2000 tokens, depth <= 10, <= 10 arguments) padded to T = 2048,
classified from the mean-pooled final state (the classifier head is set by the task). LRA's
model is 4 layers, d_model 512, 8 heads, trained 5k steps at batch 32 with lr 5e-4; this config
keeps that shape at d_model 128 so it fits a single GPU or a patient CPU. Attention is
bidirectional (model.causal=False), as in LRA. Reported LRA accuracies are 36-38% for softmax.
For a quick CPU check: --config.data.seq_len=512 --config.data.listops.min_length=100
--config.data.listops.max_length=500.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.d_model = 128
  config.model.num_layers = 4
  config.model.num_heads = 8
  config.model.mlp = "gated"
  config.model.position = "learned"
  config.model.max_len = 2048
  config.model.causal = False

  config.data.name = "listops"
  config.data.seq_len = 2048
  config.data.listops.min_length = 500
  config.data.listops.max_length = 2000

  config.optimizer.learning_rate = 5e-4
  config.optimizer.warmup_steps = 500
  config.optimizer.weight_decay = 0.1

  config.train.steps = 5000
  config.train.batch_size = 32
  config.train.log_every = 50
  config.train.eval_every = 1000
  config.train.eval_split = "validation"
  config.checkpoint.every = 1000
  config.eval.split = "test"
  config.eval.batch_size = 32
  return config
