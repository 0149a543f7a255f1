"""The test kit: what the tests (and scripts that check numbers) share.

- tolerances.py: the one tolerance table and `assert_close(name, want, got, dtype=, reduction=)`.
- inputs.py: random inputs seeded by a case's name, packed-segment ids.
- kernels.py: which pallas_calls a lowered program holds (read with effattn/kernels/hlo.py).
- meshes.py: meshes of the 8 host devices, a fast CPU compile, an op's value and gradients.
- mechanisms.py: building mechanisms by hand or at the tiny size of the mechanism suite.
- oracles.py: the common oracles of every mechanism (causality, decode, segments, gradients).
- configs.py: the configs/base.py tree, tiny trainer and evaluation configs, a fresh model.
- mesh.py: a model's loss and gradients, or its compiled train step, on a mesh of host devices
  as the trainer places them, beside the one-device run.
- data.py: tiny `config.data` trees for the data tests.
- scripts.py: importing a script of scripts/ by path.

Nothing in effattn outside this package imports it (tests/test_imports.py).
"""

from effattn.testing.tolerances import assert_close, assert_trees_close, tolerance

__all__ = ["assert_close", "assert_trees_close", "tolerance"]
