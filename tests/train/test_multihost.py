"""The trainer on a mesh and across processes: kernels see the mesh, each process reads only its
rows, one process writes, and train.profile_steps writes a trace of its window."""

import glob
import os

import jax
import numpy as np
import pytest

from effattn import data as data_lib
from effattn.kernels import dispatch
from effattn.kernels import mesh as kernel_mesh
from effattn.train import loop, sharding
from effattn.train.checkpoint import save_config
from effattn.train.metrics import MetricWriter
from effattn.testing.configs import tiny_trainer as tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


class _Traced(Exception):
  """Stops the run once the first kernel has been traced (nothing compiles)."""


def test_the_step_is_traced_with_the_mesh_ambient(data_dir, tmp_path, monkeypatch):
  seen = []

  def spy():
    seen.append(jax.sharding.get_abstract_mesh())
    raise _Traced

  monkeypatch.setattr(kernel_mesh, "ambient_mesh", spy)
  config = tiny_config(data_dir, steps=1)
  config.model.attention.name, config.model.attention.impl = "linear", "auto"
  config.mesh.data, config.mesh.tensor = 4, 2  # 2 heads of 16: one per tensor shard
  with dispatch.interpret_kernels("gpu"), pytest.raises(_Traced):
    loop.train_and_evaluate(config, str(tmp_path))
  assert dict(seen[0].shape) == {"data": 4, "fsdp": 1, "sequence": 1, "tensor": 2}


def test_one_device_mesh_is_not_made_ambient():
  one = sharding.make_mesh(tiny_config("").mesh, devices=jax.devices()[:1])
  with sharding.ambient(one):
    assert jax.sharding.get_abstract_mesh().empty
  with sharding.ambient(sharding.make_mesh(tiny_config("").mesh)):
    assert jax.sharding.get_abstract_mesh().size == 8


def test_each_process_reads_its_rows_of_the_eval_batches(data_dir):
  cfg = tiny_config(data_dir).data
  whole = list(data_lib.eval_batches(cfg, "test", 24))  # 64 examples: the last batch is padded
  parts = [list(data_lib.eval_batches(cfg, "test", 24, process_index=i, process_count=4))
           for i in range(4)]
  for b, batch in enumerate(whole):
    for key, value in batch.items():
      np.testing.assert_array_equal(np.stack([p[b][key] for p in parts], 1).reshape(value.shape),
                                    value, err_msg=key)
  assert not whole[-1]["weights"][16:].any() and whole[-1]["weights"][:16].any()
  with pytest.raises(ValueError, match="process_count"):
    next(data_lib.eval_batches(cfg, "test", 24, process_count=5))


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  save_config(tiny_config(""), str(tmp_path))
  writer = MetricWriter(str(tmp_path))
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert os.listdir(tmp_path) == []


def test_profile_steps_trace_their_window(data_dir, tmp_path):
  config = tiny_config(data_dir, d_model=16, steps=2, profile_start=1, profile_steps=1,
                       eval_examples=16)
  config.model.num_layers = 1
  loop.train_and_evaluate(config, str(tmp_path))
  assert glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))


def test_a_row_shared_by_two_processes_is_refused():
  """Devices along sequence x tensor of one batch shard must be one process's: each process
  feeds only its own rows."""
  host = lambda p: type("Device", (), {"process_index": p})()  # noqa: E731
  within = np.asarray([host(p) for p in (0, 0, 1, 1)]).reshape(2, 1, 2, 1)
  sharding.check_process_groups(within)  # data=2 over hosts, sequence=2 on each: fine
  across = np.asarray([host(p) for p in (0, 1, 0, 1)]).reshape(1, 2, 1, 2)
  with pytest.raises(ValueError, match="batch shard 0 span processes \\[0, 1\\].*mesh.sequence x "
                     "mesh.tensor fit in one host"):
    sharding.check_process_groups(across)
