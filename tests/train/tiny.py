"""The config file of the fault tests' subprocess runs:

    train.py --config=tests/train/tiny.py:<data_dir> --config.x=...

(effattn.testing.configs.tiny_subprocess_trainer; the in-process tests build the same tree.)
"""

from effattn.testing.configs import tiny_subprocess_trainer


def get_config(data_dir: str):
  return tiny_subprocess_trainer(data_dir)
