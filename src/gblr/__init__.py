"""gblr: Generalized Block Low-Rank layers with structure learned under a compute budget."""

from gblr import cost
from gblr.layers import (
    STRUCTURES,
    BlockDiagLinear,
    BlockLowRankLinear,
    BlockSparseLinear,
    GBLRLinear,
    LowRankLinear,
    MonarchLinear,
    StructuredLinear,
    get_structure,
)
from gblr.ops import gaudi_mask
from gblr.train import BudgetController, SigmaSchedule, param_groups

__version__ = "0.1.0"

__all__ = [
    "cost",
    "gaudi_mask",
    "GBLRLinear",
    "LowRankLinear",
    "MonarchLinear",
    "BlockSparseLinear",
    "BlockLowRankLinear",
    "BlockDiagLinear",
    "StructuredLinear",
    "STRUCTURES",
    "get_structure",
    "param_groups",
    "BudgetController",
    "SigmaSchedule",
]
