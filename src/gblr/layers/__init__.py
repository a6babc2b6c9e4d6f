"""Structured linear layers: GBLR and the structured family it generalises."""

from gblr.layers.base import STRUCTURES, StructuredLinear, get_structure, register_structure
from gblr.layers.blockdiag import BlockDiagLinear
from gblr.layers.blocklowrank import BlockLowRankLinear
from gblr.layers.blocksparse import BlockSparseLinear
from gblr.layers.conv import GBLRConv2d
from gblr.layers.embedding import LowRankEmbedding
from gblr.layers.gblr import GBLRLinear
from gblr.layers.lowrank import LowRankLinear
from gblr.layers.monarch import MonarchLinear

__all__ = [
    "STRUCTURES",
    "StructuredLinear",
    "get_structure",
    "register_structure",
    "GBLRLinear",
    "GBLRConv2d",
    "LowRankLinear",
    "MonarchLinear",
    "BlockSparseLinear",
    "BlockLowRankLinear",
    "BlockDiagLinear",
    "LowRankEmbedding",
]
