"""Fault injection: no fault loses a step that was reported saved, none exits 0 with a wrong result.

Each test is a row of docs/reliability.md. Runs are tiny MQAR models (d_model 16, 8 steps, a
checkpoint every 2 steps, async saves). Real processes are used only where a process death or a
signal is the point (SIGKILL, SIGINT, SIGTERM, a second run holding the lock); everything else
runs in this process with the fault patched in.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import base
from effattn import cli
from effattn import data as data_lib
from effattn.config import ConfigError
from effattn.evaluate import runner
from effattn.testing.configs import tiny_subprocess_trainer
from effattn.train import checkpoint as ckpt_lib
from effattn.train import loop, manifest
from effattn.train.errors import (CheckpointError, Interrupted, NonFiniteLossError, SaveError,
                                  WorkdirError)
from effattn.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def config_for(data_dir, **fields):
  """The subprocess runs' config (tests/train/tiny.py) with dotted overrides."""
  config = tiny_subprocess_trainer(data_dir)
  for dotted, value in fields.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """An uninterrupted run: (workdir, final eval) every resumed run must reproduce exactly."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  return workdir, loop.train_and_evaluate(config_for(data_dir), workdir)


def copy_of(workdir, tmp_path, name="run"):
  dest = str(tmp_path / name)
  shutil.copytree(workdir, dest)
  return dest


def final_params(workdir):
  config = ckpt_lib.merge_into(base.get_config(), ckpt_lib.load_config(workdir))
  model, step = runner.restore_model(config, workdir)
  return step, jax.device_get(nnx.state(model, nnx.Param))


def assert_same_params(workdir, reference_workdir):
  step, params = final_params(workdir)
  ref_step, ref_params = final_params(reference_workdir)
  assert step == ref_step == STEPS
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)  # bit-identical


def tmp_folders(workdir):
  return [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]


# Real processes: a runner that delivers the fault from inside train.py's own process.
_FAULT_RUNNER = """
import os, runpy, signal, sys
from effattn.train import loop, manifest
fault, at = os.environ["FAULT"], int(os.environ["FAULT_AT"])
# As from a terminal: a parent (a pytest-xdist worker) may pass SIGINT down ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
if fault == "before_seal":  # SIGKILL after orbax committed step `at`, before its manifest
  real_seal = manifest.seal
  def seal(step_dir):
    if int(os.path.basename(step_dir)) == at:
      os.kill(os.getpid(), signal.SIGKILL)
    return real_seal(step_dir)
  manifest.seal = seal
else:  # the signal arrives while the process loads the batch of its `at`-th step
  real_put, calls = loop.put_batch, [0]
  def put(batch, sharding):
    calls[0] += 1
    if calls[0] == at:
      os.kill(os.getpid(), getattr(signal, fault))
    return real_put(batch, sharding)
  loop.put_batch = put
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def run_train_process(data_dir, workdir, fault, at, *extra):
  cmd = [sys.executable, "-c", _FAULT_RUNNER, f"--config=tests/train/tiny.py:{data_dir}",
         f"--workdir={workdir}", *extra]
  env = {**os.environ, "FAULT": fault, "FAULT_AT": str(at), "PYTHONPATH": ROOT}
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def error_lines(stderr):
  """stderr without absl's log lines (I/W/E + date): what the user reads as the outcome."""
  return [line for line in stderr.splitlines()
          if line.strip() and not (line[:1] in "IWE" and line[1:5].isdigit())]


