"""Checks a config before anything runs: each failure is one line naming the field and the fix."""

from __future__ import annotations

from effattn import attention
from effattn.kernels import matmul
from effattn.model import pattern
from effattn.model.transformer import DTYPES
from effattn.ranges import (NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, UNIT,
                            UNIT_OPEN_TOP, ConfigError, Range)
from effattn.train import sharding

_CHOICES = {
    "model.head": ("lm", "classifier"),
    "model.mlp": ("gated", "none"),
    "model.position": ("rope", "learned", "none"),
    "model.matmul_precision": matmul.PRECISIONS,
    "optimizer.name": ("adamw", "adam", "sgd"),
    "optimizer.schedule": ("cosine", "linear", "constant"),
}

_OPTIONAL_COUNT = Range(1, integer=True, none_ok=True)  # None: derived (from the task, the model)

# The allowed range of every numeric field of configs/base.py outside model.attention (the
# mechanisms declare theirs). tests/test_ranges.py fails for a numeric field missing here.
RANGES: dict[str, Range] = {
    "seed": NON_NEGATIVE_INT,
    "model.vocab_size": Range(2, integer=True, none_ok=True),
    "model.num_classes": Range(2, integer=True, none_ok=True),
    "model.d_model": POSITIVE_INT,
    "model.num_layers": POSITIVE_INT,
    "model.num_heads": POSITIVE_INT,
    "model.mlp_hidden": _OPTIONAL_COUNT,
    "model.rope_theta": Range(1, lo_open=True),  # frequencies theta^(-2i/d) must decay
    "model.max_len": POSITIVE_INT,
    "model.norm_eps": POSITIVE,
    "data.seq_len": Range(2, integer=True),
    "data.seed": NON_NEGATIVE_INT,
    "data.mqar.vocab_size": Range(4, integer=True),
    "data.mqar.num_pairs": POSITIVE_INT,
    "data.mqar.train_examples": POSITIVE_INT,
    "data.mqar.test_examples": POSITIVE_INT,
    "data.mqar.power_a": POSITIVE,
    "data.passkey.train_examples": POSITIVE_INT,
    "data.passkey.test_examples": POSITIVE_INT,
    "data.passkey.min_length": NON_NEGATIVE_INT,
    "data.passkey.min_depth": UNIT,
    "data.passkey.max_depth": UNIT,
    "data.passkey.key_digits": POSITIVE_INT,
    "data.selective_copy.num_tokens": POSITIVE_INT,
    "data.selective_copy.num_symbols": POSITIVE_INT,
    "data.selective_copy.train_examples": POSITIVE_INT,
    "data.selective_copy.test_examples": POSITIVE_INT,
    "data.listops.min_length": NON_NEGATIVE_INT,
    "data.listops.max_length": Range(2, integer=True),
    "data.listops.max_depth": POSITIVE_INT,
    "data.listops.max_args": Range(2, integer=True),
    "data.listops.train_examples": POSITIVE_INT,
    "data.listops.validation_examples": POSITIVE_INT,
    "data.listops.test_examples": POSITIVE_INT,
    "data.text.vocab_size": POSITIVE_INT,
    "data.text.validation_fraction": UNIT_OPEN_TOP,
    "data.text.test_fraction": UNIT_OPEN_TOP,
    "data.text.max_files": NON_NEGATIVE_INT,
    "optimizer.learning_rate": POSITIVE,
    "optimizer.warmup_steps": NON_NEGATIVE_INT,
    "optimizer.min_lr_ratio": UNIT,
    "optimizer.b1": UNIT_OPEN_TOP,
    "optimizer.b2": UNIT_OPEN_TOP,
    "optimizer.eps": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.grad_clip": NON_NEGATIVE,  # 0 disables clipping
    "train.steps": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.grad_accum_steps": POSITIVE_INT,
    "train.log_every": POSITIVE_INT,
    "train.eval_every": NON_NEGATIVE_INT,  # 0: only at the end
    "train.eval_examples": _OPTIONAL_COUNT,
    "train.profile_steps": NON_NEGATIVE_INT,  # 0: no trace
    "train.profile_start": NON_NEGATIVE_INT,
    "checkpoint.every": POSITIVE_INT,
    "checkpoint.keep": POSITIVE_INT,
    "mesh.data": Range(-1, integer=True),  # -1: every device the other axes leave; 0 refused
    "mesh.fsdp": POSITIVE_INT,
    "mesh.tensor": POSITIVE_INT,
    "mesh.sequence": POSITIVE_INT,
    "eval.batch_size": POSITIVE_INT,
    "eval.max_examples": _OPTIONAL_COUNT,
    "eval.passkey.examples": POSITIVE_INT,
    "eval.passkey.seed": NON_NEGATIVE_INT,
    "eval.passkey.tokens_per_batch": NON_NEGATIVE_INT,  # 0: eval.batch_size * data.seq_len
    "eval.entropy.examples": NON_NEGATIVE_INT,  # 0: the whole split
    "eval.entropy.batch_size": POSITIVE_INT,
    "eval.positions.num_buckets": POSITIVE_INT,
    "eval.positions.max_examples": NON_NEGATIVE_INT,
    "eval.positions.tokens_per_batch": NON_NEGATIVE_INT,
    "eval.generate.num_prompts": POSITIVE_INT,
    "eval.generate.prompt_len": NON_NEGATIVE_INT,  # 0: derived from data.seq_len
    "eval.generate.max_new_tokens": NON_NEGATIVE_INT,
    "eval.generate.temperature": POSITIVE,  # greedy decoding always runs as well
    "eval.generate.top_k": NON_NEGATIVE_INT,  # 0: all tokens
    "eval.generate.seed": NON_NEGATIVE_INT,
    "eval.generate.repeats": POSITIVE_INT,
    # Shared attention fields (a mechanism also refuses the ones it does not support).
    "model.attention.num_kv_heads": _OPTIONAL_COUNT,
    "model.attention.head_dim": _OPTIONAL_COUNT,
    "model.attention.window": _OPTIONAL_COUNT,
}


