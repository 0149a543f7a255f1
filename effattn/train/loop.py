"""The training loop: `train_and_evaluate(config, workdir)`.

Resumes from the newest checkpoint in `workdir` that verifies (a damaged newer one is moved to
workdir/checkpoints_damaged and named in the log), after checking that the config is the one
the checkpoints were trained with. The data position is the step (batches are a pure function
of (seed, step)), so a resumed run sees the batches it would have.

Every way out (success, an error, SIGINT / SIGTERM) finishes or abandons the pending save
first, so a step reported saved is whole, on disk and checksummed; SIGINT / SIGTERM save the
current step before stopping. See docs/reliability.md.
"""

from __future__ import annotations

import os
import signal
import time
import traceback

import jax
import numpy as np
from absl import logging
from flax import nnx

from effattn import data as data_lib
from effattn.config import ConfigError, validate
from effattn.kernels import matmul
from effattn.model import Transformer, pattern
from effattn.train import checkpoint as ckpt_lib
from effattn.train import sharding
from effattn.train import workdir as workdir_lib
from effattn.train.errors import (Interrupted, NonFiniteLossError, RunError, SaveError,
                                  WorkdirError, is_disk_full, short)
from effattn.train.evaluation import evaluate_split
from effattn.train.metrics import MetricWriter
from effattn.train.optimizer import make_optimizer
from effattn.train.profile import StepProfiler
from effattn.train.sharding import put_batch
from effattn.train.signals import StopSignals
from effattn.train.state import count_params, create
from effattn.train.step import FINITE_CHECKS, make_train_step, with_finite_flags

__all__ = ["NonFiniteLossError", "train_and_evaluate", "resolve_config", "build_model"]


def first_non_finite(host_metrics: list[dict], last_step: int) -> tuple[int, str] | None:
  """(step, quantity) of the first non-finite loss, gradient or updated state, else None."""
  for i, metrics in enumerate(host_metrics):
    for key, what in FINITE_CHECKS:
      if key in metrics:
        value = metrics[key]
        ok = bool(value) if key.startswith("finite/") else bool(np.isfinite(value))
        if not ok:
          return last_step - len(host_metrics) + i + 1, what
  return None


def check_finite(host_metrics: list[dict], last_step: int,
                 checkpointer: ckpt_lib.Checkpointer) -> None:
  """Raises naming the first step (1-based) and quantity that became NaN or inf."""
  found = first_non_finite(host_metrics, last_step)
  if found is None:
    return
  bad, what = found
  checkpointer.abandon()  # a save still in flight is of an earlier, checked step
  last = checkpointer.last_saved()
  kept = (f"the last checkpoint, step {last}, is finite" if last is not None
          else "no checkpoint was saved")
  raise NonFiniteLossError(
      f"training became non-finite at step {bad} (first NaN or inf: {what}); nothing from step "
      f"{bad} on was saved and {kept}; lower optimizer.learning_rate, keep optimizer.grad_clip "
      "> 0 or use model.dtype=float32, and resume with --allow_config_change or a new --workdir")


def resolve_config(config):
  """Fills the fields that come from the task (vocab size, classes) and validates."""
  validate(config)
  info = data_lib.task_info(config.data)
  with config.unlocked():
    if config.model.vocab_size is None:
      config.model.vocab_size = info.vocab_size
    if info.kind == "classification":
      config.model.head = "classifier"
      config.model.num_classes = info.num_classes
  return config


def check_eval_split(config) -> None:
  """The final evaluation's split must exist before the first step, not after the last."""
  try:
    data_lib.load_split(config.data, config.train.eval_split)
  except ValueError as e:
    if "is not a split" not in str(e):
      raise
    raise ConfigError(f"train.eval_split={config.train.eval_split!r}: {e}") from e


def build_model(config) -> Transformer:
  return Transformer(config.model, rngs=nnx.Rngs(config.seed))


def peak_flops_per_device() -> float | None:
  """Dense bf16 peak of known accelerators, for MFU; None where unknown (e.g. CPU)."""
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in (("h100", 989e12), ("h200", 989e12), ("a100", 312e12), ("v5p", 459e12),
                      ("v5 lite", 197e12), ("v4", 275e12)):
    if name in kind:
      return flops
  return None


def train_flops_per_token(model_cfg, num_params: int, seq_len: int) -> float:
  """6N for the weights plus 6 * L * T * d for causal attention scores (fwd + bwd)."""
  embed = model_cfg.vocab_size * model_cfg.d_model
  return 6.0 * (num_params - embed) + 6.0 * model_cfg.num_layers * seq_len * model_cfg.d_model


