"""Selective copying (H3 / Mamba): reproduce 16 tokens scattered among noise, in order.

    python train.py --config configs/selective_copy.py --workdir runs/selective_copy

Mamba's setting at a CPU-sized length: 16 data tokens from 16 symbols, T = 256 (Mamba uses
4096), 2 layers with MLPs. Content-based selection is needed: the gaps vary per example, so
no fixed shift or convolution solves it. Accuracy is over the 16 copied tokens.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.d_model = 64
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.mlp = "gated"
  config.model.position = "rope"

  config.data.name = "selective_copy"
  config.data.seq_len = 256
  config.data.selective_copy.num_tokens = 16
  config.data.selective_copy.num_symbols = 16

  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 100

  config.train.steps = 2000
  config.train.batch_size = 64
  config.train.log_every = 50
  config.train.eval_every = 500
  config.checkpoint.every = 500
  config.eval.batch_size = 128
  return config
