r"""Trains a model: `python train.py --config configs/mqar.py --workdir runs/mqar`.

Any config field can be overridden (`--config.model.attention.name=linear`). Running the same
command again resumes from the newest verified checkpoint in --workdir; a resume whose config
differs from the saved one (outside steps, logging, eval and checkpoint settings) is refused
unless --allow_config_change is given. SIGINT / SIGTERM save the current step and stop.
"""

from absl import app, flags
from ml_collections import config_flags

from effattn.cli import parse_flags, run_main
from effattn.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, config.")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume although the config differs from the one saved in --workdir.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_main(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                      allow_config_change=_ALLOW_CHANGE.value))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
