"""Differentiable operators: the Gaudi mask and its helpers."""

from gblr.ops.gaudi import EVAL_MASK_THRESHOLD, gaudi_mask, round_to_grid

__all__ = ["EVAL_MASK_THRESHOLD", "gaudi_mask", "round_to_grid"]
