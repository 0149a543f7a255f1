"""Block-sparse flash attention: one op that visits listed key blocks per query block.

Used by the routing, landmark and dynamic_mask mechanisms. See api.py for the contract.
"""

from effattn.kernels.block_sparse.api import IMPLS, block_sparse_attention
from effattn.kernels.block_sparse.common import (BlockSizes, block_mask_from_lists,
                                                 causal_block_mask, lists_from_block_mask)

__all__ = ["IMPLS", "BlockSizes", "block_mask_from_lists", "block_sparse_attention",
           "causal_block_mask", "lists_from_block_mask"]
