"""Structured linear layers: GBLR and the structured family it generalises."""

from gblr.layers.base import STRUCTURES, StructuredLinear, get_structure, register_structure
from gblr.layers.conv import GBLRConv2d
from gblr.layers.gblr import GBLRLinear

__all__ = [
    "STRUCTURES",
    "StructuredLinear",
    "get_structure",
    "register_structure",
    "GBLRLinear",
    "GBLRConv2d",
]
