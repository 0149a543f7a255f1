"""The full config tree every job starts from; task configs override parts of it.

    python train.py --config configs/mqar.py --workdir runs/mqar \
        --config.model.attention.name=softmax --config.train.steps=2000

Every field below can be overridden on the command line; `effattn.config.validate` checks the
result before anything runs.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from effattn import attention
from effattn.data import registry as data_registry
from effattn.evaluate import registry as eval_registry


def attention_config() -> ml_collections.ConfigDict:
  """Shared attention fields plus one section of options per registered mechanism."""
  cfg = ml_collections.ConfigDict()
  cfg.name = "softmax"  # any of effattn.attention.names()
  cfg.num_kv_heads = ml_collections.FieldReference(None, field_type=int)  # None: = num_heads
  cfg.head_dim = ml_collections.FieldReference(None, field_type=int)  # None: d_model / num_heads
  cfg.window = ml_collections.FieldReference(None, field_type=int)  # sliding window, None: full
  # A shared field set for a mechanism that does not honor it (base.Attention.SUPPORTS) fails.
  # auto | pallas | a path of one of its ops (pallas_gpu, pallas_mosaic_gpu, pallas_tpu,
  # block_sparse, cudnn, xla, reference): effattn/kernels/dispatch.py
  # maps it to each op of the mechanism; one no op of the mechanism has fails at config time.
  cfg.impl = "auto"
  for name in attention.names():
    cfg[name] = options_section(attention.get(name).DEFAULTS)
  return cfg


def options_section(defaults: dict) -> ml_collections.ConfigDict:
  """A mechanism's DEFAULTS (or an eval task's options) as a config section. A None default
  ("derive it from the model") is an integer count in every mechanism, so it becomes an
  int-typed reference: a bare None field could not be overridden from the command line."""
  return ml_collections.ConfigDict({
      k: ml_collections.FieldReference(None, field_type=int) if v is None else v
      for k, v in defaults.items()})


def data_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.name = "mqar"  # a task of effattn.data.TASKS, or "tfds:<catalog name>" prepared by you
  cfg.data_dir = "~/effattn_data"  # TFDS data_dir; builders prepare themselves here on first use
  cfg.seq_len = 64  # tokens per example
  cfg.seed = 0  # generation seed of synthetic tasks
  for name, task in data_registry.TASKS.items():
    cfg[name] = ml_collections.ConfigDict(dataclasses.asdict(task.options()))
  return cfg


def logical_axis_rules() -> tuple:
  """config.mesh.rules: (logical name, mesh axes) pairs, as MaxText's logical_axis_rules.

  Each dimension of a parameter or constrained activation takes the first rule for its name
  whose mesh axes have size > 1, are free in that array and divide it (whole heads for a
  `*heads` dim); None, or no rule that fits, keeps it whole. The names and the rule in full:
  effattn/logical_axes.py. Override as a whole, e.g.
  --config.mesh.rules="(('embed', 'fsdp'), ('mlp', 'tensor'))" (every name left out is whole).
  """
  return (
      # Parameters: FSDP over fsdp on d_model; Megatron tensor parallelism over tensor.
      ("vocab", "tensor"),  # embedding rows, LM-head columns (a vocab-parallel softmax)
      ("embed", "fsdp"),  # d_model of every weight
      ("heads", "tensor"),  # q / per-head gates by output columns, the output proj by rows
      ("kv_heads", "tensor"),  # k / v by output columns (kept whole when H_kv does not split)
      ("mlp", "tensor"),  # MLP gate / up by output columns, down by input rows
      ("norm", None),  # norm scales: replicated
      # Activations, constrained at block boundaries and on the attention heads.
      ("act_batch", ("data", "fsdp")),
      ("act_length", "sequence"),  # T: whole, or split over mesh.sequence (its zig-zag chunks)
      ("act_embed", None),  # the residual stream is whole over tensor between blocks
      ("act_heads", "tensor"),  # as kernels/mesh.py splits a kernel's heads
      ("act_mlp", "tensor"),
      ("act_vocab", "tensor"),  # logits, and the embedding table where it is looked up
  )


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # parameter init and batch order

  config.model = model = ml_collections.ConfigDict()
  model.vocab_size = ml_collections.FieldReference(None, field_type=int)  # None: from the task
  model.num_classes = ml_collections.FieldReference(None, field_type=int)  # classifier tasks
  model.head = "lm"  # lm | classifier
  model.causal = True
  model.d_model = 128
  model.num_layers = 2
  model.num_heads = 2
  model.mlp = "gated"  # gated (SwiGLU) | none (attention-only, as in Zoology's MQAR models)
  model.mlp_hidden = ml_collections.FieldReference(None, field_type=int)  # None: 8/3 d_model
  model.position = "rope"  # rope | learned | none
  model.rope_theta = 10000.0
  model.max_len = 4096  # learned positions only
  model.tie_embeddings = False
  model.norm_eps = 1e-6
  model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  # jax_default_matmul_precision of training and eval: "" keeps jax's own setting (the
  # JAX_DEFAULT_MATMUL_PRECISION variable, or unset); "tensorfloat32" puts float32 matmuls,
  # the kernels' included, on TF32 tensor cores (GPU), "float32" keeps them exact.
  model.matmul_precision = ""
  model.remat = False
  model.attention = attention_config()
  # Hybrid stacks: each layer's mechanism, one period repeated to num_layers, e.g.
  # "3*lightning,softmax:window=512" (effattn/model/pattern.py). Empty: every layer is
  # model.attention.name. Entries take model.attention's fields and override them per entry.
  model.pattern = ""

  config.data = data_config()

  config.optimizer = opt = ml_collections.ConfigDict()
  opt.name = "adamw"  # adamw | adam | sgd
  opt.learning_rate = 3e-3
  opt.schedule = "cosine"  # cosine | linear | constant (all after linear warmup)
  opt.warmup_steps = 100
  opt.min_lr_ratio = 0.1  # final lr / peak lr
  opt.b1 = 0.9
  opt.b2 = 0.98
  opt.eps = 1e-8
  opt.weight_decay = 0.1
  opt.grad_clip = 1.0  # global norm; 0 disables

  config.train = train = ml_collections.ConfigDict()
  train.steps = 1000
  train.batch_size = 64  # global batch, split over the data and fsdp mesh axes
  train.grad_accum_steps = 1  # micro-batches per step (batch_size must divide evenly)
  train.log_every = 50
  train.eval_every = 500  # 0: only at the end
  train.eval_examples = ml_collections.FieldReference(None, field_type=int)  # None: whole split
  train.eval_split = "test"
  train.progress_bar = True
  train.profile_steps = 0  # > 0: a jax.profiler trace of that many steps, in <workdir>/profile
  train.profile_start = 10  # the trace starts after this many steps (past the compiling one)

  config.checkpoint = ckpt = ml_collections.ConfigDict()
  ckpt.every = 500  # steps between checkpoints (the last step is always saved)
  ckpt.keep = 3
  ckpt.async_save = True

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: every device not used by the other axes
  mesh.fsdp = 1
  mesh.tensor = 1
  mesh.sequence = 1  # > 1: context parallelism, T split over it (docs/scaling.md)
  mesh.distributed = False  # call jax.distributed.initialize() (multi-host)
  mesh.rules = logical_axis_rules()

  config.eval = ev = ml_collections.ConfigDict()
  ev.task = "accuracy"  # what eval.py computes (see effattn.evaluate)
  ev.split = "test"
  ev.batch_size = 64
  ev.max_examples = ml_collections.FieldReference(None, field_type=int)
  # One section of options per eval task that has them (--config.eval.passkey.examples=32).
  for task, options in eval_registry.default_options().items():
    ev[task] = options_section(options)
  return config