def test_sigkill_at_random_steps_resumes_bit_identically(data_dir, reference, tmp_path):
  workdir = str(tmp_path / "run")
  kill_at = random.Random().randint(3, STEPS - 2)  # any step must do
  print(f"SIGKILL while loading the batch of step {kill_at}")  # shown if the test fails
  first = run_train_process(data_dir, workdir, "SIGKILL", kill_at)
  assert first.returncode == -signal.SIGKILL, (kill_at, first.stderr[-2000:])
  # The second process dies after orbax committed the last step and before it was sealed.
  second = run_train_process(data_dir, workdir, "before_seal", STEPS)
  assert second.returncode == -signal.SIGKILL, (kill_at, second.stderr[-2000:])
  assert not manifest.is_sealed(os.path.join(workdir, "checkpoints", str(STEPS)))
  loop.train_and_evaluate(config_for(data_dir), workdir)
  assert os.path.isdir(os.path.join(workdir, ckpt_lib.DAMAGED, str(STEPS)))  # kept, not deleted
  assert tmp_folders(workdir) == []
  assert_same_params(workdir, reference[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_save_the_current_step_and_stop(data_dir, reference, tmp_path, sig):
  workdir = str(tmp_path / "run")
  proc = run_train_process(data_dir, workdir, sig.name, 5)  # step 5: not a checkpoint step
  assert proc.returncode == 128 + sig, proc.stderr[-2000:]
  assert error_lines(proc.stderr) == [
      f"stopped by {sig.name} at step 5; checkpoint step 5 is saved in "
      f"{os.path.join(workdir, 'checkpoints')}: run the same command to resume"]
  assert manifest.problem(os.path.join(workdir, "checkpoints", "5")) is None
  if sig == signal.SIGINT:  # (one resume shows it; the saved step is the same for both)
    loop.train_and_evaluate(config_for(data_dir), workdir)
    assert_same_params(workdir, reference[0])


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holder_blocks_nothing(
    data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from effattn.train.workdir import WorkdirLock; "
       "WorkdirLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(300)",
       workdir], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
      text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirError, match=rf"in use by process {holder.pid} on host"):
      loop.train_and_evaluate(config_for(data_dir, **{"train.steps": 2}), workdir)
    assert sorted(os.listdir(workdir)) == [".lock"]  # the refused run wrote nothing
  finally:
    holder.kill()  # SIGKILL: the kernel drops its flock
    holder.wait()
  loop.train_and_evaluate(config_for(data_dir, **{"train.steps": 2}), workdir)
  assert ckpt_lib.Checkpointer(workdir, read_only=True).last_saved() == 2


# In-process faults.


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A finished 6-step run (checkpoints 2, 4, 6) and its final eval, copied by each test."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  return workdir, loop.train_and_evaluate(config_for(data_dir, **{"train.steps": 6}), workdir)


def a_data_file(step_dir, item):
  folder = os.path.join(step_dir, item, "ocdbt.process_0", "d")
  return max((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getsize)


def flip_a_byte(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x40
  open(path, "wb").write(bytes(data))


DAMAGE = {
    "flipped byte in params": lambda d: flip_a_byte(a_data_file(d, "params")),
    "truncated params": lambda d: os.truncate(a_data_file(d, "params"), 100),
    "deleted params file": lambda d: os.remove(os.path.join(d, "params", "manifest.ocdbt")),
    "garbled step metadata": lambda d: open(os.path.join(d, "_CHECKPOINT_METADATA"), "a").write(
        "x"),
    "deleted manifest": lambda d: os.remove(os.path.join(d, manifest.MANIFEST)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_step_falls_back_in_eval_and_train(data_dir, trained, tmp_path, damage):
  workdir = copy_of(trained[0], tmp_path)
  DAMAGE[damage](os.path.join(workdir, "checkpoints", "6"))
  config = ckpt_lib.merge_into(base.get_config(), ckpt_lib.load_config(workdir))
  report = runner.evaluate_checkpoint(config, workdir)
  clean = runner.evaluate_checkpoint(config, trained[0], step=4, output=str(tmp_path / "4.json"))
  assert report["step"] == 4 and report == clean  # the previous good step, exactly
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))  # eval moves nothing
  if damage != "deleted manifest":  # a step without manifest may still be chosen explicitly
    with pytest.raises(CheckpointError, match="checkpoint step 6 .* damaged; choose another"):
      runner.evaluate_checkpoint(config, workdir, step=6)
  final = loop.train_and_evaluate(config_for(data_dir, **{"train.steps": 6}), workdir)
  assert final == trained[1]  # resumed from 4, trained 4 -> 6 again: the same result
  assert os.listdir(os.path.join(workdir, ckpt_lib.DAMAGED)) == ["6"]  # set aside, not deleted
  assert manifest.problem(os.path.join(workdir, "checkpoints", "6")) is None


def test_damaged_optimizer_state_does_not_stop_eval(trained, tmp_path):
  workdir = copy_of(trained[0], tmp_path)
  os.truncate(a_data_file(os.path.join(workdir, "checkpoints", "6"), "opt_state"), 10)
  config = ckpt_lib.merge_into(base.get_config(), ckpt_lib.load_config(workdir))
  assert runner.evaluate_checkpoint(config, workdir)["step"] == 6  # eval reads no opt_state


def test_every_step_damaged_is_refused_in_one_line(data_dir, trained, tmp_path):
  workdir = copy_of(trained[0], tmp_path)
  for step in (2, 4, 6):
    flip_a_byte(a_data_file(os.path.join(workdir, "checkpoints", str(step)), "params"))
  with pytest.raises(CheckpointError, match="no checkpoint .* passes verification") as err:
    loop.train_and_evaluate(config_for(data_dir, **{"train.steps": 6}), workdir)
  assert "\n" not in str(err.value) and "bound method" not in str(err.value)


def test_checkpoint_of_another_model_shape_is_one_line(trained, tmp_path):
  workdir = copy_of(trained[0], tmp_path)
  config = ckpt_lib.merge_into(base.get_config(), ckpt_lib.load_config(workdir))
  config.model.d_model = 32
  with pytest.raises(CheckpointError, match="does not fit the model") as err:
    runner.evaluate_checkpoint(config, workdir)
  assert "\n" not in str(err.value) and "bound method" not in str(err.value)


def test_an_error_after_a_save_keeps_that_save(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")

  def failing_eval(*args, **kwargs):
    raise RuntimeError("the final evaluation failed")

  monkeypatch.setattr(loop, "evaluate_split", failing_eval)
  with pytest.raises(RuntimeError, match="final evaluation failed"):
    loop.train_and_evaluate(config_for(data_dir, **{"train.steps": 6}), workdir)
  assert tmp_folders(workdir) == []  # the async save of step 6 was finished, not cut
  assert manifest.problem(os.path.join(workdir, "checkpoints", "6")) is None


def test_settings_used_only_at_the_end_are_checked_before_the_first_step(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(ConfigError, match=r"train.eval_split='tset'.*splits: \['train', 'test'\]"):
    loop.train_and_evaluate(config_for(data_dir, **{"train.eval_split": "tset"}), workdir)
  assert not os.path.exists(workdir)


def poison_after(step_index, key):
  """make_train_step whose update turns `key` of the state NaN at 0-based step_index."""
  real = loop.make_train_step

  def make(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def poisoned(state, batch):
      new_state, metrics = step_fn(state, batch)
      bad = state.step == step_index
      nan = lambda x: jax.numpy.where(bad, jax.numpy.nan, x)
      if key == "params":
        new_state = new_state.replace(params=jax.tree.map(nan, new_state.params))
      else:
        metrics = dict(metrics, total_loss=nan(metrics["total_loss"]))
      return new_state, metrics

    return poisoned

  return make


@pytest.mark.parametrize("key,what", [("params", "parameters"), ("loss", "loss")])
def test_nan_is_never_saved_and_the_stop_names_a_finite_checkpoint(data_dir, tmp_path,
                                                                   monkeypatch, key, what):
  workdir = str(tmp_path / "run")
  # "params": the update goes NaN while the loss of that step is still finite.
  monkeypatch.setattr(loop, "make_train_step", poison_after(5, key))
  with pytest.raises(NonFiniteLossError, match=rf"at step 6 \(first NaN or inf: {what}\).*"
                     r"last checkpoint, step 4, is finite") as err:
    loop.train_and_evaluate(config_for(data_dir), workdir)
  assert "\n" not in str(err.value)
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  assert checkpointer.all_steps() == [2, 4]  # step 6 (NaN weights) was not saved
  _, params = final_params(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_a_resume_with_another_config_is_refused_and_changes_nothing(data_dir, trained,
                                                                     tmp_path):
  workdir = copy_of(trained[0], tmp_path)
  saved = open(os.path.join(workdir, "config.json")).read()
  config = config_for(data_dir, **{"train.steps": 8})
  config.model.attention.name = "linear"
  with pytest.raises(WorkdirError, match=r"model.attention.name \('softmax' -> 'linear'\).*"
                     "--allow_config_change"):
    loop.train_and_evaluate(config, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == saved
  assert ckpt_lib.Checkpointer(workdir, read_only=True).all_steps() == [2, 4, 6]
  loop.train_and_evaluate(config, workdir, allow_config_change=True)  # explicit: resumes
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["attention"]["name"] == \
      "linear"


def test_steps_logging_and_checkpoint_settings_may_change_on_resume(data_dir, trained, tmp_path):
  workdir = copy_of(trained[0], tmp_path)
  config = config_for(data_dir, **{"train.steps": 8, "train.log_every": 1,
                                   "checkpoint.every": 4, "train.eval_examples": 16})
  loop.train_and_evaluate(config, workdir)
  assert ckpt_lib.Checkpointer(workdir, read_only=True).last_saved() == 8


def test_train_steps_below_the_checkpoint_is_refused(data_dir, trained, tmp_path):
  workdir = copy_of(trained[0], tmp_path)
  before = read_metrics(workdir)
  with pytest.raises(WorkdirError, match=r"train.steps=3 is below step 6"):
    loop.train_and_evaluate(config_for(data_dir, **{"train.steps": 3}), workdir)
  assert read_metrics(workdir) == before  # no eval labelled step 3


def deny_writes_under(monkeypatch, folder):
  real_open = builtins.open

  def guarded(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and os.path.abspath(str(file)).startswith(folder):
      raise PermissionError(errno.EACCES, "Permission denied", str(file))
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", guarded)  # chmod is no barrier to root; this is


def test_eval_on_a_read_only_workdir_fails_before_evaluating(trained, tmp_path, monkeypatch):
  workdir = copy_of(trained[0], tmp_path)
  config = ckpt_lib.merge_into(base.get_config(), ckpt_lib.load_config(workdir))
  restored = []
  real_restore = runner.restore_model
  monkeypatch.setattr(runner, "restore_model", lambda *a, **k: restored.append(1) or
                      real_restore(*a, **k))
  deny_writes_under(monkeypatch, workdir)
  with pytest.raises(WorkdirError, match=r"cannot write the report .*eval.json.*--output"):
    runner.evaluate_checkpoint(config, workdir)
  assert not restored  # refused before any work
  report = runner.evaluate_checkpoint(config, workdir, output=str(tmp_path / "elsewhere.json"))
  assert report == json.load(open(tmp_path / "elsewhere.json"))


def test_a_prepared_dataset_missing_its_info_is_named(tmp_path):
  cfg = base.get_config().data
  cfg.data_dir, cfg.seq_len = str(tmp_path), 16
  cfg.mqar.update(vocab_size=32, num_pairs=2, train_examples=16, test_examples=8)
  source = data_lib.load_split(cfg, "train")
  os.remove(os.path.join(source.path, "dataset_info.json"))
  for _ in range(2):  # and again: nothing is half-regenerated in between
    with pytest.raises(ValueError, match=rf"prepared data at {source.path} is incomplete.*"
                       "delete that directory"):
      data_lib.load_split(cfg, "train")


def _enospc(what):
  return OSError(errno.ENOSPC, "No space left on device", what)


@pytest.mark.parametrize("writer,last", [("orbax", 2), ("manifest", 2), ("metrics", 4)])
def test_a_full_disk_stops_in_one_line_keeping_the_saved_steps(data_dir, tmp_path, monkeypatch,
                                                                writer, last):
  workdir = str(tmp_path / "run")
  if writer == "orbax":  # tensorstore reports a full disk as a ValueError
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
      if step == 4:
        raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": Failed to write 272 '
                         "bytes: No space left on device [os_error_code='28']")
      return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  elif writer == "manifest":
    real_seal = manifest.seal

    def seal(step_dir):
      if step_dir.endswith(f"{os.sep}4"):
        raise _enospc(step_dir)
      return real_seal(step_dir)

    monkeypatch.setattr(manifest, "seal", seal)
  else:
    real_open = builtins.open
    rows = []

    def open_(file, mode="r", *args, **kwargs):
      if str(file).endswith("metrics.jsonl") and "a" in mode:
        rows.append(1)
        if len(rows) > 2:  # the rows of steps 2 and 4 fit, the third does not
          raise _enospc(str(file))
      return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
  with pytest.raises(SaveError, match=rf"no space left on device .*last saved checkpoint: step "
                     rf"{last}\)") as err:
    loop.train_and_evaluate(config_for(data_dir), workdir)
  assert "\n" not in str(err.value)
  assert manifest.problem(os.path.join(workdir, "checkpoints", str(last))) is None
  if writer == "orbax":  # space was freed: the same command resumes (once is enough)
    monkeypatch.undo()
    loop.train_and_evaluate(config_for(data_dir), workdir)
    assert ckpt_lib.Checkpointer(workdir, read_only=True).last_saved() == STEPS


def test_workdir_that_is_a_file_or_not_writable_is_one_line(data_dir, tmp_path, monkeypatch):
  a_file = tmp_path / "file"
  a_file.write_text("")
  with pytest.raises(WorkdirError, match="is a file, not a directory"):
    loop.train_and_evaluate(config_for(data_dir), str(a_file))
  workdir = str(tmp_path / "ro")
  os.makedirs(workdir)
  real_os_open = os.open

  def os_open(path, *args, **kwargs):
    if str(path).startswith(workdir):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real_os_open(path, *args, **kwargs)

  monkeypatch.setattr(os, "open", os_open)
  with pytest.raises(WorkdirError, match="is not writable"):
    loop.train_and_evaluate(config_for(data_dir), workdir)


def test_a_config_that_breaks_the_model_is_one_line(data_dir, tmp_path):
  config = config_for(data_dir, **{"train.steps": 2})
  config.model.attention.name = "routing"
  config.model.attention.routing.block = 0
  with pytest.raises(ConfigError, match="routing") as err:
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert "\n" not in str(err.value)


# The command line: one line and a status for every failure above.


def run_main_output(capsys, error):
  def fail():
    raise error

  with pytest.raises(SystemExit) as exit_:
    cli.run_main(fail)
  return exit_.value.code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("error,code", [
    (ConfigError("optimizer.b1=1.5 must be in [0, 1)"), 2),
    (CheckpointError("no checkpoint in x"), 2),
    (WorkdirError("--workdir=x is in use by process 1"), 2),
    (NonFiniteLossError("training became non-finite at step 6"), 1),
    (SaveError("no space left on device saving checkpoint step 4"), 1),
    (_enospc("metrics.jsonl"), 1),
    (Interrupted(signal.SIGINT, "stopped by SIGINT at step 5"), 130),
    (Interrupted(signal.SIGTERM, "stopped by SIGTERM at step 5"), 143),
    (KeyboardInterrupt(), 130),
])
def test_entry_points_print_one_line_and_the_status(capsys, monkeypatch, error, code):
  monkeypatch.delenv("EFFATTN_TRACEBACK", raising=False)
  status, lines = run_main_output(capsys, error)
  assert status == code and len(lines) == 1, lines


def test_effattn_traceback_keeps_the_traceback(monkeypatch):
  monkeypatch.setenv("EFFATTN_TRACEBACK", "1")

  def fail():
    raise SaveError("no space left on device")

  with pytest.raises(SaveError):
    cli.run_main(fail)


def library_record(level, exc_info=None):
  import logging as pylogging
  return pylogging.LogRecord("absl", level, "/site-packages/orbax/checkpoint/x.py", 1,
                             "save failed\ndetail", None, exc_info)


@pytest.mark.parametrize("tracebacks", [False, True])
def test_library_logs_keep_warnings_in_one_line_unless_tracebacks_are_asked(monkeypatch,
                                                                            tracebacks):
  import logging as pylogging
  if tracebacks:
    monkeypatch.setenv("EFFATTN_TRACEBACK", "1")
  else:
    monkeypatch.delenv("EFFATTN_TRACEBACK", raising=False)
  monkeypatch.setattr(cli, "_quiet", threading.Event())  # no failure reported yet
  keep = cli._OwnInfoOnly().filter
  assert not keep(library_record(pylogging.INFO))  # orbax's INFO chatter, either way
  warning = library_record(pylogging.WARNING)
  assert keep(warning) and (warning.getMessage() == "save failed\ndetail") == tracebacks
  try:
    raise ValueError("RESOURCE_EXHAUSTED")
  except ValueError:
    failed_save = library_record(pylogging.ERROR, sys.exc_info())
  assert keep(failed_save) == tracebacks  # the trainer reports a failed save itself


def parse_with(argv):
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  return cli.parse_flags(argv, flag_values=fv)


@pytest.mark.parametrize("argv,line", [
    (["prog", "--config=configs/mqar.py", "--config.model.d_modle=64"],
     'error: --config.model.d_modle: no such config field; did you mean "d_model"?'),
    (["prog", "--config=configs/nope.py"],
     "error: --config=configs/nope.py: cannot load the config file ([Errno 2] No such file or "
     "directory: 'configs/nope.py')"),
])
def test_bad_flags_are_one_line(capsys, monkeypatch, argv, line):
  monkeypatch.delenv("EFFATTN_TRACEBACK", raising=False)
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from sys.argv
  with pytest.raises(SystemExit) as exit_:
    parse_with(argv)
  assert exit_.value.code == 2
  assert capsys.readouterr().err.splitlines() == [line]


def test_train_py_misspelled_field_is_one_line():
  proc = subprocess.run([sys.executable, "train.py", "--config=configs/mqar.py",
                         "--config.model.d_modle=64", "--workdir=/nonexistent/never"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == 2
  assert error_lines(proc.stderr) == [
      'error: --config.model.d_modle: no such config field; did you mean "d_model"?']
