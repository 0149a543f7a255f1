"""Checks a config before anything runs: each failure is one line naming the field and the fix."""

from __future__ import annotations

from effattn import attention
from effattn.model.transformer import DTYPES
from effattn.ranges import ConfigError

_CHOICES = {
    "model.head": ("lm", "classifier"),
    "model.mlp": ("gated", "none"),
    "model.position": ("rope", "learned", "none"),
    "optimizer.name": ("adamw", "adam", "sgd"),
    "optimizer.schedule": ("cosine", "linear", "constant"),
}


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def validate(config) -> None:
  """Raises ConfigError on the first bad field."""
  for field, choices in _CHOICES.items():
    if _get(config, field) not in choices:
      raise ConfigError(f"{field}={_get(config, field)!r} is not one of {choices}")
  m = config.model
  if m.dtype not in DTYPES:
    raise ConfigError(f"model.dtype={m.dtype!r} is not one of {sorted(DTYPES)}")
  if m.attention.name not in attention.names():
    raise ConfigError(f"model.attention.name={m.attention.name!r} is unknown; registered: "
                      f"{', '.join(attention.names())}")
  for field in ("d_model", "num_layers", "num_heads"):
    if m[field] <= 0:
      raise ConfigError(f"model.{field}={m[field]} must be positive")
  if m.d_model % m.num_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} must divide model.d_model={m.d_model}")
  hd = m.attention.head_dim or m.d_model // m.num_heads
  if m.position == "rope" and hd % 2:
    raise ConfigError(f"RoPE needs an even head dim, got {hd}; change model.attention.head_dim "
                      "or model.position")
  # The mechanism checks the shared fields it honors, impl, and its options (ranges included)
  # against the whole config.
  attention.get(m.attention.name).validate_config(config)
  if m.position == "learned" and config.data.seq_len > m.max_len:
    raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_len={m.max_len} "
                      "for learned positions; raise model.max_len")
  t = config.train
  if t.steps <= 0:
    raise ConfigError(f"train.steps={t.steps} must be positive")
  if t.batch_size <= 0 or t.grad_accum_steps <= 0 or t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} must divide "
                      f"train.batch_size={t.batch_size}")
  if t.log_every <= 0:
    raise ConfigError(f"train.log_every={t.log_every} must be positive")
  if config.checkpoint.every <= 0 or config.checkpoint.keep <= 0:
    raise ConfigError("checkpoint.every and checkpoint.keep must be positive")
  if config.optimizer.learning_rate <= 0:
    raise ConfigError(f"optimizer.learning_rate={config.optimizer.learning_rate} must be > 0")
  if config.data.seq_len <= 0:
    raise ConfigError(f"data.seq_len={config.data.seq_len} must be positive")
  for axis in ("fsdp", "tensor"):
    if config.mesh[axis] <= 0:
      raise ConfigError(f"mesh.{axis}={config.mesh[axis]} must be positive")
