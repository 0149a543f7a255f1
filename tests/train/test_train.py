"""End-to-end trainer behaviour on a tiny MQAR: learning, checkpoints, resume, mesh, guards."""

import json
import os

import jax
import pytest

from configs import base
from effattn.config import ConfigError
from effattn.evaluate.runner import evaluate_checkpoint
from effattn.testing.configs import tiny_trainer
from effattn.train import checkpoint as ckpt_lib
from effattn.train import loop
from effattn.train.metrics import read_metrics


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def train_losses(workdir):
  return [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]


def test_loss_falls_and_eval_reproduces(data_dir, tmp_path):
  config = tiny_trainer(data_dir, steps=40)
  config.optimizer.learning_rate = 1e-2
  final = loop.train_and_evaluate(config, str(tmp_path))
  losses = train_losses(str(tmp_path))
  assert losses[-1] < losses[0] - 0.3, losses
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["24", "32", "40"]  # every 8, keep 3
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
  config.train.progress_bar = False
  report = evaluate_checkpoint(ckpt_lib.merge_into(base.get_config(),
                                                   ckpt_lib.load_config(str(tmp_path))),
                               str(tmp_path))
  assert report["step"] == 40
  assert report["accuracy"] == pytest.approx(final["accuracy"], abs=1e-6)
  assert json.load(open(tmp_path / "eval.json"))["accuracy"] == report["accuracy"]


def test_resume_after_interruption_matches_uninterrupted(data_dir, tmp_path, monkeypatch):
  whole = loop.train_and_evaluate(tiny_trainer(data_dir), str(tmp_path / "whole"))

  real_put = loop.put_batch
  calls = {"n": 0}

  def dying_put(batch, sharding):
    calls["n"] += 1
    if calls["n"] == 13:  # dies during step 13: checkpoints exist for step 8 only
      raise KeyboardInterrupt("simulated kill")
    return real_put(batch, sharding)

  monkeypatch.setattr(loop, "put_batch", dying_put)
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(tiny_trainer(data_dir), str(tmp_path / "cut"))
  monkeypatch.setattr(loop, "put_batch", real_put)
  assert ckpt_lib.Checkpointer(str(tmp_path / "cut")).latest_step() == 8
  resumed = loop.train_and_evaluate(tiny_trainer(data_dir), str(tmp_path / "cut"))
  assert resumed == pytest.approx(whole, rel=1e-6, abs=1e-6)
  by_step = lambda w: {r["step"]: r["train/loss"] for r in read_metrics(w) if "train/loss" in r}
  assert by_step(str(tmp_path / "cut"))[24] == pytest.approx(by_step(str(tmp_path / "whole"))[24])


def test_gradient_accumulation_matches_full_batch(data_dir, tmp_path):
  one = loop.train_and_evaluate(tiny_trainer(data_dir, steps=6), str(tmp_path / "a"))
  acc = loop.train_and_evaluate(tiny_trainer(data_dir, steps=6, grad_accum_steps=4),
                                str(tmp_path / "b"))
  assert acc == pytest.approx(one, rel=1e-4, abs=1e-5)


def test_mesh_step_on_8_devices_matches_data_parallel(data_dir, tmp_path):
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  dp = tiny_trainer(data_dir, steps=4)
  fsdp = tiny_trainer(data_dir, steps=4)
  fsdp.mesh.data, fsdp.mesh.fsdp = 2, 4
  a = loop.train_and_evaluate(dp, str(tmp_path / "dp"))
  b = loop.train_and_evaluate(fsdp, str(tmp_path / "fsdp"))
  assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_unnamed_params_are_sharded_over_fsdp():
  from effattn.train import sharding
  config = base.get_config()
  config.mesh.data, config.mesh.fsdp = 2, 4
  mesh = sharding.make_mesh(config.mesh)
  spec = sharding.fallback_spec((64, 128), mesh)
  assert tuple(spec) == (None, "fsdp")
  assert tuple(sharding.fallback_spec((3,), mesh)) == (None,)


@pytest.mark.parametrize("field,value,match", [
    ("model.attention.name", "nope", "model.attention.name"),
    ("model.num_heads", 3, "model.num_heads"),
    ("model.attention.num_kv_heads", 3, "num_kv_heads"),
    ("train.grad_accum_steps", 5, "grad_accum_steps"),
    ("model.position", "alibi", "model.position"),
    ("model.matmul_precision", "tf32", "model.matmul_precision"),
])
def test_bad_config_fields_are_named(data_dir, tmp_path, field, value, match):
  config = tiny_trainer(data_dir)
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=match):
    loop.train_and_evaluate(config, str(tmp_path))


def test_matmul_precision_scopes_the_run(data_dir, tmp_path, monkeypatch):
  """model.matmul_precision holds while the run trains (jit traces under it); "" leaves jax's
  own setting."""
  seen = []
  monkeypatch.setattr(loop, "_train", lambda *a, **k: seen.append(
      jax.config.jax_default_matmul_precision) or {})
  config = tiny_trainer(data_dir)
  loop.train_and_evaluate(config, str(tmp_path / "unset"))
  with config.unlocked():
    config.model.matmul_precision = "tensorfloat32"
  loop.train_and_evaluate(config, str(tmp_path / "tf32"))
  assert seen == [None, "tensorfloat32"]
  assert jax.config.jax_default_matmul_precision is None  # nothing leaks past the run


def test_batch_must_divide_mesh(data_dir, tmp_path):
  config = tiny_trainer(data_dir, batch_size=12)
  with pytest.raises(ValueError, match="train.batch_size=12"):
    loop.train_and_evaluate(config, str(tmp_path))


def test_missing_and_corrupt_checkpoints_are_reported(data_dir, tmp_path):
  config = tiny_trainer(data_dir, steps=8)
  with pytest.raises(ckpt_lib.CheckpointError, match="config.json not found"):
    ckpt_lib.load_config(str(tmp_path / "none"))
  loop.train_and_evaluate(config, str(tmp_path))
  saved = ckpt_lib.merge_into(base.get_config(), ckpt_lib.load_config(str(tmp_path)))
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint for step 3"):
    evaluate_checkpoint(saved, str(tmp_path), step=3)
  for root, _, files in os.walk(tmp_path / "checkpoints" / "8" / "params"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with pytest.raises(ckpt_lib.CheckpointError, match="passes verification"):
    evaluate_checkpoint(saved, str(tmp_path))
