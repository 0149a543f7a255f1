"""Per-layer attention patterns (hybrid stacks): `model.pattern` picks each layer's mechanism.

    --config.model.pattern="3*lightning,softmax"          # L0-2 lightning, L3 softmax, repeated
    --config.model.pattern="7*lightning,softmax:window=512"
    --config.model.pattern="gated_deltanet,softmax:num_kv_heads=1"

The pattern is one period of comma-separated entries, repeated to model.num_layers (which must
be a multiple of its length). An entry is `[N*]name[:field=value[:field=value...]]`: N copies
of the mechanism `name`, configured by model.attention (the shared fields num_kv_heads,
head_dim, window, impl and the section model.attention.<name>) with the entry's fields
overriding those for this entry only. A value is typed by the field's default (`none` unsets an
optional count; a tuple option is written in brackets, `log_decay=(-1,-2)`). Empty: every layer
is model.attention.name, exactly as without patterns.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

from effattn import attention
from effattn.attention.base import SHARED_FIELDS
from effattn.ranges import ConfigError

# Shared fields an entry may override, with their defaults (which type their values).
SHARED_DEFAULTS: dict[str, Any] = {**{f: None for f in SHARED_FIELDS}, "impl": "auto"}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One layer of the pattern: mechanism `name`, its shared-field and option overrides."""

  text: str  # as written, for error messages
  name: str
  shared: tuple[tuple[str, Any], ...] = ()
  options: tuple[tuple[str, Any], ...] = ()


def _split_top(text: str, sep: str) -> list[str]:
  """Splits on `sep` outside brackets, so a tuple value may hold commas."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch in "([":
      depth += 1
    elif ch in ")]":
      depth -= 1
    elif ch == sep and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return parts


def _typed(where: str, field: str, text: str, default: Any) -> Any:
  """`text` as the type of `default` (None: an optional integer count)."""
  raw, low = text.strip(), text.strip().lower()
  try:
    if default is None:
      return None if low == "none" else int(raw)
    if isinstance(default, bool):
      if low not in ("true", "false", "1", "0"):
        raise ValueError
      return low in ("true", "1")
    if isinstance(default, int):
      return int(raw)
    if isinstance(default, float):
      return float(raw)
    if isinstance(default, (tuple, list)):
      value = ast.literal_eval(raw)
      if not isinstance(value, (tuple, list)):
        raise ValueError
      return tuple(value)
  except (ValueError, SyntaxError):
    kind = {type(None): "an integer or none", bool: "true or false", int: "an integer",
            float: "a number", tuple: "a bracketed list such as (1,2)",
            list: "a bracketed list such as (1,2)"}[type(default)]
    raise ConfigError(f"{where}: {field}={raw!r} must be {kind}") from None
  return raw


def parse_entry(text: str) -> tuple[int, Entry]:
  """'3*softmax:window=64' -> (3, Entry('softmax', shared=(('window', 64),)))."""
  where = f"model.pattern entry {text.strip()!r}"
  count, body = 1, text.strip()
  head, star, rest = body.partition("*")
  if star and head.strip().isdigit():
    count, body = int(head), rest.strip()
    if count < 1:
      raise ConfigError(f"{where}: the count before '*' must be a positive integer")
  name, *fields = [p.strip() for p in _split_top(body, ":")]
  if name not in attention.names():
    hint = "; write the count first, as in '3*lightning'" if "*" in name else ""
    raise ConfigError(f"{where}: unknown attention mechanism {name!r}; registered: "
                      f"{', '.join(attention.names())}{hint}")
  defaults = attention.get(name).DEFAULTS
  shared, options = {}, {}
  for item in fields:
    field, eq, value = item.partition("=")
    field = field.strip()
    if not eq or not field:
      raise ConfigError(f"{where}: {item!r} must look like field=value (e.g. window=64)")
    if field in shared or field in options:
      raise ConfigError(f"{where}: {field} is given twice")
    if field in SHARED_DEFAULTS:
      shared[field] = _typed(where, field, value, SHARED_DEFAULTS[field])
    elif field in defaults:
      options[field] = _typed(where, field, value, defaults[field])
    else:
      raise ConfigError(f"{where}: {name} has no field {field!r}; its options: "
                        f"{', '.join(sorted(defaults)) or 'none'}; shared: "
                        f"{', '.join(SHARED_DEFAULTS)}")
  return count, Entry(text.strip(), name, tuple(shared.items()), tuple(options.items()))


def parse(pattern: str) -> tuple[Entry, ...]:
  """One period of the pattern, counts expanded; () for an empty pattern."""
  if not pattern or not pattern.strip():
    return ()
  entries = []
  for text in _split_top(pattern, ","):
    if not text.strip():
      raise ConfigError(f"model.pattern={pattern!r} has an empty entry; separate mechanisms "
                        "by single commas, e.g. '3*lightning,softmax'")
    count, entry = parse_entry(text)
    entries += [entry] * count
  return tuple(entries)


def entry_attention(attention_cfg: Any, entry: Entry) -> dict[str, Any]:
  """The attention config of one entry: model.attention's shared fields and the mechanism's
  section, with the entry's fields over them (a mapping registry.build and validation read)."""
  get = attention_cfg.get
  section = get(entry.name, None)
  cfg = {field: get(field, default) for field, default in SHARED_DEFAULTS.items()}
  cfg.update(entry.shared)
  cfg["name"] = entry.name
  cfg[entry.name] = {**(dict(section.items()) if section is not None else {}),
                     **dict(entry.options)}
  return cfg


def _entries(model_cfg: Any) -> tuple[Entry, ...]:
  pattern = model_cfg.get("pattern", "") or ""
  entries = parse(pattern)
  if entries and model_cfg.num_layers % len(entries):
    raise ConfigError(f"model.num_layers={model_cfg.num_layers} is not a multiple of the "
                      f"{len(entries)} layers of model.pattern={pattern!r}; set num_layers to a "
                      f"multiple of {len(entries)} or change the pattern")
  return entries


def layer_attention(model_cfg: Any) -> list[Any]:
  """The attention config of every layer: model.attention itself without a pattern."""
  entries = _entries(model_cfg)
  if not entries:
    return [model_cfg.attention] * model_cfg.num_layers
  period = [entry_attention(model_cfg.attention, e) for e in entries]
  return [period[i % len(period)] for i in range(model_cfg.num_layers)]


def distinct_attention(model_cfg: Any) -> list[tuple[str | None, Any]]:
  """(entry text or None, attention config) of each distinct layer kind, for validation."""
  entries = _entries(model_cfg)
  if not entries:
    return [(None, model_cfg.attention)]
  seen = {}
  for e in entries:
    seen.setdefault(e.text, entry_attention(model_cfg.attention, e))
  return list(seen.items())


def describe(model_cfg: Any) -> str:
  """The stack's mechanisms for logs and plot titles: the pattern, or model.attention.name."""
  pattern = (model_cfg.get("pattern", "") or "").strip()
  return pattern or model_cfg.attention.name
