"""Public namespace of the cost rules: ``gblr.cost.<name>``.

The rules live in :mod:`gblr.core` (cost in :mod:`gblr.core.cost`, budgets in
:mod:`gblr.core.budget`, the widths orientation in :mod:`gblr.core.boxes`); this module
only gathers their names for users.
"""

from gblr.core.boxes import INPUT_AXIS, OUTPUT_AXIS
from gblr.core.budget import (
    budget_to_macs,
    check_budget,
    check_within_budget,
    max_rank_for_budget,
    units_within_budget,
    within_budget,
)
from gblr.core.cost import (
    block_cost,
    block_low_rank_cost,
    block_sparse_cost,
    blockdiag_cost,
    box_component_cost,
    dense_block_cheaper,
    dense_cost,
    grouped_component_cost,
    lowrank_cost,
    monarch_cost,
    padded_block_size,
)
from gblr.core.validate import check_positive

__all__ = [
    "INPUT_AXIS",
    "OUTPUT_AXIS",
    "check_budget",
    "check_positive",
    "dense_cost",
    "budget_to_macs",
    "lowrank_cost",
    "max_rank_for_budget",
    "dense_block_cheaper",
    "block_cost",
    "grouped_component_cost",
    "within_budget",
    "check_within_budget",
    "units_within_budget",
    "padded_block_size",
    "blockdiag_cost",
    "monarch_cost",
    "block_sparse_cost",
    "block_low_rank_cost",
    "box_component_cost",
]
