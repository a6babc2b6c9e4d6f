"""``gblr.project``: one dense matrix onto a structure at an exact budget."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gblr.core.budget import budget_to_macs, check_budget, max_rank_for_budget, within_budget
from gblr.core.timemodel import MeasuredTimes
from gblr.core.validate import check_positive
from gblr.layers.base import StructuredLinear, check_bias, check_matrix, get_structure, provide
from gblr.projection.calibration import Calibration, as_calibration, relative_error
from gblr.projection.search import SearchOptions, search_gblr
from gblr.projection.svd import lowrank_factors
from gblr.projection.timebudget import (
    COST_KINDS,
    deployed_seconds,
    mac_budget_for_time,
    measured_times,
)

__all__ = ["project", "ProjectionRecord", "DEFAULT_STEPS"]

#: Gradient steps of the GBLR structure search when ``steps=None``.
DEFAULT_STEPS = 30


@dataclass
class ProjectionRecord:
    """What one projection did: the layer's name and shape, budget, errors, cost and time.

    ``error`` and ``svd_error`` are relative (``||W_hat - W|| / ||W||``, or the output
    error ``||(W_hat - W) C^{1/2}|| / ||W C^{1/2}||`` when calibrated); ``svd_error`` is the
    truncated (whitened) SVD's at the same budget (for GBLR with ``rank_per_component``
    r > 1, at the largest rank that is a multiple of r, the SVD start's). ``cost`` is the
    evaluation-mode MACs per token and ``dense_cost`` the dense layer's.
    """

    name: str
    shape: tuple[int, int]
    structure: str
    budget: float
    error: float
    svd_error: float
    cost: int
    dense_cost: int
    time: float
    start: str = ""
    data_aware: bool = False
    #: what ``budget`` is a fraction of: ``"macs"`` or ``"time"`` (predicted deployed time)
    cost_kind: str = "macs"
    #: the predicted deployed time over the dense layer's (with ``cost_kind="time"``)
    time_fraction: float | None = None
    #: the tokens per call the time was predicted for
    tokens: int | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _resolve_device(weight: torch.Tensor, device: torch.device | str | None) -> torch.device:
    if device is None:
        return weight.device
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available")
    return dev


def _lowrank_layer(
    weight: torch.Tensor, budget: float, bias: torch.Tensor | None, calibration: Calibration
) -> StructuredLinear:
    out_features, in_features = weight.shape
    rank = max_rank_for_budget(in_features, out_features, budget)
    if rank == 0:
        raise ValueError(
            f"budget={budget} is too small for rank 1 on a {out_features}x{in_features} weight"
        )
    u, v = lowrank_factors(weight, rank, calibration)
    cls = get_structure("lowrank")
    layer = cls(in_features, out_features, rank=rank, bias=bias is not None,
                device=weight.device, dtype=weight.dtype)
    layer.load_tensors(bias, U=u, V=v)
    return layer


def project(
    weight: torch.Tensor,
    budget: float,
    *,
    structure: str = "gblr",
    rank_per_component: int = 1,
    steps: int | None = None,
    calibration: Calibration | torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    bias: torch.Tensor | None = None,
    name: str = "",
    cost: str = "macs",
    tokens: int | None = None,
    measured: MeasuredTimes | None = None,
    **opts: Any,
) -> tuple[StructuredLinear, ProjectionRecord]:
    """Project a dense ``(out, in)`` matrix onto ``structure`` within ``budget``.

    Args:
        weight: the dense matrix (finite, floating point).
        budget: fraction of the dense cost in ``(0, 1]``; the result's evaluation-mode
            ``macs()`` is at most ``budget * in * out``.
        structure: ``"gblr"`` (structure search, see :mod:`gblr.projection.search`) or any
            registered structure (``"lowrank"``, ``"monarch"``, ``"blocksparse"``, ...),
            which uses that class's own ``from_dense``.
        rank_per_component: rank of each GBLR component.
        steps: gradient steps of the GBLR structure search (None: ``DEFAULT_STEPS``;
            0: return the truncated-SVD start).
        calibration: None (weight-space error), inputs ``X`` of shape ``(N, in)`` as a
            tensor, or a :class:`Calibration` (use ``Calibration.from_second_moment(C)``
            for a second moment). With it the output error ``||(W_hat - W) X^T||`` is
            minimised; ``"lowrank"`` then uses the whitened SVD. Other baselines ignore
            the data only in their projection; the reported error is still data-aware.
        device: where to compute (default: ``weight``'s device); the layer stays there.
        progress: show a progress bar during the GBLR search.
        bias: optional bias copied into the layer.
        name: label stored in the record.
        cost: ``"macs"`` (``budget`` is a fraction of the dense MACs) or ``"time"`` (a
            fraction of the dense layer's predicted deployed time at ``tokens`` tokens per
            call on ``device``, from the calibrated time model: see
            :mod:`gblr.projection.timebudget`); the record reports both.
        tokens: tokens per call, with ``cost="time"``.
        measured: the calibration to predict with (default: this device's cached one,
            calibrated on first use).
        **opts: GBLR search settings, see :class:`SearchOptions` (unknown keys raise).

    Returns ``(layer, record)``; the layer is in evaluation mode.
    """
    if cost not in COST_KINDS:
        raise ValueError(f"cost must be one of {COST_KINDS}, got {cost!r}")
    if cost == "time":
        return _project_in_time(weight, budget, structure, rank_per_component, steps,
                                calibration, device, progress, bias, name, tokens, measured,
                                opts)
    if tokens is not None or measured is not None:
        raise ValueError("tokens= and measured= go with cost='time'")
    check_matrix(weight)
    budget = check_budget(budget)
    out_features, in_features = weight.shape
    check_bias(bias, out_features)
    r = check_positive("rank_per_component", rank_per_component)
    if steps is None:
        steps = DEFAULT_STEPS
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer or None, got {steps!r}")
    cal = as_calibration(calibration, in_features)
    dev = _resolve_device(weight, device)
    w = weight.detach().to(dev)
    if cal is not None:
        cal = cal.to(dev)
    t0 = time.perf_counter()
    if structure == "gblr":
        min_dim = min(in_features, out_features)
        if r > min_dim:
            raise ValueError(
                f"rank_per_component={r} exceeds min(in_features, out_features)={min_dim}"
            )
        if max_rank_for_budget(in_features, out_features, budget) < r:
            raise ValueError(
                f"budget={budget} is too small for one rank-{r} component of a "
                f"{out_features}x{in_features} matrix (needs {r * (in_features + out_features)} "
                f"MACs, budget allows {budget_to_macs(budget, in_features, out_features):.0f})"
            )
        search_opts = SearchOptions.from_kwargs(opts)
        layer, info = search_gblr(
            w.float() if w.dtype not in (torch.float32, torch.float64) else w, budget,
            rank_per_component=r, steps=steps, calibration=cal, progress=progress,
            opts=search_opts,
        )
        layer = layer.to(dtype=weight.dtype)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.detach().to(dev, weight.dtype).clone())
        svd_error, start = info["svd_error"], info["start"]
    else:
        if opts:
            raise TypeError(f"options {sorted(opts)} apply only to structure='gblr'")
        cls = get_structure(structure)
        b = None if bias is None else bias.detach().to(dev)
        if structure == "lowrank" and cal is not None:
            layer = _lowrank_layer(w, budget, b, cal)
        else:
            layer = cls.from_dense(w, budget, b)
        svd_u, svd_v = lowrank_factors(w, max(1, max_rank_for_budget(
            in_features, out_features, budget)), cal)
        svd_error = relative_error(svd_u @ svd_v, w, cal)
        start = "closed form"
    layer.eval()
    with torch.no_grad():
        error = relative_error(layer.to_dense(), w, cal)
    cost = int(layer.macs())
    if not within_budget(cost, budget, in_features, out_features):
        raise RuntimeError(
            f"{structure} projection costs {cost} MACs, over the budget "
            f"{budget_to_macs(budget, in_features, out_features):.0f}"
        )
    record = ProjectionRecord(
        name=name, shape=(out_features, in_features), structure=structure, budget=budget,
        error=error, svd_error=svd_error, cost=cost, dense_cost=in_features * out_features,
        time=time.perf_counter() - t0, start=start, data_aware=cal is not None,
    )
    return layer, record


def _project_in_time(weight, budget, structure, rank_per_component, steps, calibration,
                     device, progress, bias, name, tokens, measured, opts):
    """:func:`project` with ``cost="time"``: the largest MAC budget whose deployed layer is
    predicted within ``budget`` of the dense layer's time (found with GBLR's search off), then,
    for GBLR, the searched projection at that MAC budget where it still fits the time budget
    and approximates better."""
    check_matrix(weight)
    budget = check_budget(budget)
    if tokens is None:
        raise ValueError("cost='time' needs tokens= (the tokens per call of the deployment)")
    t0 = time.perf_counter()
    dev = _resolve_device(weight, device)
    measured = measured or measured_times(dev.type, weight.dtype)
    out_features, in_features = weight.shape
    common = {"structure": structure, "calibration": calibration, "device": device,
              "bias": bias, "name": name, **opts}
    if structure == "gblr":
        common["rank_per_component"] = rank_per_component

    def build(b: float) -> StructuredLinear:
        return project(weight, b, progress=False, **common,
                       **({"steps": 0} if structure == "gblr" else {}))[0]

    mac_budget, layer, fraction = mac_budget_for_time(
        build, in_features, out_features, budget, tokens, measured)
    cal = as_calibration(calibration, in_features)
    w = weight.detach().to(dev)
    if cal is not None:
        cal = cal.to(dev)
    with torch.no_grad():
        error = relative_error(layer.to_dense(), w, cal)
    start = "svd" if structure == "gblr" else "closed form"
    if structure == "gblr" and steps != 0:
        searched, rec = project(weight, mac_budget, progress=progress, steps=steps, **common)
        dense = deployed_seconds(torch.nn.Linear(in_features, out_features), tokens, measured)
        searched_fraction = deployed_seconds(searched, tokens, measured) / dense
        if searched_fraction <= budget and rec.error < error:
            layer, fraction, error, start = searched, searched_fraction, rec.error, rec.start
    rank = max(1, max_rank_for_budget(in_features, out_features, mac_budget))
    svd_u, svd_v = lowrank_factors(w, rank, cal)
    record = ProjectionRecord(
        name=name, shape=(out_features, in_features), structure=structure, budget=budget,
        error=error, svd_error=relative_error(svd_u @ svd_v, w, cal), cost=int(layer.macs()),
        dense_cost=in_features * out_features, time=time.perf_counter() - t0, start=start,
        data_aware=cal is not None, cost_kind="time", time_fraction=float(fraction),
        tokens=int(tokens),
    )
    return layer.eval(), record


def project_gblr(
    weight: torch.Tensor,
    budget: float,
    *,
    bias: torch.Tensor | None = None,
    calibration: Calibration | torch.Tensor | None = None,
    second_moment: torch.Tensor | None = None,
    **kwargs: Any,
) -> StructuredLinear:
    """``GBLRLinear.from_dense``: :func:`project` onto GBLR, calibration given as inputs, a
    :class:`Calibration` or an input second moment ``C = X^T X / N``; returns the layer."""
    if second_moment is not None:
        if calibration is not None:
            raise ValueError("pass either calibration= or second_moment=, not both")
        calibration = Calibration.from_second_moment(second_moment)
    layer, _ = project(weight, budget, structure="gblr", calibration=calibration, bias=bias,
                       **kwargs)
    return layer


provide("project_gblr", project_gblr)
