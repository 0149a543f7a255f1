"""The quality grid shared by every mechanism family: one labelled variant per mechanism setting.

Each variant is a dict of overrides with a `label` (the sweep's series name). `window` is the
short-range budget W given to everything that has one: the sliding-window baseline, the local
heads of routing, the keys dynamic_mask keeps per query and the sliding-window branch of Titans'
MAG and MAL (MAC attends within its segments and takes no window), so that "does it retrieve
beyond W" is the question every row answers. Used by
configs/sweeps/mqar_families.py and configs/sweeps/passkey_families.py.
"""

# The linear-scan family takes no RoPE (it would break the positive features their normalizers
# rely on): learned absolute positions, as in configs/sweeps/mqar_linear.py.
_LEARNED = {"model.position": "learned"}


def _name(name: str, **options) -> dict:
  overrides = {"model.attention.name": name}
  overrides.update({f"model.attention.{name}.{k}": v for k, v in options.items()})
  return overrides


def variants(window: int, num_heads: int = 4) -> list[dict]:
  """Every family at one model size; num_heads must be 4 (the head presets below assume it)."""
  if num_heads != 4:
    raise ValueError(f"{num_heads=}: the family grid is written for 4 heads")
  w = {"model.attention.window": window}
  return [
      # baselines (issue: foundation)
      {"label": "mha", **_name("softmax")},
      {"label": "gqa", **_name("softmax"), "model.attention.num_kv_heads": 2},
      {"label": f"swa{window}", **_name("softmax"), **w},
      # linear family
      {"label": "linear", **_name("linear"), **_LEARNED},
      {"label": "mala", **_name("mala"), **_LEARNED},
      {"label": "lightning", **_name("lightning"), **_LEARNED},
      # the delta rule (no positions needed: its convs and decay order the tokens)
      {"label": "gated_deltanet", **_name("gated_deltanet")},
      # sparse family
      {"label": "routing", **_name("routing", local_window=window)},
      {"label": "landmark", **_name("landmark")},
      {"label": "dynamic_mask", **_name("dynamic_mask", keep_window=window)},
      # head efficiency: H_q/H_kv = 2/1, 2/2, 1/1; MoH with 3 and 2 of 4 heads active
      {"label": "sqa", **_name("sqa", variant="sqa")},
      {"label": "ssqa", **_name("sqa", variant="ssqa")},
      {"label": "xsqa", **_name("sqa", variant="xsqa")},
      {"label": "moh75", **_name("moh")},
      {"label": "moh50", **_name("moh", num_shared_heads=1, top_k=1)},
      # neural memory (Titans) with the same attention window
      {"label": "titans-mac", **_name("neural_memory", variant="mac")},
      {"label": "titans-mag", **_name("neural_memory", variant="mag"), **w},
      {"label": "titans-mal", **_name("neural_memory", variant="mal"), **w},
  ]
