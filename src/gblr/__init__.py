"""gblr: Generalized Block Low-Rank layers with structure learned under a compute budget."""

from gblr import cost
from gblr.accounting import FlopsReport, count_flops, flops_report
from gblr.convert import (
    CompressionConfig,
    compress,
    from_pretrained,
    load_compressed,
    save_compressed,
    save_sentence_transformer,
)
from gblr.deploy import (
    PackedGBLRLinear,
    TiledGBLRLinear,
    deploy,
    export_onnx,
    load_packed,
    save_packed,
)
from gblr.layers import (
    STRUCTURES,
    BlockDiagLinear,
    BlockLowRankLinear,
    BlockSparseLinear,
    GBLRConv2d,
    GBLRLinear,
    LowRankEmbedding,
    LowRankLinear,
    MonarchLinear,
    StructuredLinear,
    get_structure,
)
from gblr.ops import gaudi_mask
from gblr.projection import Calibration, ProjectionRecord, allocate, project, project_many
from gblr.train import BudgetController, SigmaSchedule, param_groups

__version__ = "0.1.0"

__all__ = [
    "cost",
    "gaudi_mask",
    "GBLRLinear",
    "GBLRConv2d",
    "LowRankLinear",
    "LowRankEmbedding",
    "MonarchLinear",
    "BlockSparseLinear",
    "BlockLowRankLinear",
    "BlockDiagLinear",
    "StructuredLinear",
    "STRUCTURES",
    "get_structure",
    "deploy",
    "PackedGBLRLinear",
    "TiledGBLRLinear",
    "save_packed",
    "load_packed",
    "export_onnx",
    "param_groups",
    "BudgetController",
    "SigmaSchedule",
    "project",
    "project_many",
    "allocate",
    "Calibration",
    "ProjectionRecord",
    "flops_report",
    "count_flops",
    "FlopsReport",
    "CompressionConfig",
    "compress",
    "save_compressed",
    "load_compressed",
    "from_pretrained",
    "save_sentence_transformer",
]
