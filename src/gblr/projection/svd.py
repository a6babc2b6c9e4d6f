"""Truncated SVD, plain or whitened: the low-rank projection and the start of every search."""

from __future__ import annotations

import torch

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
    w = weight.detach().double()
    if calibration is not None:
        root = calibration.root().to(w.device)
        u, s, vh = torch.linalg.svd(w @ root, full_matrices=False)
        vh = vh @ calibration.pinv_root().to(w.device)
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    sq = s[:rank].sqrt()
    return (u[:, :rank] * sq).to(weight.dtype), (sq[:, None] * vh[:rank]).to(weight.dtype)