def ranges() -> dict[str, Range]:
  """Every declared range by dotted field: the table above and each registered mechanism's
  option ranges (`model.attention.<name>.<option>`), so a value outside its range fails here
  whichever mechanism the config picks."""
  out = dict(RANGES)
  for name in attention.names():
    for option, allowed in attention.get(name).RANGES.items():
      out[f"model.attention.{name}.{option}"] = allowed
  return out


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _has(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def check_ranges(config) -> None:
  """Raises ConfigError naming the first field outside its declared range."""
  for field, allowed in ranges().items():
    if _has(config, field):  # a section a config dropped has nothing to check
      allowed.check(field, _get(config, field))
  if config.mesh.data == 0:
    raise ConfigError("mesh.data=0 must be -1 (every device left) or a positive count")


def check_attention(config, att) -> None:
  """One layer kind's attention config `att` against the whole config."""
  m = config.model
  hd = att.get("head_dim") or m.d_model // m.num_heads
  if m.position == "rope" and hd % 2:
    raise ConfigError(f"RoPE needs an even head dim, got {hd}; change model.attention.head_dim "
                      "or model.position")
  # The mechanism checks the shared fields it honors, impl, and its options (ranges included)
  # against the whole config.
  attention.get(att.get("name")).validate_config(config, att)


def validate(config) -> None:
  """Raises ConfigError on the first bad field."""
  check_ranges(config)
  for field, choices in _CHOICES.items():
    if _get(config, field) not in choices:
      raise ConfigError(f"{field}={_get(config, field)!r} is not one of {choices}")
  m = config.model
  if m.dtype not in DTYPES:
    raise ConfigError(f"model.dtype={m.dtype!r} is not one of {sorted(DTYPES)}")
  if not m.get("pattern") and m.attention.name not in attention.names():
    raise ConfigError(f"model.attention.name={m.attention.name!r} is unknown; registered: "
                      f"{', '.join(attention.names())}")
  if m.d_model % m.num_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} must divide model.d_model={m.d_model}")
  # Each kind of layer (model.attention, or each entry of model.pattern) is checked the same
  # way; an entry's failure names the entry before the field.
  for entry, att in pattern.distinct_attention(m):
    try:
      check_attention(config, att)
    except ConfigError as e:
      if entry is None:
        raise
      message = str(e)
      field = message.split("=", 1)[0].removeprefix("model.attention.")
      if " is not supported by " in message and f":{field}=" not in entry:  # inherited
        message = message.replace("leave it unset", f"unset it for this entry ("
                                  f"{entry.split(':')[0]}:{field}=none) or in model.attention")
      raise ConfigError(f"model.pattern entry {entry!r}: {message}") from None
  if m.position == "learned" and config.data.seq_len > m.max_len:
    raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_len={m.max_len} "
                      "for learned positions; raise model.max_len")
  sequence = config.mesh.get("sequence", 1)
  if sequence > 1 and config.data.seq_len % (2 * sequence):
    raise ConfigError(f"data.seq_len={config.data.seq_len} must be a multiple of 2 x "
                      f"mesh.sequence={sequence} (context parallelism splits it into "
                      f"{2 * sequence} chunks); pick another seq_len or mesh.sequence")
  sharding.logical_rules(config.mesh)  # a malformed mesh.rules entry fails here, in one line
  t = config.train
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} must divide "
                      f"train.batch_size={t.batch_size}")
