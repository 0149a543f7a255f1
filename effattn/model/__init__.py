"""Models: the shared decoder-only transformer with LM or classifier head."""

from effattn.model.transformer import Block, Transformer, compute_dtype

__all__ = ["Block", "Transformer", "compute_dtype"]
