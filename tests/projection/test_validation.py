"""gblr.allocate reports the real reason a layer's candidates failed."""

from __future__ import annotations

import pytest
import torch

import gblr
from gblr.projection.allocate import error_curve


def _w(out_f=24, in_f=16):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("budget", [0.5, 1.0])
def test_allocate_keeps_an_error_that_no_budget_avoids(budget):
    # every grid budget fails for the same reason, which has nothing to do with the budget
    with pytest.raises(ValueError, match=r"rank_per_component=100 exceeds") as info:
        gblr.allocate({"a": _w()}, budget, rank_per_component=100, progress=False,
                      grid=(0.2, 0.5))
    assert "below what the layers can reach" not in str(info.value)
    assert "'a'" in str(info.value)


def test_error_curve_keeps_an_error_that_no_budget_avoids():
    with pytest.raises(ValueError, match="rank_per_component=100 exceeds"):
        error_curve(_w(), "gblr", grid=(0.2, 0.5), rank_per_component=100)


def test_allocate_below_reach_names_why_the_smaller_budgets_failed():
    with pytest.raises(ValueError, match="below what the layers can reach") as info:
        gblr.allocate({"a": _w(), "b": _w(8, 8)}, 0.05, structure="monarch", progress=False,
                      grid=(0.05, 0.1, 0.5))
    text = str(info.value)
    assert "layer 'a': at budget 0.05: no candidate configuration fits" in text


def test_allocate_still_skips_budgets_a_structure_cannot_meet():
    budgets, _ = error_curve(_w(), "monarch", grid=(0.01, 0.5))
    assert budgets[-1] == 1.0 and len(budgets) == 2  # 0.01 is too small, 0.5 works
    split = gblr.allocate({"a": _w()}, 0.6, structure="monarch", progress=False,
                          grid=(0.01, 0.5))
    assert 0 < split["a"] <= 0.6
