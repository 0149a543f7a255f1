"""A small byte-level language model on the local text corpus (the Python standard library).

    python train.py --config configs/text.py --workdir runs/text

No download: data.text.files="" reads the running Python's standard library (~30 MB of code
with prose docstrings), split train/validation/test by a hash of each file path, packed into
rows of data.seq_len bytes with segment ids. The first run prepares the data (about a minute).
Sized for a CPU: 2 layers, d_model 128, T = 256, 600 steps of 16 x 256 tokens (~0.5 s a step
on 2 cores). Measured: validation loss 1.88 / 1.56 / 1.46 nats per byte at steps 200 / 400 /
600 (5.56 = uniform over 259 bytes). Scale d_model, num_layers and steps up on an accelerator.

Other corpora: --config.data.text.files='~/corpus/**/*.txt', a SentencePiece tokenizer with
--config.data.text.tokenizer=sentencepiece (needs the `data` extra), or a prepared TFDS
catalog dataset with --config.data.name=tfds:lm1b. Probe the trained model with
`python eval.py --workdir runs/text --config.eval.task=positions` (loss by position and past
the training length), `...task=generate` (cached decoding) or `...task=passkey`.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.d_model = 128
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.mlp = "gated"
  config.model.position = "rope"

  config.data.name = "text"
  config.data.seq_len = 256
  config.data.text.tokenizer = "byte"

  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.1

  config.train.steps = 600
  config.train.batch_size = 16
  config.train.log_every = 50
  config.train.eval_every = 200
  config.train.eval_split = "validation"
  config.train.eval_examples = 256
  config.checkpoint.every = 200
  config.eval.split = "validation"
  config.eval.batch_size = 32
  config.eval.max_examples = 256
  return config
