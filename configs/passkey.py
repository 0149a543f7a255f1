"""Passkey retrieval (landmark-attention protocol) trained from scratch on byte tokens.

    python train.py --config configs/passkey.py --workdir runs/passkey
    python eval.py --workdir runs/passkey --config.eval.task=passkey   # length x depth heat map

A 5-digit key hidden in filler text at a random depth, asked for at the end; only the key's
digits are weighted targets. The model must find the one earlier occurrence of "pass key is"
and copy what follows it (an induction head), anywhere in the context. Trained at T = 256 on
prompts of 104..256 tokens (the task description is left out so short prompts fit); the eval
grid probes 1x, 2x and 4x the training length.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.d_model = 128
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.mlp = "gated"
  config.model.position = "rope"

  config.data.name = "passkey"
  config.data.seq_len = 256
  config.data.passkey.include_description = False
  config.data.passkey.min_length = 104  # the shortest prompt without the description
  config.data.passkey.train_examples = 20_000
  config.data.passkey.test_examples = 500

  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100

  config.train.steps = 2000
  config.train.batch_size = 32
  config.train.log_every = 50
  config.train.eval_every = 500
  config.checkpoint.every = 500
  config.eval.batch_size = 32
  return config
