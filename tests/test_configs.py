"""Config files load and validate, and every field is overridable from the command line."""

import glob
import json
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import base
from effattn.config import validate

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
