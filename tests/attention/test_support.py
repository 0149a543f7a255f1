"""Mechanisms say what they support: a shared field a mechanism ignores fails naming both, and
config.validate runs each mechanism's checks (options' ranges, impl, forced kernels' shapes)."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import base as base_config
from effattn import attention
from effattn.attention import base
from effattn.config import validate
from effattn.ranges import ConfigError
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import build

# Shared fields at a non-default value for d_model 32 and 4 heads (head dim 8 by default).
SHARED = {"window": 4, "num_kv_heads": 2, "head_dim": 16}
# Options a mechanism needs so that the field can make a difference at T = 12.
OPTIONS = {"landmark": {"landmark": {"block_len": 4}},
           "sqa": {"sqa": {"variant": "general"}}}


def _cases():
  for name in attention.names():
    for field in SHARED:
      yield name, field
  for variant in ("mac", "lmm"):  # neural_memory's support depends on the variant
    for field in SHARED:
      yield f"neural_memory:{variant}", field


@pytest.mark.parametrize("name,field", list(_cases()))
def test_a_shared_field_is_honored_or_refused(name, field):
  name, _, variant = name.partition(":")
  options = dict(OPTIONS.get(name, {}))
  if variant:
    options = {name: {"variant": variant}}
  cls = attention.get(name)
  opts = base.mechanism_options(options, name, cls.DEFAULTS)
  if not cls.supports(field, opts):
    with pytest.raises(ConfigError) as err:
      build(name, impl="xla", **{field: SHARED[field]}, **options)
    message = str(err.value)
    assert "\n" not in message and f"model.attention.{field}=" in message and name in message
    return
  module = build(name, impl="xla", **{field: SHARED[field]}, **options)
  if field == "window":  # honored means it changes the output
    x, pos = random_inputs(batch=1)
    y, _ = module(x, positions=pos)
    y0, _ = build(name, impl="xla", **options)(x, positions=pos)
    assert not np.allclose(np.asarray(y), np.asarray(y0)), f"{name} ignores window"


def test_six_mechanisms_refuse_a_window_they_would_ignore():
  refuse = [n for n in attention.names()
            if not attention.get(n).supports("window", base.mechanism_options(
                {}, n, attention.get(n).DEFAULTS))]
  assert set(refuse) >= {"routing", "landmark", "dynamic_mask", "linear", "lightning", "mala"}
  assert "softmax" not in refuse and "sqa" not in refuse


def config_with(name, **fields):
  config = base_config.get_config()
  m = config.model
  m.d_model, m.num_heads = 64, 4
  m.attention.name = name
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


@pytest.mark.parametrize("name", attention.names())
def test_every_option_range_is_checked_at_config_time(name):
  cls = attention.get(name)
  validate(config_with(name))
  for option, allowed in cls.RANGES.items():
    bad = allowed.outside()
    with pytest.raises(ConfigError, match=rf"^model.attention.{name}.{option}="):
      validate(config_with(name, **{f"model.attention.{name}.{option}": bad}))
  for option in cls.CHOICES:
    with pytest.raises(ConfigError, match=rf"^model.attention.{name}.{option}='bogus' must be"):
      validate(config_with(name, **{f"model.attention.{name}.{option}": "bogus"}))


@pytest.mark.parametrize("fields,match", [
    ({"model.attention.routing.decay": 2.0}, r"routing.decay=2.0 must be in \[0, 1\)"),
    ({"model.attention.name": "neural_memory", "model.attention.neural_memory.max_lr": -1.0},
     r"neural_memory.max_lr=-1.0 must be > 0"),
    ({"model.attention.window": 8}, r"model.attention.window=8 is not supported by routing"),
    ({"model.attention.impl": "pallas"},
     r"impl='pallas': routing's block_sparse op cannot run it \(pallas_mosaic_gpu: head_dim=16"),
    ({"model.attention.impl": "cudnn", "model.attention.name": "softmax"},
     r"impl='cudnn': softmax's softmax op cannot run it \(cudnn: dtype float32"),
    ({"model.attention.impl": "cudnn", "model.attention.name": "linear"},
     r"impl='cudnn': no op of linear has that path"),
    ({"model.attention.impl": "flash"}, r"impl='flash' is not one of"),
    ({"model.attention.name": "neural_memory", "model.attention.impl": "pallas_gpu",
      "model.attention.neural_memory.depth": 2},
     r"memory_chunk op cannot run it \(pallas_gpu: depth=2"),
    ({"model.attention.name": "landmark", "model.causal": False}, r"model.causal=False: landmark"),
    ({"model.attention.name": "landmark", "model.attention.landmark.max_groups": 1},
     r"landmark.max_groups=1 holds fewer block tiles"),
    ({"model.attention.routing.block": 48}, r"routing.block=48 must be a power of two"),
    ({"model.attention.name": "moh", "model.attention.moh.block_q": 24},
     r"moh.block_q=24 must be a power of two >= 16"),
])
def test_config_time_errors_are_one_line(fields, match):
  config = config_with("routing")
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  with pytest.raises(ConfigError, match=match) as err:
    validate(config)
  assert "\n" not in str(err.value)


def test_forced_kernels_that_fit_validate():
  validate(config_with("routing", **{"model.d_model": 256, "model.attention.impl": "pallas"}))
  validate(config_with("softmax", **{"model.attention.impl": "cudnn", "model.dtype": "bfloat16"}))


def test_sizes_read_the_shared_fields_once():
  sizes = base.Sizes.read({"num_kv_heads": 2, "window": 5, "impl": "xla"}, d_model=32,
                          num_heads=4, dtype="bfloat16")
  assert (sizes.head_dim, sizes.num_kv_heads, sizes.window, sizes.impl) == (8, 2, 5, "xla")
  assert sizes.dtype == jnp.bfloat16
  assert sizes.given("window") and sizes.given("num_kv_heads") and not sizes.given("head_dim")
  module = build("softmax", num_kv_heads=2, window=5)
  assert (module.num_kv_heads, module.window, module.head_dim) == (2, 5, 8)