def train_row(host_metrics: list[dict], seconds: float, steps: int, tokens_per_step: int,
              flops_per_token: float) -> dict[str, float]:
  """The logged row of `steps` steps that took `seconds`: means, lr, speed, MFU."""
  row = {k: float(np.mean([m[k] for m in host_metrics])) for k in host_metrics[-1]
         if not k.startswith("finite/")}
  row["learning_rate"] = float(host_metrics[-1]["learning_rate"])
  row["step_time"] = seconds / steps
  row["tokens_per_sec"] = tokens_per_step * steps / seconds
  peak = peak_flops_per_device()
  if peak:
    row["mfu"] = row["tokens_per_sec"] * flops_per_token / (peak * jax.device_count())
  return row


def first_step(train_step, state, batch):
  """The first (compiling) step: an error tracing the model is a config error, in one line."""
  try:
    return train_step(state, batch)
  except (ArithmeticError, TypeError, ValueError, IndexError, NotImplementedError) as e:
    if isinstance(e, (RunError, ConfigError)):
      raise
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if f"{os.sep}effattn{os.sep}" in f.filename]
    where = (f" at {os.path.relpath(frames[-1].filename)}:{frames[-1].lineno}" if frames else "")
    raise ConfigError(f"the model built from this config fails in its first step ({short(e)}"
                      f"{where}); check the model.attention and model settings") from e


