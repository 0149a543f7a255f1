"""The config a run saved in its workdir: `--config configs/saved.py:runs/mqar`.

eval.py uses it by default. Saved values are laid over configs/base.py so every field keeps its
type and stays overridable on the command line.
"""

from configs import base
from effattn.train.checkpoint import load_config, merge_into


def get_config(workdir: str):
  return merge_into(base.get_config(), load_config(workdir))
