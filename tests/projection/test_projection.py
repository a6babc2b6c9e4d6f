import math

import pytest
import torch

import gblr
from gblr.cost import box_component_cost
from gblr.projection import Calibration, error_curve, layer_cost, relative_error


@pytest.fixture(autouse=True)
def _one_thread():
    # small matrices: LAPACK threads only add contention on a shared machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _svd_err(w, budget, cal=None):
    o, i = w.shape
    rank = gblr.cost.max_rank_for_budget(i, o, budget)
    u, v = gblr.projection.lowrank_factors(w, rank, cal)
    return relative_error(u @ v, w, cal)


@pytest.mark.parametrize("shape", [(8, 8), (13, 7), (7, 13), (32, 48), (50, 20), (33, 65)])
@pytest.mark.parametrize("budget", [0.15, 0.4, 0.75, 1.0])
def test_budget_exact_and_never_worse_than_svd(shape, budget):
    torch.manual_seed(sum(shape))
    w = torch.randn(*shape) * torch.linspace(0.2, 2.0, shape[1])
    o, i = shape
    if gblr.cost.max_rank_for_budget(i, o, budget) == 0:
        with pytest.raises(ValueError, match="too small"):
            gblr.project(w, budget, progress=False)
        return
    layer, rec = gblr.project(w, budget, steps=5, progress=False)
    layer.eval()
    assert layer.macs() == rec.cost <= budget * i * o
    assert layer_cost(layer) == layer.macs()
    assert rec.svd_error == pytest.approx(_svd_err(w, budget), abs=1e-5)
    assert rec.error <= rec.svd_error + 1e-6
    assert rec.error == pytest.approx(relative_error(layer.to_dense(), w), abs=1e-6)


def test_box_cost_matches_flops():
    torch.manual_seed(0)
    for _ in range(20):
        layer = gblr.GBLRLinear(24, 17, num_components=9, init="random")
        with torch.no_grad():
            layer.widths.uniform_(0, 1)
            layer.locations.uniform_(0, 1)
            layer.widths[:, :2] = 1.0
            layer.widths[:, 2:4] = torch.tensor([[0.5], [0.5]])
            layer.locations[:, 2:4] = 0.25
        layer.eval()
        assert layer_cost(layer) == layer.macs()
    assert box_component_cost(torch.tensor([1]), torch.tensor([0]), torch.tensor([5]),
                              torch.tensor([0]), 4, 5) == 0