def resume(config, workdir: str, checkpointer: ckpt_lib.Checkpointer, state, *,
           allow_config_change: bool):
  """(state, start step): the checkpoint to continue from after the checks, or (state, 0).

  config.json is written only once the checks pass, so a refused run changes nothing.
  """
  if not checkpointer.all_steps():
    ckpt_lib.save_config(config, workdir)
    return state, 0
  if os.path.exists(os.path.join(workdir, "config.json")):
    changes = workdir_lib.config_changes(config, workdir)
  else:
    changes = ["config.json is missing, so nothing can be compared"]
  if changes and not allow_config_change:
    more = f" and {len(changes) - 6} more" if len(changes) > 6 else ""
    raise WorkdirError(f"--workdir={workdir} holds checkpoints of another config: "
                       f"{', '.join(changes[:6])}{more}; resume with the saved values, pass "
                       "--allow_config_change to resume anyway, or use a new --workdir")
  if changes:
    logging.warning("resuming with a changed config (--allow_config_change): %s",
                    ", ".join(changes))
  step, skipped = checkpointer.choose_step()
  if config.train.steps < step:
    raise WorkdirError(f"train.steps={config.train.steps} is below step {step} of the checkpoint "
                       f"this run would resume in {workdir}: set train.steps >= {step} (= {step} "
                       "evaluates it again) or use a new --workdir")
  ckpt_lib.save_config(config, workdir)
  if skipped:
    target = checkpointer.set_aside([s for s, _ in skipped])
    for s, why in skipped:
      logging.warning("checkpoint step %d %s; moved it to %s and resuming from step %d", s, why,
                      target, step)
  state = checkpointer.restore(state, step)
  logging.info("resumed from step %d in %s", step, workdir)
  return state, step


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Trains `config` in `workdir` (resuming if possible); returns the final eval metrics.

  allow_config_change: resume even though the config differs from the saved one in fields
  outside workdir.RESUMABLE_CHANGES (the differences are logged).
  """
  if config.mesh.distributed:
    jax.distributed.initialize()
  config = resolve_config(config)
  check_eval_split(config)
  workdir = workdir_lib.prepare(workdir)
  with workdir_lib.WorkdirLock(workdir), StopSignals() as stop:
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.mesh)
    sharding.check_batch_divides(config.train.batch_size, mesh)
    checkpointer = ckpt_lib.Checkpointer(workdir, every=config.checkpoint.every,
                                         keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save)
    try:
      # The step's kernels run per shard of the mesh (kernels/mesh.py), its activations are
      # constrained by the rules (logical_axes); its float32 matmuls take model.matmul_precision
      # (part of jit's cache key, so every step compiles under it).
      with sharding.ambient(mesh, rules), matmul.precision_scope(config.model.matmul_precision):
        result = _train(config, workdir, mesh, rules, checkpointer, stop, allow_config_change)
    except BaseException as e:
      save_error = checkpointer.abandon()
      checkpointer.close(quiet=True)
      if not isinstance(e, RunError) and (is_disk_full(e) or is_disk_full(save_error)):
        last = checkpointer.last_saved()
        raise SaveError(f"no space left on device writing to {workdir} (last saved checkpoint: "
                        f"step {last}): free space, then run the same command to resume") from e
      raise
    checkpointer.close()
    return result


def _train(config, workdir, mesh, rules, checkpointer, stop, allow_config_change) -> dict:
  tc = config.train
  model = build_model(config)
  tx, schedule = make_optimizer(config.optimizer, tc.steps)
  graphdef, state = create(model, tx)
  num_params = count_params(state.params)
  logging.info("model: %s attention, %.3fM params, backend %s", pattern.describe(config.model),
               num_params / 1e6, jax.default_backend())
  state_sharding = sharding.param_shardings(state, mesh, rules)
  state = jax.device_put(state, state_sharding)
  state, start = resume(config, workdir, checkpointer, state,
                        allow_config_change=allow_config_change)

  train_step = jax.jit(with_finite_flags(make_train_step(graphdef, tx, schedule,
                                                         grad_accum_steps=tc.grad_accum_steps)),
                       donate_argnums=0, out_shardings=(state_sharding, None))
  batches = data_lib.make_iterator(config.data, "train", tc.batch_size, seed=config.seed,
                                   start_step=start, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  batch_sharding = sharding.batch_sharding(mesh)
  writer = MetricWriter(workdir)
  flops_per_token = train_flops_per_token(config.model, num_params, config.data.seq_len)
  tokens_per_step = tc.batch_size * config.data.seq_len

  def run_eval(step: int) -> dict:
    result = evaluate_split(graphdef, state.params, state.rest, config.data, tc.eval_split,
                            batch_size=tc.batch_size, max_examples=tc.eval_examples,
                            batch_sharding=batch_sharding)
    writer.write(step, result, prefix="eval/")
    logging.info("step %d eval: %s", step, {k: round(v, 4) for k, v in result.items()})
    return result

  bar = None
  if tc.progress_bar and jax.process_index() == 0:
    from tqdm import tqdm
    bar = tqdm(total=tc.steps, initial=start, desc=pattern.describe(config.model), unit="step",
               dynamic_ncols=True)
  profiler = StepProfiler(workdir, start=tc.profile_start, steps=tc.profile_steps)
  pending: list[dict] = []
  done = start
  finished = False
  t_last, step_last = time.perf_counter(), start
  try:
    for step in range(start, tc.steps):
      with stop.deferred():  # a signal waits for the step and its save: the state is donated
        batch = put_batch(next(batches), batch_sharding)
        with profiler.step(step):
          if step == start:
            state, metrics = first_step(train_step, state, batch)
          else:
            state, metrics = train_step(state, batch)
        pending.append(metrics)
        done = step + 1
        profiler.after(done, metrics)
        if done % tc.log_every == 0 or done == tc.steps:
          host = jax.device_get(pending)
          check_finite(host, done, checkpointer)
          steps_done = done - step_last
          row = train_row(host, time.perf_counter() - t_last, steps_done, tokens_per_step,
                          flops_per_token)
          writer.write(done, row, prefix="train/")
          if bar is not None:
            bar.update(steps_done)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}")
          pending, t_last, step_last = [], time.perf_counter(), done
        checkpointer.poll()  # seal a committed save soon, in the background
      if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
        run_eval(done)
        t_last = time.perf_counter()
      with stop.deferred():
        if done % config.checkpoint.every == 0 or done == tc.steps:
          check_finite(jax.device_get(pending), done, checkpointer)  # never save unchecked steps
          checkpointer.maybe_save(done, state, force=True)
      stop.check()
    if bar is not None:
      bar.close()
    final_eval = run_eval(tc.steps)
    checkpointer.wait()
    finished = True
    return final_eval
  except Interrupted as e:
    raise _stop_on_signal(e.signum, done, start, pending, state, checkpointer) from None
  finally:
    profiler.stop()
    if bar is not None:
      bar.close()

    writer.close(quiet=not finished)  # on the way out of an error, the error is what counts


def _stop_on_signal(signum, done, start, pending, state, checkpointer) -> Interrupted:
  """Saves step `done` (checked first) and waits for it; the error to stop with."""
  name = signal.Signals(signum).name
  if done > start:
    check_finite(jax.device_get(pending), done, checkpointer)
    checkpointer.maybe_save(done, state, force=True)
  checkpointer.wait()
  last = checkpointer.last_saved()
  kept = (f"checkpoint step {last} is saved in {checkpointer.directory}" if last is not None
          else "no checkpoint was saved")
  return Interrupted(signum, f"stopped by {name} at step {done}; {kept}: run the same command "
                             "to resume")
