"""Learning GBLR structure while training: parameter groups, budget controller, sigma schedule.

The Lightning pieces (:class:`StructureCallback`, the LightningModule and the runner) live in
submodules that import ``lightning`` only when used.
"""

from gblr.train.controller import BudgetController, StructureCost, measure_costs, sharp_flops
from gblr.train.groups import (
    STRUCTURE_GROUP,
    adamw,
    gblr_layers,
    param_groups,
    structure_parameters,
)
from gblr.train.sigma import SigmaSchedule

__all__ = [
    "BudgetController",
    "StructureCost",
    "measure_costs",
    "sharp_flops",
    "STRUCTURE_GROUP",
    "adamw",
    "gblr_layers",
    "param_groups",
    "structure_parameters",
    "SigmaSchedule",
    "StructureCallback",
]


def __getattr__(name: str):
    if name == "StructureCallback":
        from gblr.train.callback import StructureCallback

        return StructureCallback
    raise AttributeError(f"module 'gblr.train' has no attribute {name!r}")
