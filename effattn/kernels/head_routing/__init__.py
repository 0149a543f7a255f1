"""Head-routed attention: per head, attention only for the tokens routed to it, gated.

Used by the moh mechanism (mixture-of-head attention). See api.py for the contract.
"""

from effattn.kernels.head_routing.api import FAMILY, head_routed_attention
from effattn.kernels.head_routing.common import BlockSizes, compact

__all__ = ["FAMILY", "BlockSizes", "compact", "head_routed_attention"]
