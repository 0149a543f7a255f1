"""Softmax attention: cuDNN fused attention (packed segments too), XLA, and the reference.

Used by softmax, sqa, routing (local heads), moh (shared heads), neural_memory and the dense
path of head_routing. See api.py for the contract.
"""

from effattn.kernels.softmax.api import FAMILY, softmax_attention
from effattn.kernels.softmax.common import attention_mask, sequence_index
from effattn.kernels.softmax.cudnn import packed_segments
from effattn.kernels.softmax.reference import attention_probs, reference_attention

__all__ = ["FAMILY", "attention_mask", "attention_probs", "packed_segments", "reference_attention",
           "sequence_index", "softmax_attention"]
