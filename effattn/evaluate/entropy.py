"""Attention entropy per layer and head on held-out rows: how sharp each head's attention is.

    python eval.py --workdir runs/mqar-mala --config.eval.task=entropy   # -> eval_entropy.json

Every layer's mechanism gives its attention weights a_ij (o_i = sum_j a_ij v_j) through
`Attention.attention_weights`, from its own score definition: softmax's probabilities, linear
attention's phi(q_i) . phi(k_j) over its normalizer, MALA's magnitude-aware beta_i s_ij - gamma_i.
The entropy of query i is that of p_ij = |a_ij| / sum_j |a_ij| over the keys it sees:
H_i = -sum_j p_ij log p_ij, 0 for a one-hot row and log n for a uniform one over n keys. (MALA's
scores sum to 1 but may be negative; |a| makes them a distribution, and `negative_mass`, the
share of sum_j |a_ij| that is negative, says how far they are from one. Softmax's and linear
attention's weights are non-negative, so there p is a itself.)

Layers whose mechanism has no such weights (lightning, gated DeltaNet, the sparse and memory
mechanisms) are listed with `exposed: false` and left out of the means, so a hybrid stack reports
its softmax layers and a model with none reports None (a sweep mixing mechanisms can run the task
on every variant).

Reported per layer and head, averaged over two sets of queries of real tokens that see at
least two keys: every query (`entropy`), and the queries at weighted targets (`entropy_targets`:
in MQAR the positions where a key is looked up, where recall happens). `*_norm` divides each
query's entropy by log n, n the keys of its causal prefix within its segment (the uniform
distribution's entropy), so 1 = uniform over the prefix and 0 = one key; a sliding window of W
keys is bounded by log W / log n. `summary` holds the means over layers and heads (the columns
scripts/sweep.py adds to its tables). The weights are [B, H, T, T] per layer: keep
`batch_size` x T^2 small.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effattn import data as data_lib
from effattn.attention import base
from effattn.evaluate.registry import register_eval_task, task_options
from effattn.model import pattern
from effattn.train.state import split_model


@dataclasses.dataclass(frozen=True)
class EntropyOptions:
  """Options of eval.task=entropy (config.eval.entropy.<field>).

  Attributes:
    examples: held-out rows of eval.split (0 = the whole split).
    batch_size: rows per forward pass (each layer's weights are [rows, H, T, T] float32).
  """

  examples: int = 256
  batch_size: int = 16

  def validate(self) -> None:
    if self.examples < 0:
      raise ValueError(f"eval.entropy.examples={self.examples} must be >= 0 (0 = whole split)")
    if self.batch_size < 1:
      raise ValueError(f"eval.entropy.batch_size={self.batch_size} must be >= 1")


def row_entropy(weights: jax.Array) -> jax.Array:
  """Entropy (nats) of each row of weights [..., Tk] read as p = |a| / sum |a|; 0 for a zero row.

  Masked keys must hold 0 (they then add nothing)."""
  mag = jnp.abs(weights.astype(jnp.float32))
  total = jnp.sum(mag, axis=-1, keepdims=True)
  p = mag / jnp.where(total > 0, total, 1.0)
  return -jnp.sum(jax.scipy.special.xlogy(p, p), axis=-1)


def negative_mass(weights: jax.Array) -> jax.Array:
  """Share of sum |a| that is negative, per row of weights [..., Tk] (0 for a zero row)."""
  w = weights.astype(jnp.float32)
  total = jnp.sum(jnp.abs(w), axis=-1)
  return jnp.sum(jnp.maximum(-w, 0.0), axis=-1) / jnp.where(total > 0, total, 1.0)


def prefix_keys(segment_ids: jax.Array, causal: bool) -> jax.Array:
  """Keys each query sees in its segment (up to itself when causal): float32 [B, T]."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  if causal:
    same &= jnp.tril(jnp.ones(same.shape[1:], bool))
  return jnp.sum(same, axis=-1).astype(jnp.float32)


def layer_sums(weights: jax.Array, batch: dict, causal: bool) -> dict[str, jax.Array]:
  """Per-head sums over the batch's queries of one layer's weights [B, H, T, T]: entropy,
  normalized entropy, negative mass and counts, for every query and for the target queries."""
  n = prefix_keys(batch["segment_ids"], causal)                              # [B, T]
  real = (batch["segment_ids"] > 0) & (n >= 2)
  sets = {"": real, "_targets": real & (batch["weights"] > 0)}
  h = row_entropy(weights)                                                   # [B, H, T]
  h_norm = h / jnp.log(jnp.maximum(n, 2.0))[:, None]
  neg = negative_mass(weights)
  sums = {}
  for suffix, keep in sets.items():
    keep = keep[:, None].astype(jnp.float32)                                 # [B, 1, T]
    sums[f"entropy{suffix}"] = jnp.sum(h * keep, axis=(0, 2))
    sums[f"entropy{suffix}_norm"] = jnp.sum(h_norm * keep, axis=(0, 2))
    sums[f"negative_mass{suffix}"] = jnp.sum(neg * keep, axis=(0, 2))
    sums[f"queries{suffix}"] = jnp.sum(keep)
  return sums


def exposes_weights(attn) -> bool:
  """Whether a layer's mechanism defines attention_weights (base.Attention's raises)."""
  return type(attn).attention_weights is not base.Attention.attention_weights


@functools.cache
def _sums_fn(graphdef, causal: bool, layers: tuple[int, ...]):
  def fn(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    weights = model.attention_weights(batch["inputs"], positions=batch["positions"],
                                      segment_ids=batch["segment_ids"], layers=layers)
    return [layer_sums(w, batch, causal) for w in weights]

  return jax.jit(fn)


def _means(sums: dict[str, np.ndarray]) -> dict[str, list[float]]:
  out = {}
  for key, value in sums.items():
    if key.startswith("queries"):
      continue
    count = sums["queries_targets" if "_targets" in key else "queries"]
    out[key] = (value / count).tolist() if count > 0 else None
  return out


_SUMMARY = ("entropy", "entropy_norm", "entropy_targets", "entropy_targets_norm")


@register_eval_task("entropy", options=EntropyOptions)
def entropy_task(model, config, workdir) -> dict:
  """Per layer and head: mean attention entropy of every query and of the target queries."""
  del workdir
  opts = task_options(config, "entropy")
  names = [att["name"] for att in pattern.layer_attention(config.model)]
  exposed = tuple(i for i, block in enumerate(model.blocks) if exposes_weights(block.attn))
  layers = [{"layer": i, "mechanism": name, "exposed": i in exposed}
            for i, name in enumerate(names)]
  result = {"examples": 0, "queries": 0.0, "target_queries": 0.0,
            "summary": dict.fromkeys(_SUMMARY), "layers": layers}
  if not exposed:
    return result
  graphdef, params, rest = split_model(model)
  fn = _sums_fn(graphdef, bool(config.model.causal), exposed)
  totals = None
  for batch in data_lib.eval_batches(config.data, config.eval.split, opts.batch_size,
                                     max_examples=opts.examples or None):
    model_batch = {k: batch[k] for k in ("inputs", "positions", "segment_ids", "weights")}
    sums = jax.device_get(fn(params, rest, model_batch))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    result["examples"] += int(np.sum(np.any(batch["segment_ids"] > 0, axis=-1)))
  if totals is None:
    raise ValueError(f"eval.split={config.eval.split!r} of data.name={config.data.name!r} is "
                     "empty")
  for i, sums in zip(exposed, totals):
    layers[i].update(_means(sums))
  result["queries"] = float(totals[0]["queries"])
  result["target_queries"] = float(totals[0]["queries_targets"])
  for key in _SUMMARY:
    per_head = [layers[i][key] for i in exposed if layers[i][key] is not None]
    result["summary"][key] = float(np.mean(per_head)) if per_head else None
  return result
