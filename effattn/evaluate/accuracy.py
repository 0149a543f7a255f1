"""The `accuracy` eval task: loss, accuracy and perplexity over config.eval.split.

The split pass itself (`evaluate_split`) lives in effattn.train.evaluation, since the trainer
runs it too (evaluate/ builds on train/, never the reverse).
"""

from __future__ import annotations

from effattn.evaluate.registry import register_eval_task
from effattn.train.evaluation import evaluate_split
from effattn.train.state import split_model

__all__ = ["accuracy_task", "evaluate_split"]


@register_eval_task("accuracy")
def accuracy_task(model, config, workdir) -> dict:
  """Loss, accuracy and perplexity over config.eval.split (the trainer's eval metric)."""
  del workdir
  graphdef, params, rest = split_model(model)
  return evaluate_split(graphdef, params, rest, config.data, config.eval.split,
                        batch_size=config.eval.batch_size, max_examples=config.eval.max_examples)
