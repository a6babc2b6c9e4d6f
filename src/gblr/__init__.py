"""gblr: Generalized Block Low-Rank layers with structure learned under a compute budget."""

from gblr import cost
from gblr.deploy import PackedGBLRLinear, deploy, load_packed, save_packed
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
    "deploy",
    "PackedGBLRLinear",
    "save_packed",
    "load_packed",
]
