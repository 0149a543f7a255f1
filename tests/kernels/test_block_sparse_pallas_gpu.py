"""The Triton (GPU) kernels in interpret mode against the reference."""

from tests.kernels.block_sparse_test_base import BlockSparseSuite


class TestPallasGpuInterpret(BlockSparseSuite):
  IMPL = "pallas_gpu"
  INTERPRET = True
