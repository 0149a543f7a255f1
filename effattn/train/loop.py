"""The training loop: `train_and_evaluate(config, workdir)`.

Resumes from the latest checkpoint in `workdir` when there is one; the data position is the step
(batches are a pure function of (seed, step)), so a resumed run sees the batches it would have.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from effattn import data as data_lib
from effattn.config import validate
from effattn.model import Transformer
from effattn.train import checkpoint as ckpt_lib
from effattn.train import sharding
from effattn.train.evaluation import evaluate_split
from effattn.train.metrics import MetricWriter
from effattn.train.optimizer import make_optimizer
from effattn.train.state import count_params, create
from effattn.train.step import make_train_step


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or inf."""


def check_finite(host_metrics: list[dict], last_step: int, last_checkpoint: int | None) -> None:
  """Raises naming the first step (1-based) whose loss is NaN or inf."""
  finite = np.isfinite([m["total_loss"] for m in host_metrics])
  if not finite.all():
    bad = last_step - len(host_metrics) + int(np.argmin(finite)) + 1
    raise NonFiniteLossError(
        f"training loss became non-finite at step {bad}; lower optimizer.learning_rate, keep "
        f"optimizer.grad_clip > 0 or use model.dtype=float32 (last good checkpoint: "
        f"{last_checkpoint})")


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


def put_batch(batch: dict, batch_sharding) -> dict:
  """This host's rows of the global batch -> one sharded global jax array per field."""
  n = jax.process_count()

  def put(x):
    return jax.make_array_from_process_local_data(batch_sharding, x, (x.shape[0] * n,
                                                                       *x.shape[1:]))

  return jax.tree.map(put, batch)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if possible); returns the final eval metrics."""
  if config.mesh.distributed:
    jax.distributed.initialize()
  config = resolve_config(config)
  ckpt_lib.save_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  tc = config.train
  sharding.check_batch_divides(tc.batch_size, mesh)

  model = build_model(config)
  tx, schedule = make_optimizer(config.optimizer, tc.steps)
  graphdef, state = create(model, tx)
  num_params = count_params(state.params)
  logging.info("model: %s attention, %.3fM params, backend %s", config.model.attention.name,
               num_params / 1e6, jax.default_backend())
  state_sharding = sharding.param_shardings(state, mesh)
  state = jax.device_put(state, state_sharding)

  checkpointer = ckpt_lib.Checkpointer(workdir, every=config.checkpoint.every,
                                       keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
  start = 0
  if checkpointer.latest_step() is not None:
    state, start = checkpointer.restore(state)
    logging.info("resumed from step %d in %s", start, workdir)

  train_step = jax.jit(make_train_step(graphdef, tx, schedule,
                                       grad_accum_steps=tc.grad_accum_steps),
                       donate_argnums=0, out_shardings=(state_sharding, None))
  batches = data_lib.make_iterator(config.data, "train", tc.batch_size, seed=config.seed,
                                   start_step=start, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  batch_sharding = sharding.batch_sharding(mesh)
  writer = MetricWriter(workdir)
  peak = peak_flops_per_device()
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
    bar = tqdm(total=tc.steps, initial=start, desc=config.model.attention.name, unit="step",
               dynamic_ncols=True)
  pending: list[dict] = []
  t_last, step_last = time.perf_counter(), start
  for step in range(start, tc.steps):
    batch = put_batch(next(batches), batch_sharding)
    state, metrics = train_step(state, batch)
    pending.append(metrics)
    done = step + 1
    if done % tc.log_every == 0 or done == tc.steps:
      host = jax.device_get(pending)
      check_finite(host, done, checkpointer.latest_step())
      dt = time.perf_counter() - t_last
      steps_done = done - step_last
      row = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
      row["learning_rate"] = float(host[-1]["learning_rate"])
      row["step_time"] = dt / steps_done
      row["tokens_per_sec"] = tokens_per_step * steps_done / dt
      if peak:
        row["mfu"] = row["tokens_per_sec"] * flops_per_token / (peak * jax.device_count())
      writer.write(done, row, prefix="train/")
      if bar is not None:
        bar.update(steps_done)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}")
      pending, t_last, step_last = [], time.perf_counter(), done
    if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
      run_eval(done)
      t_last = time.perf_counter()
    if done % config.checkpoint.every == 0 or done == tc.steps:
      # Never checkpoint unchecked steps.
      check_finite(jax.device_get(pending), done, checkpointer.latest_step())
      checkpointer.maybe_save(done, state, force=True)
  if bar is not None:
    bar.close()
  final_eval = run_eval(tc.steps)
  checkpointer.wait()
  checkpointer.close()
  writer.flush()
  writer.close()
  return final_eval
