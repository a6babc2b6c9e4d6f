"""Truncated SVD, plain or whitened: the low-rank projection and the start of every search."""

from __future__ import annotations

import torch

from gblr.layers.blocks import truncated_svd_factors
from gblr.projection.calibration import Calibration

__all__ = ["lowrank_factors"]


def lowrank_factors(
    weight: torch.Tensor, rank: int, calibration: Calibration | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``U (out, rank)``, ``V (rank, in)`` of the best rank-``rank`` approximation.

    Without calibration this is the truncated SVD (optimal in Frobenius norm). With it,
    the whitened SVD: ``U V = [W C^{1/2}]_rank C^{+1/2}``, which minimises the output error
    ``||(U V - W) C^{1/2}||_F`` over rank-``rank`` matrices. Factors share the singular
    values' square roots; computed in float64 and returned in ``weight``'s dtype.
    """
    moments = None if calibration is None else calibration.second_moment
    return truncated_svd_factors(weight.detach(), rank, moments)
