"""Budgets in time: the MAC budget whose deployed layer runs within a fraction of dense time.

A time budget ``b`` on a device and token regime asks for a layer whose *predicted deployed
time* (the time model of :mod:`gblr.core.timemodel`, calibrated on that device) is at most
``b`` times the dense layer's. The deployed form of a GBLR layer is its packing for those
tokens (planned with the same calibrated model); every other structure runs its own GEMMs.
The MAC budget that meets it is found by bisection, and MACs are reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gblr.core.budget import check_budget
from gblr.core.timemodel import MeasuredTimes, calibrate, load_calibration, predict_seconds
from gblr.core.validate import check_positive
from gblr.layers.base import StructuredLinear
from gblr.layers.gblr import GBLRLinear

__all__ = ["COST_KINDS", "deployed_seconds", "measured_times", "mac_budget_for_time"]

#: What a budget is a fraction of: the dense layer's MACs, or its predicted deployed time.
COST_KINDS = ("macs", "time")


def measured_times(device: str, dtype: torch.dtype) -> MeasuredTimes:
    """This device's cached calibration, calibrating (and caching) it when there is none."""
    return load_calibration(device, dtype) or calibrate(device, dtype)


def deployed_seconds(layer: nn.Module, tokens: int, measured: MeasuredTimes) -> float:
    """Predicted seconds of ``layer``'s deployed form on ``tokens`` tokens (a GBLR layer:
    its packing for ``tokens``, planned with ``measured``'s model at that token count)."""
    if isinstance(layer, GBLRLinear):
        model = measured.model_for(tokens)
        layer = layer.packed(tokens=tokens, memory_tokens=model.memory_tokens,
                             overhead=model.overhead, io=model.io)
    return predict_seconds(layer, tokens, measured)


def mac_budget_for_time(
    build: Callable[[float], StructuredLinear],
    in_features: int,
    out_features: int,
    time_budget: float,
    tokens: int,
    measured: MeasuredTimes,
    iters: int = 10,
) -> tuple[float, StructuredLinear, float]:
    """The largest MAC budget whose layer ``build(mac_budget)`` is predicted to deploy within
    ``time_budget`` of the dense layer's time at ``tokens`` tokens.

    Returns ``(mac_budget, layer, time_fraction)``. Raises ``ValueError`` when even the
    smallest layer the structure can build is predicted slower than that.
    """
    time_budget = check_budget(time_budget, "budget")
    tokens = check_positive("tokens", tokens)
    dense = predict_seconds(nn.Linear(in_features, out_features), tokens, measured)
    target = time_budget * dense

    def attempt(b: float) -> tuple[StructuredLinear, float] | None:
        try:
            layer = build(b)
        except ValueError:  # below the structure's smallest configuration
            return None
        return layer, deployed_seconds(layer, tokens, measured) / dense

    full = attempt(1.0)
    if full is not None and full[1] <= time_budget:
        return 1.0, full[0], full[1]
    lo, best = 0.0, None
    hi = 1.0
    for _ in range(int(iters)):
        mid = 0.5 * (lo + hi)
        got = attempt(mid)
        if got is not None and got[1] <= time_budget:
            lo, best = mid, got
        else:
            hi = mid
    if best is None:
        raise ValueError(
            f"no layer of this structure is predicted to run within budget={time_budget} of "
            f"the dense {out_features}x{in_features} layer's time at {tokens} tokens on this "
            f"device ({target * 1e6:.1f} us of {dense * 1e6:.1f} us); raise the budget or the "
            "tokens per call"
        )
    return lo, best[0], best[1]
