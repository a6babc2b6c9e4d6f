"""The core rules: boxes, budgets, the time model, module surgery and atomic files."""

import os

import numpy as np
import pytest
import torch
from torch import nn

from gblr.core import boxes, budget, files, surgery, timemodel
from gblr.core.cost import box_component_cost


def test_integer_boxes_round_clamp_and_wrap():
    widths = torch.tensor([[0.5, 1.2, -0.1], [0.25, 0.5, 1.0]])
    locations = torch.tensor([[0.75, -0.25, 1.5], [0.0, 0.9, 0.3]])
    i_len, i_start, o_len, o_start = boxes.integer_boxes(widths, locations, 8, 4)
    assert i_len.tolist() == [4, 8, 0]
    assert i_start.tolist() == [6, 6, 4]
    assert o_len.tolist() == [1, 2, 4]
    assert o_start.tolist() == [0, 0, 1]  # round(0.9 * 4) = 4 wraps to 0
    assert boxes.active(widths, 8, 4).tolist() == [False, True, False]


def test_sharp_cost_is_the_box_rule():
    gen = torch.Generator().manual_seed(0)
    widths, locations = torch.rand(2, 12, generator=gen), torch.rand(2, 12, generator=gen)
    expected = box_component_cost(*boxes.integer_boxes(widths, locations, 30, 20), 30, 20, 2)
    assert boxes.sharp_cost(widths, locations, 30, 20, 2) == expected


