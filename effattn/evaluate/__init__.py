"""Evaluation from checkpoints."""
