"""Compress a pretrained model: choose layers, project them onto a structure, save, distil."""

from gblr.convert.config import CompressionConfig
from gblr.convert.io import load_compressed, save_compressed
from gblr.convert.replace import CompressionResult, compress
from gblr.convert.report import CompressionReport, LayerRecord
from gblr.convert.select import select_layers

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "CompressionResult",
    "LayerRecord",
    "compress",
    "load_compressed",
    "save_compressed",
    "select_layers",
]
