"""Passkey retrieval on a grid of context length x key depth, written as JSON and a heat map.

    python eval.py --workdir runs/passkey --config.eval.task=passkey

Each cell holds `examples` prompts of exactly `length` tokens with a key hidden at `depth`
(0 = first line, 1 = just before the question), built by `effattn.data.passkey.passkey_batch`
(the landmark-attention protocol, byte tokens) with the run's needle (data.passkey.needle: a
5-digit number, or a word). A prompt counts as retrieved when every character of the key is
the model's argmax given the prompt and the characters before it: with teacher forcing this is
exactly greedy decoding of the key. The per-character (`digit_accuracy`) accuracy is reported
too.

`vary` re-evaluates the grid at each of `values` of one inference-time model field, the same
checkpoint rebuilt per value (the field must leave the parameters as they are): e.g.
`model.attention.landmark.forward_top_k` for the blocks landmark attention retrieves. The
report's `summary` (the columns scripts/sweep.py adds) has the mean accuracy per length, past
the training length, and past it per varied value.

Any model trained on byte tokens can be probed: one trained on data.name=passkey, or a text LM
(data.name=text with the byte tokenizer).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from effattn.data import passkey as passkey_data
from effattn.evaluate import common
from effattn.evaluate.registry import register_eval_task, task_options
from effattn.train.loop import build_model, resolve_config
from effattn.train.state import split_model


@dataclasses.dataclass(frozen=True)
class PasskeyEvalOptions:
  """Options of eval.task=passkey (config.eval.passkey.<field>).

  Attributes:
    lengths: prompt lengths in tokens; () = 1x, 2x and 4x data.seq_len (each raised to the
      shortest possible prompt).
    depths: key depths in [0, 1].
    examples: prompts per cell.
    seed: seed of the keys (the same seed gives the same prompts).
    tokens_per_batch: tokens per forward pass; 0 = eval.batch_size * data.seq_len.
    vary: a model field ("model.attention.landmark.forward_top_k") that leaves the parameters
      unchanged; the grid is evaluated again at each of `values`. "" = none.
    values: the values of `vary`.
  """

  lengths: tuple[int, ...] = ()
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  examples: int = 16
  seed: int = 1234
  tokens_per_batch: int = 0
  vary: str = ""
  values: tuple[int, ...] = ()

  def validate(self) -> None:
    if any(int(n) != n or n < 2 for n in self.lengths):
      raise ValueError(f"eval.passkey.lengths={self.lengths} must be integers >= 2 (or () for "
                       f"multiples of data.seq_len)")
    if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
      raise ValueError(f"eval.passkey.depths={self.depths} must be a non-empty tuple of values "
                       f"in [0, 1]")
    if self.examples < 1:
      raise ValueError(f"eval.passkey.examples={self.examples} must be >= 1")
    if self.tokens_per_batch < 0:
      raise ValueError(f"eval.passkey.tokens_per_batch={self.tokens_per_batch} must be >= 0")
    if bool(self.vary) != bool(self.values) or (self.vary and not self.vary.startswith("model.")):
      raise ValueError(f"eval.passkey.vary={self.vary!r} and values={self.values}: give both, "
                       "a model field and its values (e.g. vary='model.attention.landmark."
                       "forward_top_k', values=(2, 4)), or neither")


def _require_byte_model(config) -> None:
  data = config.data
  byte_text = data.name == "text" and data.text.tokenizer == "byte"
  if config.model.head != "lm" or not (data.name == "passkey" or byte_text):
    raise ValueError(f"eval.task=passkey needs a language model on byte tokens (data.name="
                     f"'passkey', or 'text' with data.text.tokenizer='byte'); this run has "
                     f"data.name={data.name!r}")


def grid_lengths(opts: PasskeyEvalOptions, train_len: int, shortest: int) -> list[int]:
  if opts.lengths:
    too_short = [n for n in opts.lengths if n < shortest]
    if too_short:
      raise ValueError(f"eval.passkey.lengths={opts.lengths}: {too_short} are shorter than the "
                       f"shortest passkey prompt ({shortest} tokens); drop them or set "
                       f"data.passkey.include_description=False")
    return sorted(set(int(n) for n in opts.lengths))
  return sorted({max(m * train_len, shortest) for m in (1, 2, 4)})


def evaluate_cell(graphdef, params, rest, batch: dict, rows: int) -> tuple[np.ndarray, np.ndarray]:
  """Per prompt: key retrieved (bool [N]) and fraction of its digits right (float [N])."""
  exact, digits = [], []
  n = batch["inputs"].shape[0]
  for start in range(0, n, rows):
    part = {k: v[start:start + rows] for k, v in batch.items()}
    _, correct = common.token_losses(graphdef, params, rest, part)
    key_pos = part["weights"] > 0
    exact.append(np.all(correct | ~key_pos, axis=-1))
    digits.append(np.sum(correct & key_pos, -1) / np.maximum(np.sum(key_pos, -1), 1))
  return np.concatenate(exact), np.concatenate(digits)


def plot(result: dict, title: str):
  """Heat maps of retrieval accuracy, depth (rows) x length (columns): the run's grid and one per
  varied value. -> matplotlib Figure."""
  from matplotlib.figure import Figure

  lengths, depths = result["lengths"], result["depths"]
  panels = [(title, result["accuracy"])] + [
      (f"{result['vary']}={g['value']}", g["accuracy"]) for g in result.get("varied", ())]
  fig = Figure(figsize=((1.2 * len(lengths) + 2.5) * len(panels), 0.55 * len(depths) + 1.8),
               layout="constrained")
  for n, (name, acc) in enumerate(panels):
    acc = np.asarray(acc, float)
    ax = fig.add_subplot(1, len(panels), n + 1)
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(depths)):
      for j in range(len(lengths)):
        ax.text(j, i, f"{100 * acc[i, j]:.0f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    beyond = [j for j, n in enumerate(lengths) if n > result["train_length"]]
    if beyond:  # columns past the training length
      ax.axvline(beyond[0] - 0.5, color="k", lw=1.5, ls="--")
    ax.set_xlabel(f"context length (tokens; trained at {result['train_length']})")
    ax.set_ylabel("key depth")
    ax.set_title(f"passkey retrieval (%): {name}", fontsize=9)
  fig.colorbar(im, ax=fig.axes, label="accuracy")
  return fig


def rebuilt(model, config, field: str, value):
  """The graphdef of `model` with config field `field` (dotted, "model....") set to `value`;
  ValueError if that changes the parameters (only inference-time fields can be varied)."""
  config = config.copy_and_resolve_references()
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    if part not in node:
      raise ValueError(f"eval.passkey.vary={field!r}: the config has no field {part!r}")
    node = node[part]
  if leaf not in node:
    raise ValueError(f"eval.passkey.vary={field!r}: the config has no field {leaf!r}")
  node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
  config = resolve_config(config)  # validates the value too
  graphdef, params, rest = split_model(nnx.eval_shape(lambda: build_model(config)))
  _, want_params, want_rest = split_model(model)
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
  if shapes(params) != shapes(want_params) or shapes(rest) != shapes(want_rest):
    raise ValueError(f"eval.passkey.vary={field!r}={value!r} changes the model's parameters; "
                     "vary an inference-time field (one the checkpoint does not depend on)")
  return graphdef


def grid(graphdef, params, rest, config, opts, lengths: list[int],
         depths: list[float]) -> tuple[np.ndarray, np.ndarray]:
  """Retrieval and character accuracy, float [depths, lengths] each."""
  data_opts = config.data.passkey
  tokens_per_batch = opts.tokens_per_batch or config.eval.batch_size * int(config.data.seq_len)
  accuracy = np.zeros((len(depths), len(lengths)))
  digit_accuracy = np.zeros_like(accuracy)
  for j, length in enumerate(lengths):
    rows = common.rows_per_batch(tokens_per_batch, length)
    for i, depth in enumerate(depths):
      batch = passkey_data.passkey_batch(length, depth, opts.examples, opts.seed,
                                         key_digits=data_opts.key_digits,
                                         include_description=data_opts.include_description,
                                         needle=data_opts.needle)
      exact, digits = evaluate_cell(graphdef, params, rest, batch, rows)
      accuracy[i, j], digit_accuracy[i, j] = exact.mean(), digits.mean()
  return accuracy, digit_accuracy


def _beyond(accuracy: np.ndarray, lengths: list[int], train_len: int) -> float | None:
  far = [n > train_len for n in lengths]
  return float(accuracy[:, far].mean()) if any(far) else None


@register_eval_task("passkey", options=PasskeyEvalOptions)
def passkey_task(model, config, workdir) -> dict:
  """Passkey accuracy on the lengths x depths grid (and per value of `vary`)."""
  del workdir
  opts = task_options(config, "passkey")
  _require_byte_model(config)
  data_opts = config.data.passkey
  shortest = passkey_data.min_length(data_opts.key_digits, data_opts.include_description,
                                     data_opts.needle)
  train_len = int(config.data.seq_len)
  lengths = grid_lengths(opts, train_len, shortest)
  depths = [float(d) for d in opts.depths]
  graphdef, params, rest = split_model(model)
  varied = [(v, rebuilt(model, config, opts.vary, v)) for v in opts.values]  # checked first
  accuracy, digit_accuracy = grid(graphdef, params, rest, config, opts, lengths, depths)
  within = [n <= train_len for n in lengths]
  result = {"train_length": train_len, "needle": data_opts.needle, "lengths": lengths,
            "depths": depths, "examples_per_cell": opts.examples,
            "accuracy": accuracy.tolist(), "digit_accuracy": digit_accuracy.tolist(),
            "mean_accuracy": float(accuracy.mean()),
            "mean_accuracy_within_train_length":
                float(accuracy[:, within].mean()) if any(within) else None,
            "mean_accuracy_beyond_train_length": _beyond(accuracy, lengths, train_len)}
  summary = {"passkey": result["mean_accuracy"],
             "passkey_beyond": result["mean_accuracy_beyond_train_length"],
             **{f"passkey_{n}": float(accuracy[:, j].mean()) for j, n in enumerate(lengths)}}
  if varied:
    result["vary"], result["varied"] = opts.vary, []
    for value, graphdef_v in varied:
      acc, digits = grid(graphdef_v, params, rest, config, opts, lengths, depths)
      result["varied"].append({"value": value, "accuracy": acc.tolist(),
                               "digit_accuracy": digits.tolist(),
                               "mean_accuracy": float(acc.mean()),
                               "mean_accuracy_beyond_train_length":
                                   _beyond(acc, lengths, train_len)})
      summary[f"passkey_beyond@{opts.vary.rsplit('.', 1)[-1]}={value}"] = _beyond(
          acc, lengths, train_len)
  result["summary"] = summary
  return {**result, "figure": plot(result, common.run_label(config))}
