"""The claim sweeps (configs/sweeps/claims/): each loads, has 3 seeds and a learning-rate grid
picked by its mean, sweeps that share a name agree on the runs they share, every distinct
setting validates, and every attention setting not in configs/sweeps/*.py builds its model.

tests/test_configs.py builds every variant of configs/sweeps/*.py (not of its claims/ folder).
The claim sweeps hold ~2,000 variants, most of which differ only in seed, learning rate or a size
already covered, so this file validates one variant per distinct setting (seed and learning rate
dropped; of a grid of sizes its smallest and largest) and builds a model (abstractly, one layer)
only for the attention settings that no sweep of configs/sweeps/*.py builds already.
"""

import glob
import json
import os

import jax
import pytest
from flax import nnx

from effattn.model import Transformer, pattern
from effattn.testing.scripts import load_script
from effattn.train.loop import resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAIMS = os.path.join(ROOT, "configs", "sweeps", "claims")


def _claim_sweeps():
  lib = load_script("sweep")  # once per process, shared with the other sweep tests
  paths = sorted(p for p in glob.glob(os.path.join(CLAIMS, "*.py"))
                 if "def get_sweep(" in open(p, encoding="utf-8").read())
  return lib, {os.path.basename(p): lib.load_sweep(p, [], []) for p in paths}


_LIB, _SWEEPS = _claim_sweeps()
_TUNED = ("seed", "optimizer.learning_rate")
_SIZE = ("model.d_model", "data.seq_len")


def _distinct_models():
  """(id, config, overrides): one variant per distinct model setting over every claim sweep;
  for a grid of sizes only its smallest and largest (the grid's order is by size)."""
  cases, seen = [], set()
  for name, sweep in _SWEEPS.items():
    by_model = {}
    for v in _LIB.expand(sweep):
      model = {k: val for k, val in v.overrides.items() if k not in _TUNED}
      key = json.dumps({k: val for k, val in model.items() if k not in (*_SIZE, "task") and
                        not k.startswith("data.mqar.")}, sort_keys=True, default=str)
      by_model.setdefault(key, []).append((v, model))
    for variants in by_model.values():
      for v, model in (variants[0], variants[-1]):
        key = (sweep.config, json.dumps(model, sort_keys=True, default=str))
        if key not in seen:
          seen.add(key)
          cases.append((f"{name}:{v.name}", sweep.config, model))
  return cases


_CASES = _distinct_models()
_MODEL_KEYS = ("model.attention.", "model.num_heads", "model.causal", "model.position")
_WINDOWS = ("window", "local_window", "keep_window")  # a width, not a structure


def _attention_setting(overrides: dict) -> str:
  return json.dumps({k: v for k, v in overrides.items()
                     if k.startswith(_MODEL_KEYS) and k.rsplit(".", 1)[-1] not in _WINDOWS},
                    sort_keys=True, default=str)


def _new_attention_settings():
  """The first case of each attention setting that no sweep file of configs/sweeps/ has."""
  known = set()
  for path in glob.glob(os.path.join(ROOT, "configs", "sweeps", "*.py")):
    if "def get_sweep(" in open(path, encoding="utf-8").read():
      known.update(_attention_setting(v.overrides)
                   for v in _LIB.expand(_LIB.load_sweep(path, [], [])))
  cases = {}
  for case in _CASES:
    cases.setdefault(_attention_setting(case[2]), case)
  return [case for setting, case in cases.items() if setting not in known]


_NEW = _new_attention_settings()



def test_every_claim_sweep_has_three_seeds_and_picks_its_learning_rate():
  assert len(_SWEEPS) >= 14, sorted(_SWEEPS)
  for name, sweep in _SWEEPS.items():
    assert sweep.axes["seed"] == [0, 1, 2], name
    assert len(sweep.axes["optimizer.learning_rate"]) >= 2, name
    assert sweep.select == ("optimizer.learning_rate",), name
    roles = _LIB.axis_roles(sweep)
    assert roles["select"] == ["optimizer.learning_rate"] and roles["seeds"] == ["seed"], name
  zoology = _SWEEPS["zoology_mqar.py"]
  assert [t["label"] for t in zoology.axes["task"]] == ["T64-p4", "T128-p8", "T256-p16",
                                                         "T512-p64"]
  assert _LIB.axis_roles(zoology)["panels"] == ["task"]


def test_sweeps_sharing_a_name_share_the_runs_they_have_in_common():
  """Same sweep name = same workdirs: a variant two claim sweeps both have must have the same
  overrides (else the second would refuse the first's workdir) and the same evaluations."""
  by_name = {}
  for file, sweep in _SWEEPS.items():
    by_name.setdefault(sweep.name, []).append((file, sweep))
  shared = [group for group in by_name.values() if len(group) > 1]
  assert shared  # the text, MQAR and passkey groups
  for group in shared:
    variants = {}
    for file, sweep in group:
      assert sweep.eval_tasks == group[0][1].eval_tasks, file
      for v in _LIB.expand(sweep):
        if v.name in variants:
          assert variants[v.name] == v.overrides, (file, v.name)
        variants[v.name] = v.overrides


def _set(config, key, value):
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value


def _config(path, overrides):
  config = _LIB._load_module(path).get_config()
  for key, value in overrides.items():
    if value is not None:  # as the sweep's command line does
      _set(config, key, value)
  return resolve_config(config)  # validates: mechanism options against sizes, data fields


@pytest.mark.parametrize("path,overrides", [c[1:] for c in _CASES], ids=[c[0] for c in _CASES])
def test_every_distinct_claim_setting_validates(path, overrides):
  config = _config(path, overrides)
  assert config.model.vocab_size > 0


def test_new_attention_settings_are_few_and_named():
  labels = sorted(case[0].split("attention=")[1].split(",")[0] for case in _NEW)
  assert {"routing-all", "routing-c1", "lightning-nodecay", "titans-mag-deep"} <= set(labels)
  assert len(_NEW) <= 20, labels  # a claim sweep should reuse the families' settings


@pytest.mark.parametrize("path,overrides", [c[1:] for c in _NEW], ids=[c[0] for c in _NEW])
def test_every_new_attention_setting_builds(path, overrides):
  """The model built abstractly (no parameters), with one layer: the layers are alike."""
  config = _config(path, overrides)
  with config.unlocked():
    config.model.num_layers = len(pattern.parse(config.model.pattern)) or 1  # one period
  model = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) > 0