def test_lowrank_plus_block_diagonal_is_recovered():
    torch.manual_seed(1)
    n, nb, rank = 64, 4, 2
    low = torch.randn(n, rank) @ torch.randn(rank, n) / 4
    blocks = torch.block_diag(*[torch.randn(n // nb, n // nb) for _ in range(nb)])
    w = low + blocks
    true_cost = rank * 2 * n + n * n // nb
    budget = true_cost / (n * n)
    layer, rec = gblr.project(w, budget, progress=False)
    assert layer.macs() <= true_cost
    assert rec.error < 0.05
    assert rec.svd_error > 0.3  # low rank at the same cost is far worse


def test_data_aware_beats_weight_space_on_output_error():
    torch.manual_seed(2)
    x = torch.randn(512, 32) * torch.logspace(-1.5, 0.5, 32)
    w = torch.randn(24, 32)
    cal = Calibration.from_inputs(x)
    for structure in ("gblr", "lowrank"):
        _, plain = gblr.project(w, 0.3, structure=structure, steps=5, progress=False)
        layer_p, _ = gblr.project(w, 0.3, structure=structure, steps=5, progress=False)
        layer_d, rec_d = gblr.project(w, 0.3, structure=structure, steps=5, calibration=x,
                                      progress=False)
        out_plain = relative_error(layer_p.to_dense(), w, cal)
        out_data = relative_error(layer_d.to_dense(), w, cal)
        assert rec_d.data_aware and rec_d.error == pytest.approx(out_data, abs=1e-6)
        assert out_data < 0.8 * out_plain
        assert rec_d.error <= rec_d.svd_error + 1e-6
    # the second moment gives the same result as the inputs
    c = x.t().double() @ x.double() / x.shape[0]
    layer_c = gblr.GBLRLinear.from_dense(w, 0.3, steps=0, second_moment=c)
    layer_x = gblr.GBLRLinear.from_dense(w, 0.3, steps=0, calibration=x)
    torch.testing.assert_close(layer_c.to_dense(), layer_x.to_dense(), atol=1e-4, rtol=1e-4)


def test_from_dense_steps_zero_is_svd_start_and_keeps_bias():
    torch.manual_seed(3)
    w, b = torch.randn(20, 30), torch.randn(20)
    layer = gblr.GBLRLinear.from_dense(w, 0.5, bias=b, steps=0).eval()
    rank = gblr.cost.max_rank_for_budget(30, 20, 0.5)
    assert layer.num_components == 20
    assert int(layer.active_components().sum()) == rank
    assert layer.macs() == rank * 50
    assert relative_error(layer.to_dense(), w) == pytest.approx(_svd_err(w, 0.5), abs=1e-5)
    x = torch.randn(3, 5, 30)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().t() + b)


def test_project_many_and_allocate_respect_totals():
    torch.manual_seed(4)
    weights = {
        "flat": torch.randn(24, 24),
        "steep": torch.randn(24, 4) @ torch.randn(4, 24) + 0.05 * torch.randn(24, 24),
        "wide": torch.randn(16, 40) * torch.linspace(0.1, 1, 40),
    }
    sizes = {n: w.numel() for n, w in weights.items()}
    for structure in ("lowrank", "gblr"):
        split = gblr.allocate(weights, 0.3, structure=structure, progress=False,
                              grid=(0.1, 0.2, 0.3, 0.5))
        assert set(split) == set(weights)
        assert sum(split[n] * sizes[n] for n in weights) <= 0.3 * sum(sizes.values()) + 1e-9
        layers, records = gblr.project_many(weights, split, structure=structure, steps=2,
                                            progress=False)
        assert [r.name for r in records] == list(weights)
        spent = sum(layers[n].macs() for n in weights)
        assert spent <= 0.3 * sum(sizes.values())
        uniform = gblr.project_many(weights, 0.3, structure=structure, steps=2,
                                    progress=False)[1]
        assert sum(r.error ** 2 for r in records) <= sum(r.error ** 2 for r in uniform) + 1e-6
        assert split["steep"] < split["flat"]  # the nearly low-rank layer needs less


def test_error_curve_lowrank_is_exact():
    w = torch.randn(10, 12)
    budgets, errors = error_curve(w, "lowrank")
    s = torch.linalg.svdvals(w.double())
    assert budgets[0] == pytest.approx(22 / 120)
    assert errors[0] == pytest.approx(float(s[1:].pow(2).sum() / s.pow(2).sum()))
    assert budgets[-1] == 1.0 and errors[-1] == 0.0


def test_bad_input():
    w = torch.randn(16, 16)
    for budget in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="budget"):
            gblr.project(w, budget, progress=False)
    bad = w.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        gblr.project(bad, 0.5, progress=False)
    with pytest.raises(ValueError, match="in_features=16"):
        gblr.project(w, 0.5, calibration=torch.randn(10, 8), progress=False)
    with pytest.raises(ValueError, match="width 8"):
        gblr.project(w, 0.5, calibration=Calibration.from_inputs(torch.randn(10, 8)),
                     progress=False)
    with pytest.raises(ValueError, match="second moment"):
        gblr.project(w, 0.5, calibration=torch.eye(16), progress=False)
    with pytest.raises(ValueError, match="too small"):
        gblr.project(w, 0.01, progress=False)
    with pytest.raises(TypeError, match="unknown projection option"):
        gblr.project(w, 0.5, progress=False, bogus=1)
    with pytest.raises(ValueError, match="unknown structure"):
        gblr.project(w, 0.5, structure="nope", progress=False)
    with pytest.raises(ValueError, match="steps"):
        gblr.project(w, 0.5, steps=-1, progress=False)
    with pytest.raises(ValueError, match="budget has no entry"):
        gblr.project_many({"a": w, "b": w}, {"a": 0.5}, progress=False)
    with pytest.raises(ValueError, match="below what the layers can reach"):
        gblr.allocate({"a": w}, 0.02, structure="lowrank", progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_projection_on_cuda():
    torch.manual_seed(5)
    w = torch.randn(48, 80)
    x = torch.randn(200, 80)
    layer, rec = gblr.project(w, 0.3, steps=5, device="cuda", calibration=x, progress=False)
    assert layer.U.device.type == "cuda"
    assert layer.eval().macs() == rec.cost <= 0.3 * w.numel()
    assert rec.error <= rec.svd_error + 1e-6
    layer_cpu, rec_cpu = gblr.project(w, 0.3, steps=0, calibration=x, progress=False)
    assert rec.svd_error == pytest.approx(rec_cpu.svd_error, abs=1e-4)
    lr, _ = gblr.project(w.cuda(), 0.3, structure="lowrank", progress=False)
    assert lr.U.device.type == "cuda"
