"""Landmark grouped softmax: own-group tokens and earlier groups' landmarks share one softmax.

Used by the landmark mechanism. See api.py for the contract, reference.py for the formula.
"""

from effattn.kernels.grouped_softmax.api import (FAMILY, default_max_groups, grouped_softmax,
                                                relayout)
from effattn.kernels.grouped_softmax.reference import grouped_softmax_attention
from effattn.kernels.grouped_softmax.xla import chunked_grouped_softmax_attention

__all__ = ["FAMILY", "chunked_grouped_softmax_attention", "default_max_groups", "grouped_softmax",
           "grouped_softmax_attention", "relayout"]
