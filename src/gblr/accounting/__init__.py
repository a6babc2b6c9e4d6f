"""Cost accounting: per-layer reports and whole-model FLOP counts."""

from gblr.accounting.count import count_flops
from gblr.accounting.report import (
    FlopsReport,
    LayerCost,
    eval_parameters,
    flops_report,
    layer_cost,
)

__all__ = ["FlopsReport", "LayerCost", "flops_report", "layer_cost", "count_flops",
           "eval_parameters"]
