"""Budgets in time: ``project(..., cost="time", tokens=T)`` meets a fraction of the dense
layer's predicted deployed time, with MACs reported beside it."""

import pytest
import torch

import gblr
from gblr.core.timemodel import MeasuredTimes, TimeModel

#: a fixed, made-up calibration: the tests do not depend on this machine's timings
MEASURED = MeasuredTimes(
    key="test", seconds_per_mac=1e-10,
    regimes={1: TimeModel(4, 4_000, 8), 64: TimeModel(4, 4_000, 4),
             2048: TimeModel(4, 4_000, 1)},
)


def _weight(seed=0):
    torch.manual_seed(seed)
    s = torch.arange(1, 97, dtype=torch.float32).pow(-0.7)
    u, _ = torch.linalg.qr(torch.randn(160, 96))
    v, _ = torch.linalg.qr(torch.randn(96, 96))
    return (u * s) @ v.t()


@pytest.mark.parametrize("structure", ["lowrank", "monarch", "gblr"])
@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_time_budget_is_met_and_reported(structure, tokens):
    w = _weight()
    extra = {"steps": 0} if structure == "gblr" else {}
    layer, rec = gblr.project(w, 0.5, structure=structure, cost="time", tokens=tokens,
                              measured=MEASURED, progress=False, **extra)
    assert rec.cost_kind == "time" and rec.tokens == tokens and rec.budget == 0.5
    assert 0 < rec.time_fraction <= 0.5
    assert rec.cost == layer.macs() and rec.cost < rec.dense_cost
    assert rec.error == pytest.approx(
        float((layer.to_dense().detach() - w).norm() / w.norm()), rel=1e-5)


def test_more_time_buys_more_macs_and_less_error():
    w = _weight(1)
    recs = [gblr.project(w, b, structure="lowrank", cost="time", tokens=64,
                         measured=MEASURED, progress=False)[1] for b in (0.3, 0.6)]
    assert recs[0].cost < recs[1].cost and recs[0].error > recs[1].error


def test_overhead_bound_calls_get_fewer_macs():
    """One token per call pays per-call overheads: the same time budget buys fewer MACs."""
    w = _weight(2)
    one = gblr.project(w, 0.5, structure="lowrank", cost="time", tokens=1, measured=MEASURED,
                       progress=False)[1]
    many = gblr.project(w, 0.5, structure="lowrank", cost="time", tokens=2048,
                        measured=MEASURED, progress=False)[1]
    assert one.cost < many.cost


def test_from_dense_takes_a_time_budget():
    w = _weight(3)
    layer = gblr.GBLRLinear.from_dense(w, 0.5, steps=0, cost="time", tokens=64,
                                       measured=MEASURED)
    assert layer.macs() < w.numel() * 0.5 + 1


def test_bad_time_budgets_are_refused():
    w = _weight()
    with pytest.raises(ValueError, match="tokens="):
        gblr.project(w, 0.5, structure="lowrank", cost="time", measured=MEASURED)
    with pytest.raises(ValueError, match="cost must be one of"):
        gblr.project(w, 0.5, structure="lowrank", cost="seconds")
    with pytest.raises(ValueError, match="go with cost='time'"):
        gblr.project(w, 0.5, structure="lowrank", tokens=64)
    slow = MeasuredTimes("slow", 1e-10, {1: TimeModel(4, 1e9, 8)})  # overhead dominates
    with pytest.raises(ValueError, match="no layer of this structure"):
        gblr.project(w, 0.3, structure="lowrank", cost="time", tokens=1, measured=slow)
