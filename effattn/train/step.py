"""Loss, one jit-able train step (with gradient accumulation) and one eval step.

Batches are dicts of arrays: inputs [B, T], targets [B, T] (or [B] for classifiers), weights
(same shape as targets), segment_ids [B, T], positions [B, T].
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from effattn.train.state import TrainState


def forward(graphdef, params, rest, batch, *, train: bool):
  """-> (logits, aux, new_rest). Non-Param state (e.g. centroids) may change when train=True."""
  # copy=True: fresh Variables at this trace level, so mechanisms may update their state
  # (e.g. routing centroids) inside jit(grad(...)).
  model = nnx.merge(graphdef, params, rest, copy=True)
  logits, aux = model(batch["inputs"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], train=train)
  _, _, new_rest = nnx.split(model, nnx.Param, ...)
  return logits, aux, new_rest


def weighted_sums(logits, batch) -> dict[str, jax.Array]:
  """Sums of weighted cross entropy, correct predictions and weight (not yet normalized)."""
  targets, weights = batch["targets"], batch["weights"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return {"loss_sum": jnp.sum(ce * weights), "correct_sum": jnp.sum(correct * weights),
          "weight_sum": jnp.sum(weights)}


def aux_loss(aux: dict) -> jax.Array:
  """Mechanism terms whose names start with `loss_` are pre-weighted loss contributions."""
  return sum((v for k, v in aux.items() if k.startswith("loss_")), jnp.zeros((), jnp.float32))


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *,
                    grad_accum_steps: int = 1) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics)."""

  def micro_loss(params, rest, batch, total_weight):
    logits, aux, new_rest = forward(graphdef, params, rest, batch, train=True)
    sums = weighted_sums(logits, batch)
    loss = sums["loss_sum"] / total_weight + aux_loss(aux) / grad_accum_steps
    return loss, (sums, aux, new_rest)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, Any]]:
    total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
    if grad_accum_steps == 1:
      (_, (sums, aux, rest)), grads = grad_fn(state.params, state.rest, batch, total_weight)
    else:
      # Micro-batch a takes rows a, a + A, a + 2A, ...: each device keeps its share of every
      # micro-batch (rows are split over devices in contiguous blocks), so no step gathers rows
      # and each micro-step computes 1/A of the device's rows.
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(
              x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]), 0, 1),
          batch)

      def body(carry, mb):
        grads_acc, sums_acc, aux_acc, rest = carry
        (_, (sums, aux, rest)), grads = grad_fn(state.params, rest, mb, total_weight)
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        aux = jax.tree.map(lambda v: v / grad_accum_steps, aux)
        return (add(grads_acc, grads), add(sums_acc, sums), add(aux_acc, aux), rest), None

      first = jax.tree.map(lambda x: x[0], micro)
      _, (sums0, aux0, _) = jax.eval_shape(grad_fn, state.params, state.rest, first,
                                           total_weight)[0]
      zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
      init = (zeros(jax.eval_shape(lambda: state.params)), zeros(sums0), zeros(aux0), state.rest)
      (grads, sums, aux, rest), _ = jax.lax.scan(body, init, micro)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss = sums["loss_sum"] / total_weight
    metrics = {
        "loss": loss,
        "total_loss": loss + aux_loss(aux),
        "accuracy": sums["correct_sum"] / total_weight,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": schedule(state.step),
        **{f"aux/{k}": v for k, v in aux.items()},
    }
    new_state = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef) -> Callable:
  """Returns eval_step(params, rest, batch) -> sums of loss, correct, weight and examples."""

  def eval_step(params, rest, batch):
    logits, _, _ = forward(graphdef, params, rest, batch, train=False)
    weights = batch["weights"]
    # Rows with any weight: the examples counted (padding rows have none).
    rows = jnp.sum(jnp.any(weights.reshape(weights.shape[0], -1) > 0, axis=-1))
    return {**weighted_sums(logits, batch), "example_sum": rows}

  return eval_step


def all_finite(tree) -> jax.Array:
  """True when no floating leaf of `tree` holds a NaN or an inf (a bool scalar)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# Checked by the loop before a step may be saved, in the order a step computes them.
FINITE_CHECKS = (("total_loss", "loss"), ("grad_norm", "gradient norm"),
                 ("finite/opt_state", "optimizer state"), ("finite/params", "parameters"),
                 ("finite/rest", "non-gradient model state"))


def with_finite_flags(train_step: Callable) -> Callable:
  """train_step whose metrics also say whether the updated state is finite (finite/*)."""

  def step(state: TrainState, batch):
    new_state, metrics = train_step(state, batch)
    return new_state, {**metrics, "finite/params": all_finite(new_state.params),
                       "finite/opt_state": all_finite(new_state.opt_state),
                       "finite/rest": all_finite(new_state.rest)}

  return step
