"""gblr: Generalized Block Low-Rank layers with structure learned under a compute budget."""

from gblr import cost
from gblr.convert import (
    CompressionConfig,
    compress,
    load_compressed,
    save_compressed,
)
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
    "CompressionConfig",
    "compress",
    "save_compressed",
    "load_compressed",
]
