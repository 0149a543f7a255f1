"""Every numeric config field has a declared range, and validate refuses a value outside it."""

import pytest

from configs import base
from effattn import config as config_lib
from effattn.config import ConfigError



def numeric_fields(cfg, prefix=""):
  """Dotted names of every int/float field (bools excluded), None-valued typed ones included."""
  for key in cfg.keys():
    value, name = cfg[key], f"{prefix}{key}"
    if hasattr(value, "keys"):
      yield from numeric_fields(value, f"{name}.")
    elif isinstance(value, bool):
      continue
    elif isinstance(value, (int, float)) or (value is None and
                                             cfg.get_type(key) in (int, float)):
      yield name


FIELDS = sorted(numeric_fields(base.get_config()))


def set_field(config, dotted, value):
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def test_every_numeric_field_declares_a_range():
  missing = [f for f in FIELDS if f not in config_lib.ranges()]
  assert not missing, (f"declare a Range for these fields in effattn.config.RANGES (or a "
                       f"mechanism's RANGES): {missing}")
  stale = [f for f in config_lib.ranges() if f not in FIELDS]
  assert not stale, f"RANGES names fields configs/base.py does not have: {stale}"


def test_base_config_is_inside_every_range():
  config_lib.check_ranges(base.get_config())


@pytest.mark.parametrize("field", FIELDS)
def test_a_value_outside_the_range_is_refused_naming_the_field(field):
  config = base.get_config()
  bad = config_lib.ranges()[field].outside()
  set_field(config, field, bad)
  with pytest.raises(ConfigError, match=rf"^{field}=") as err:
    config_lib.validate(config)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("field,value", [("optimizer.b1", 1.5), ("optimizer.warmup_steps", -10),
                                         ("train.eval_every", -10), ("mesh.data", 0)])
def test_reported_silent_settings_fail_at_config_time(field, value):
  config = base.get_config()
  set_field(config, field, value)
  with pytest.raises(ConfigError, match=field):
    config_lib.validate(config)
