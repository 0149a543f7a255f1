r"""Evaluates a checkpoint: `python eval.py --workdir runs/mqar [--step N]`.

Restores params only (no optimizer state) and writes <workdir>/eval.json (eval_<task>.json for
other tasks). The run's saved config is used unless --config is given; fields can be overridden
either way (`--config.eval.split=train`, `--config.eval.task=...`, `--config.data.seq_len=...`).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from effattn.cli import default_config_from_workdir, parse_flags, run_main
from effattn.evaluate.runner import evaluate_checkpoint

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file; default: the one saved in --workdir.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory written by train.py.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest that verifies.")
_OUTPUT = flags.DEFINE_string("output", None, "Report path; default: <workdir>/eval*.json.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_main(lambda: evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, step=_STEP.value,
                                       output=_OUTPUT.value))


if __name__ == "__main__":
  app.run(main, argv=default_config_from_workdir(sys.argv), flags_parser=parse_flags)
