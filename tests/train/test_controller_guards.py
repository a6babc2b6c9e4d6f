"""The budget controller says so when a run cannot be what its target promises."""

import warnings

import pytest
import torch
from torch import nn

from gblr import BudgetController, GBLRLinear


def _model(sigma=None):
    torch.manual_seed(0)
    return nn.Sequential(GBLRLinear(16, 24, sigma=sigma), nn.ReLU(), GBLRLinear(24, 8, sigma=sigma))


def test_collapsed_structure_warns_at_step_and_enforce():
    model = _model()
    ctl = BudgetController(model, 0.3, total_steps=10)
    with torch.no_grad():  # a too-large structure step switched every component off
        for m in model:
            if isinstance(m, GBLRLinear):
                m.widths.zero_()
    with pytest.warns(RuntimeWarning, match="below target=0.3") as record:
        ctl.step()
    with pytest.warns(RuntimeWarning, match="0 of .* components are on") as again:
        assert ctl.enforce() == 0.0
    # the warnings name the line that called the controller
    assert {w.filename for w in [*record, *again]} == {__file__}


def test_blurred_masks_warn_with_the_evaluated_cost():
    model = _model(sigma=1.0)
    ctl = BudgetController(model, 0.3, total_steps=10)
    with pytest.warns(RuntimeWarning, match="evaluate at 1.0000"):
        cost = ctl.enforce()
    assert cost <= 0.3
    assert ctl.evaluated_cost() == pytest.approx(1.0)
    assert "evaluated=1.0000" in repr(ctl)
    for m in model:
        if isinstance(m, GBLRLinear):
            m.sigma = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctl.enforce()  # sharp masks: nothing to warn about
    assert ctl.evaluated_cost() == pytest.approx(ctl.cost_fraction)


def test_state_of_another_run_is_refused():
    model = _model()
    state = BudgetController(model, 0.3, total_steps=10).state_dict()
    with pytest.raises(ValueError, match="target=0.3"):
        BudgetController(model, 0.5, total_steps=10).load_state_dict(state)
    with pytest.raises(ValueError, match="total_steps=10"):
        BudgetController(model, 0.3, total_steps=20).load_state_dict(state)
    BudgetController(model, 0.3, total_steps=10).load_state_dict(state)


@pytest.mark.parametrize("bad", [True, "0.3", b"0.3", float("nan"), 0.0, 1.5])
def test_budget_values_are_numbers_in_range(bad):
    with pytest.raises((TypeError, ValueError), match="target"):
        BudgetController(_model(), bad, total_steps=10)


@pytest.mark.parametrize("bad", [True, False, 2.5, "4"])
def test_sizes_are_integers_not_booleans(bad):
    with pytest.raises((TypeError, ValueError), match="in_features"):
        GBLRLinear(bad, 4)


def test_a_target_above_the_full_width_cost_warns_at_construction():
    # 4 full-width components of a 16 -> 24 layer cost 4 * 40 / 384 = 0.4167 of dense
    model = nn.Sequential(GBLRLinear(16, 24, rank_fraction=0.25))
    with pytest.warns(RuntimeWarning, match=r"full width \(0.4167 of dense\)") as record:
        BudgetController(model, 0.5, total_steps=10)
    assert {w.filename for w in record} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BudgetController(model, 0.4, total_steps=10)  # within reach: silent
