"""The blocked jnp path against the reference."""

from tests.kernels.block_sparse_test_base import BlockSparseSuite


class TestXla(BlockSparseSuite):
  IMPL = "xla"
