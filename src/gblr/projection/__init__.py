"""Projection of dense matrices onto GBLR and its relatives, at an exact budget."""

from gblr.projection.allocate import allocate, error_curve, split_budget
from gblr.projection.batch import project_many
from gblr.projection.calibration import Calibration, relative_error
from gblr.projection.project import ProjectionRecord, project
from gblr.projection.search import SearchOptions, fit_to_budget, layer_cost
from gblr.projection.svd import lowrank_factors

__all__ = [
    "project",
    "project_many",
    "allocate",
    "error_curve",
    "split_budget",
    "Calibration",
    "ProjectionRecord",
    "SearchOptions",
    "relative_error",
    "lowrank_factors",
    "fit_to_budget",
    "layer_cost",
]
