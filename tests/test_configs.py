"""Config files load and validate, and every field is overridable from the command line."""

import glob
import json
import os
import subprocess
import sys

import jax
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from configs import base
from effattn.config import validate
from effattn.evaluate.registry import default_options, task_options
from effattn.model import Transformer
from effattn.testing.scripts import load_script
from effattn.train.checkpoint import save_config
from effattn.train.loop import resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if os.path.basename(p) not in ("__init__.py", "saved.py"))


def leaves(cfg, prefix=""):
  for key in cfg.keys():
    value = cfg[key]
    if hasattr(value, "keys"):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def parse(path, overrides):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", path, flag_values=fv)
  argv = ["prog", f"--config={path}", *overrides]
  fv(argv, known_only=True)  # as absl.app does: --config first defines the override flags
  fv(argv)
  return fv.config


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_files_validate(path):
  validate(parse(path, []))


_PRINT_OVERRIDDEN = """
import json, sys
from absl import app
from ml_collections import config_flags
CONFIG = config_flags.DEFINE_config_file("config")
def main(_):
  out = {}
  for key in sys.argv[1].split(","):
    node = CONFIG.value
    for part in key.split("."):
      node = node[part]
    out[key] = node
  print(json.dumps(out))
app.run(main, argv=[sys.argv[0], *sys.argv[2:]])
"""


def test_optional_counts_are_overridable_from_the_command_line():
  optional = [k for k, v in leaves(base.get_config()) if v is None]
  assert "model.attention.moh.num_shared_heads" in optional
  out = subprocess.run(
      [sys.executable, "-c", _PRINT_OVERRIDDEN, ",".join(optional),
       f"--config={os.path.join(ROOT, 'configs', 'base.py')}",
       *[f"--config.{k}=2" for k in optional]],
      capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
      check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {k: 2 for k in optional}


def test_documented_eval_task_options_override_a_saved_config(tmp_path):
  """`eval.py --workdir W --config.eval.task=passkey --config.eval.passkey.examples=32` (eval.py
  reads configs/saved.py:W): the eval task sections are declared, so the override parses."""
  save_config(base.get_config(), str(tmp_path))
  out = subprocess.run(
      [sys.executable, "-c", _PRINT_OVERRIDDEN, "eval.task,eval.passkey.examples",
       f"--config={os.path.join(ROOT, 'configs', 'saved.py')}:{tmp_path}",
       "--config.eval.task=passkey", "--config.eval.passkey.examples=32"],
      capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
      check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {"eval.task": "passkey",
                                                             "eval.passkey.examples": 32}
  config = base.get_config()
  for task, options in default_options().items():  # every task with options has its section
    assert config.eval[task].to_dict() == options, task
  config.eval.passkey.examples = 32
  assert task_options(config, "passkey").examples == 32


def _sweep_variants():
  """(id, config file, overrides) of every variant of every sweep file, and each config file."""
  sweep_lib = load_script("sweep")  # one import per process, shared with test_sweep.py
  cases = [(os.path.basename(p), p, {}) for p in CONFIG_FILES]
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "sweeps", "*.py"))):
    if "def get_sweep(" not in open(path, encoding="utf-8").read():
      continue  # a helper module of the sweeps (families.py)
    sweep = sweep_lib.load_sweep(path, [], [])
    for variant in sweep_lib.expand(sweep):
      cases.append((f"{os.path.basename(path)}:{variant.name}", sweep.config, variant.overrides))
  return cases


def _set(config, key, value):
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value


_CASES = _sweep_variants()


# Parameter counts of the models built so far, by model config: the variants of a sweep that
# differ only outside config.model (data, train) build one model.
_PARAMS_BY_MODEL: dict[str, int] = {}


@pytest.mark.parametrize("path,overrides", [c[1:] for c in _CASES], ids=[c[0] for c in _CASES])
def test_every_config_and_sweep_variant_builds_its_model(path, overrides):
  """Validated, task fields filled in, and the model built abstractly (no parameters)."""
  config = parse(path, [])
  with config.unlocked():
    for key, value in overrides.items():
      if value is not None:  # as the sweep's command line does
        _set(config, key, value)
  config = resolve_config(config)
  key = config.model.to_json_best_effort(sort_keys=True)
  if key not in _PARAMS_BY_MODEL:
    model = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    _PARAMS_BY_MODEL[key] = sum(x.size for x in jax.tree.leaves(params))
  assert _PARAMS_BY_MODEL[key] > 0
