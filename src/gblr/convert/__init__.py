"""Compress a pretrained model: choose layers, project them onto a structure, save, distil."""

from gblr.convert.config import CompressionConfig
from gblr.convert.hub import from_pretrained
from gblr.convert.io import load_compressed, save_compressed
from gblr.convert.replace import CompressionResult, compress
from gblr.convert.report import CompressionReport, LayerRecord
from gblr.convert.select import select_layers
from gblr.convert.sentence import save_sentence_transformer

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "CompressionResult",
    "LayerRecord",
    "compress",
    "from_pretrained",
    "load_compressed",
    "save_compressed",
    "save_sentence_transformer",
    "select_layers",
]
