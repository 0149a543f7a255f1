"""Block-sparse flash attention: one op that visits listed key blocks per query block.

Used by the routing and dynamic_mask mechanisms and by softmax's packed-segment fallback.
See api.py for the contract.
"""

from effattn.kernels.block_sparse.api import FAMILY, block_sparse_attention
from effattn.kernels.block_sparse.common import (BlockSizes, block_mask_from_lists,
                                                 block_size_for, causal_block_mask,
                                                 lists_from_block_mask)

__all__ = ["FAMILY", "BlockSizes", "block_mask_from_lists", "block_size_for",
           "block_sparse_attention", "causal_block_mask", "lists_from_block_mask"]
