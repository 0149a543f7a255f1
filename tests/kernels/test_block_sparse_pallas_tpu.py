"""The Mosaic TPU kernels in interpret mode against the reference."""

from tests.kernels.block_sparse_test_base import BlockSparseSuite


class TestPallasTpuInterpret(BlockSparseSuite):
  IMPL = "pallas_tpu"
  INTERPRET = True
