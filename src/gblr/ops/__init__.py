"""Differentiable operators: the Gaudi mask and its helpers, and cost-carrying custom ops."""

from gblr.ops.costed import costed_conv2d, costed_linear
from gblr.ops.gaudi import EVAL_MASK_THRESHOLD, gaudi_mask, round_to_grid

__all__ = ["EVAL_MASK_THRESHOLD", "gaudi_mask", "round_to_grid", "costed_linear", "costed_conv2d"]