def test_sharp_costs_of_many_layers_equal_each_layer_alone():
    """One pass over several layers (mixed sizes, ranks and dtypes, shared and full-width
    boxes) gives each layer's own cost: boxes never group across layers."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(30, 20), (20, 30), (30, 20), (7, 5), (64, 64)]
    ranks = [1, 2, 1, 3, 1]
    widths = [torch.rand(2, k, generator=gen) * 1.3 - 0.15 for k in (12, 9, 12, 4, 30)]
    locations = [torch.rand(2, w.shape[1], generator=gen) * 3 - 1 for w in widths]
    widths[2], locations[2] = widths[0].clone(), locations[0].clone()  # the same boxes
    widths[4][:, :10] = 1.0
    widths[3], locations[3] = widths[3].double(), locations[3].double()
    alone = [boxes.sharp_cost(w, loc, i, o, r)
             for w, loc, (i, o), r in zip(widths, locations, shapes, ranks, strict=True)]
    together = boxes.sharp_costs(widths, locations, [i for i, _ in shapes],
                                 [o for _, o in shapes], ranks)
    assert together == alone and alone[0] == alone[2] > 0


def test_box_costs_of_layers_too_large_for_one_key_group_row_by_row():
    """Two 70000x70000 layers: the packed key would overflow, so boxes are grouped row by
    row, still per layer."""
    from gblr.core.cost import box_component_costs

    n = 70000
    lens = np.array([5, 5, 5, n, 3])
    starts = np.array([1, 1, 1, 9, 0])
    layer = np.array([0, 0, 1, 1, 1])
    got = box_component_costs(lens, starts, lens, starts, n, n, 1, layer, 2)
    # layer 0: one 5x5 block of rank 2; layer 1: the 5x5 box alone, a full-width n x n
    # box of rank 1, a 3x3 box
    assert got.tolist() == [min(2 * 10, 25), min(10, 25) + 2 * n + min(6, 9)]


def _support(length, start, n):
    return (torch.remainder(torch.arange(n) - start, n) < length)


@pytest.mark.parametrize("in_features,out_features", [(9, 6), (30, 20), (100000, 100000)])
def test_box_cost_groups_identical_boxes_as_the_support_rule_does(in_features, out_features):
    """Identical boxes form one block (shared lengths and starts, and full-length boxes
    wherever they start); the last shape is too large for one integer key per box, so the
    boxes are grouped row by row."""
    from gblr.core.cost import grouped_component_cost

    gen = torch.Generator().manual_seed(in_features)
    k = 60
    i_len = torch.randint(0, 4, (k,), generator=gen).clamp(max=in_features)
    i_len[:8] = in_features
    i_start = torch.randint(0, 3, (k,), generator=gen)
    o_len = torch.randint(0, out_features + 1, (k,), generator=gen)
    o_start = torch.randint(0, out_features, (k,), generator=gen)
    ranks = torch.randint(1, 4, (k,), generator=gen)
    on = (i_len > 1) & (o_len > 1)
    in_support = torch.stack([_support(m, s, in_features) for m, s in zip(i_len, i_start,
                                                                        strict=True)])
    out_support = torch.stack([_support(m, s, out_features) for m, s in zip(o_len, o_start,
                                                                          strict=True)])
    expected = grouped_component_cost(in_support[on], out_support[on], ranks[on])
    got = box_component_cost(i_len, i_start, o_len, o_start, in_features, out_features, ranks)
    assert got == expected


def test_fit_widths_finds_the_smallest_shared_shrink():
    widths = torch.tensor([[1.0, 0.6, 0.3], [1.0, 0.6, 0.3]])

    def cost(w):
        return float(w.sum())

    fitted = boxes.fit_widths(widths, cost, 2.0)
    assert cost(fitted) <= 2.0
    assert cost(boxes.shrink_widths(widths, float((widths - fitted).max()) - 1e-6)) > 2.0
    assert torch.equal(boxes.fit_widths(widths, cost, 10.0), widths)  # already fits


def test_bisect_keeps_its_invariant():
    lo, hi = boxes.bisect(lambda t: t < 0.3, 0.0, 1.0, 30)
    assert lo < 0.3 <= hi and hi - lo < 1e-8


def test_budget_names_and_tolerance():
    assert budget.fits(100 * (1 + 1e-12), 100) and not budget.fits(101, 100)
    assert budget.budget_to_macs(0.5, 10, 20) == 100
    assert budget.max_rank_for_budget(10, 20, 0.5) == 3  # 3 * 30 <= 100 < 4 * 30
    for bad in (True, "0.5", 0.0, 1.5, float("nan")):
        with pytest.raises((TypeError, ValueError), match="budget"):
            budget.check_budget(bad)


def test_time_model_formulas_and_device_table():
    model = timemodel.TimeModel(memory_tokens=4, overhead=100.0, io=2.0)
    assert model.gemm(1, 3, 5) == 4 * 3 * 5 + 2.0 * 1 * (3 + 5) + 100.0
    assert model.gemm(10, 3, 5) == 10 * 3 * 5 + 2.0 * 10 * 8 + 100.0
    assert model.band(10, 2, 7, pieces=2) == (10 * 2 + 2.0 * 10) * 7 + 200.0
    assert model.scaled(2.0, 0.5) == timemodel.TimeModel(4, 200.0, 1.0)
    cpu = timemodel.time_model("cpu", 64)
    assert (cpu.memory_tokens, cpu.overhead, cpu.io) == timemodel.TIME_MODELS["cpu"]
    decode = timemodel.time_model("cpu", 1)
    assert (decode.overhead, decode.io) == timemodel.VECTOR_TIME_MODELS["cpu"]
    assert timemodel.time_model("cuda", 1).overhead == timemodel.TIME_MODELS["cuda"][1]
    assert timemodel.time_model("mps", 64) == cpu  # unknown devices use the CPU entry
    assert timemodel.time_model("cpu", 64, overhead=7.0).overhead == 7.0


def test_replace_modules_is_all_or_nothing():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    before = [id(m) for m in model.modules()]

    def failing(name, module):
        if name == "1.0":
            raise ValueError("cannot build")
        return nn.Identity()

    with pytest.raises(ValueError, match="cannot build"):
        surgery.replace_modules(model, [("0", model[0]), ("1.0", model[1][0])], failing)
    assert [id(m) for m in model.modules()] == before
    made = surgery.replace_modules(model, [("0", model[0]), ("1.0", model[1][0])],
                                   lambda name, module: nn.Identity())
    assert list(made) == ["0", "1.0"]
    assert isinstance(model[0], nn.Identity) and isinstance(model[1][0], nn.Identity)
    old = surgery.set_submodule(model, "1.1", nn.Tanh())
    assert isinstance(old, nn.ReLU) and isinstance(model[1][1], nn.Tanh)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    files.write_text_atomic(target, "one")
    assert target.read_text() == "one"

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        files.write_text_atomic(target, "two")
    monkeypatch.undo()
    assert target.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
