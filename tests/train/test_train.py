"""Structure learning while training: param groups, sigma schedule, budget controller, runner."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import shakespeare_available
from torch import nn

from gblr import GBLRConv2d, GBLRLinear
from gblr.core.timemodel import MeasuredTimes, TimeModel
from gblr.train import (
    STRUCTURE_GROUP,
    BudgetController,
    SigmaSchedule,
    adamw,
    measure_costs,
    param_groups,
    runner,
    sharp_flops,
)


class Toy(nn.Module):
    def __init__(self, n_in: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([GBLRLinear(n_in, hidden), GBLRLinear(hidden, n_in)])
        self.norm = nn.LayerNorm(n_in)
        self.head = nn.Linear(n_in, 4)

    def forward(self, x):
        return self.head(self.norm(self.blocks[1](torch.relu(self.blocks[0](x)))))


class SubGBLR(GBLRLinear):
    """A subclass must be found by type too."""


def _total_cost(model) -> float:
    costs = measure_costs(model)
    return sum(c.cost for c in costs) / sum(c.dense for c in costs)


# -- param groups -----------------------------------------------------------------------------
def test_param_groups_split_by_type_not_name():
    torch.manual_seed(0)
    model = Toy()
    model.extra = SubGBLR(8, 8)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, structure_lr=5e-3)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay", STRUCTURE_GROUP}
    s = by_name[STRUCTURE_GROUP]
    expected = {id(p) for m in (model.blocks[0], model.blocks[1], model.extra)
                for p in (m.widths, m.locations)}
    assert {id(p) for p in s["params"]} == expected
    assert s["weight_decay"] == 0.0 and s["lr"] == 5e-3 and s["betas"] == (0.0, 0.999)
    assert by_name["no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in by_name["decay"]["params"])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    torch.optim.AdamW(groups)  # accepted as is
    torch.optim.SGD(param_groups(model, 0.1, structure_betas=None), lr=0.1)


def test_adamw_uses_the_fused_kernel_and_its_update_matches_the_default():
    def trained(make):
        torch.manual_seed(0)
        model = Toy()
        opt = make(param_groups(model, lr=1e-2, weight_decay=0.1, structure_lr=5e-3))
        x = torch.randn(16, 16)
        for _ in range(5):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return opt, [p.detach().clone() for p in model.parameters()]

    fused, got = trained(adamw)
    default, want = trained(lambda g: torch.optim.AdamW(g))
    assert all(g["fused"] for g in fused.param_groups)
    assert not any(g["fused"] for g in default.param_groups)
    assert {g["name"]: g["lr"] for g in fused.param_groups} == {
        g["name"]: g["lr"] for g in default.param_groups}
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the loop kernel where a parameter has no fused kernel (here: a meta tensor)
    meta = adamw([{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]}], lr=0.1)
    assert not meta.param_groups[0]["fused"] and meta.param_groups[0]["lr"] == 0.1


def test_param_groups_bad_input():
    with pytest.raises(ValueError, match="lr"):
        param_groups(Toy(), lr=0.0)
    with pytest.raises(ValueError, match="structure_betas"):
        param_groups(Toy(), lr=1e-3, structure_betas=(0.0, 1.5))
    with pytest.raises(TypeError, match="model"):
        param_groups("model", lr=1e-3)


# -- sigma schedule ----------------------------------------------------------------------------
def test_sigma_schedule_geometric_then_off():
    model = Toy()
    sched = SigmaSchedule(model, total=100, start=1.0, end=100.0, anneal_frac=0.8)
    assert sched.value(0) == pytest.approx(1.0)
    assert sched.value(40) == pytest.approx(10.0)  # halfway through annealing: geometric mean
    assert sched.value(79) < 100.0
    assert sched.value(80) is None and sched.value(1000) is None
    assert sched.apply(40) == pytest.approx(10.0)
    assert all(m.sigma == pytest.approx(10.0) for m in model.blocks)
    sched.apply(90)
    assert all(m.sigma is None for m in model.blocks)
    with pytest.raises(ValueError, match="total"):
        SigmaSchedule(model, total=0)
    with pytest.raises(ValueError, match="by"):
        SigmaSchedule(model, total=10, by="batch")


# -- cost measurement --------------------------------------------------------------------------
def test_sharp_macs_equals_layer_macs():
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        n_in, n_out = (int(v) for v in torch.randint(3, 40, (2,), generator=gen))
        layer = GBLRLinear(n_in, n_out, sigma=3.0)
        with torch.no_grad():
            layer.widths.uniform_(-0.1, 1.1, generator=gen)
            layer.locations.uniform_(-1.0, 2.0, generator=gen)
        sigma = layer.sigma
        layer.sigma = None
        expected = layer.macs()
        layer.sigma = sigma
        assert layer.sharp_macs() == expected
        assert layer.sigma == sigma
    # identical boxes (merged into one block), full-width ones, rank > 1
    for i in range(40):
        n_in, n_out = (int(v) for v in torch.randint(3, 40, (2,), generator=gen))
        layer = GBLRLinear(n_in, n_out, num_components=8, rank_per_component=1 + i % 2,
                           init="random")
        with torch.no_grad():
            layer.widths.uniform_(0.0, 1.0, generator=gen)
            layer.locations.uniform_(-1.0, 2.0, generator=gen)
            layer.widths[:, 4:] = layer.widths[:, :1]
            layer.locations[:, 4:] = layer.locations[:, :1] + (i % 3)  # same box, wrapped
            layer.widths[:, 1] = 1.0
        assert layer.sharp_macs() == layer.eval().macs()
    with pytest.warns(DeprecationWarning, match="sharp_macs"):
        assert sharp_flops(layer) == layer.sharp_macs()


# -- the controller ----------------------------------------------------------------------------
def _train_toy(steps: int, target: float, seed: int = 0, controller_state=None, start=None):
    torch.manual_seed(seed)
    model = Toy()
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(param_groups(model, 3e-3, 0.0, structure_lr=1e-2))
    ctl = BudgetController(model, target, total_steps=steps, optimizer=opt)
    history = _fit_teacher(model, teacher, opt, ctl, steps, (32, 16), seed)
    return model, ctl, history


def _fit_teacher(model, teacher, opt, ctl, steps, shape, seed=0) -> list[float]:
    """``steps`` steps of regression on ``teacher`` with random inputs of ``shape``, the
    controller stepped after each; returns the costs it measured."""
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        x = torch.randn(*shape, generator=gen)
        loss = (model(x) - teacher(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(ctl.step())
    return history


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_controller_reaches_target_on_toy_problem(target):
    model, ctl, history = _train_toy(80, target)
    assert history[0] > target  # it started above the budget
    assert min(history) >= target * (1 - ctl.tolerance) - 1e-9  # never undershoots
    assert history[-1] == pytest.approx(target, rel=0.01)  # reached on time, within 1%
    final = ctl.enforce()
    assert final <= target and final >= 0.99 * target
    assert _total_cost(model) == pytest.approx(final)
    for c in measure_costs(model):
        assert c.cost >= ctl.floor * c.dense


def test_enforce_is_exact_and_respects_floor():
    torch.manual_seed(3)
    model = Toy()
    with torch.no_grad():
        for m in model.blocks:
            m.widths.uniform_(0.3, 1.0)
            m.locations.uniform_(0.0, 1.0)
    ctl = BudgetController(model, 0.25, total_steps=10, floor=0.05)
    cost = ctl.enforce()
    assert cost <= 0.25 and cost >= 0.24
    for c in measure_costs(model):
        assert c.cost >= 0.05 * c.dense
    with pytest.raises(ValueError, match="floor"):
        BudgetController(model, 0.25, total_steps=10, floor=0.3)
    with pytest.raises(ValueError, match="target"):
        BudgetController(model, 1.5, total_steps=10)
    with pytest.raises(ValueError, match="GBLRLinear"):
        BudgetController(nn.Linear(3, 3), 0.5, total_steps=10)


def test_controller_state_dict_resume_reproduces_next_steps():
    torch.manual_seed(0)
    model = Toy()
    opt = torch.optim.AdamW(param_groups(model, 3e-3, 0.0, structure_lr=1e-2))
    ctl = BudgetController(model, 0.4, total_steps=60, optimizer=opt)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 16, generator=gen) for _ in range(60)]

    def run(m, o, c, xs):
        out = []
        for x in xs:
            loss = m(x).pow(2).mean()
            o.zero_grad()
            loss.backward()
            o.step()
            out.append(c.step())
        return out

    run(model, opt, ctl, batches[:30])
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), ctl.state_dict())
    expected = run(model, opt, ctl, batches[30:])
    model2 = Toy()
    model2.load_state_dict(saved[0])
    opt2 = torch.optim.AdamW(param_groups(model2, 3e-3, 0.0, structure_lr=1e-2))
    opt2.load_state_dict(saved[1])
    ctl2 = BudgetController(model2, 0.4, total_steps=60, optimizer=opt2)
    ctl2.load_state_dict(saved[2])
    assert run(model2, opt2, ctl2, batches[30:]) == expected
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


# -- a budget in time ---------------------------------------------------------------------------
#: a made-up calibration in which a packing's time is its GEMMs' MACs (no per-call overhead,
#: no activation traffic): the tests do not depend on this machine's timings
FLAT_TIMES = MeasuredTimes(key="flat", seconds_per_mac=1e-10, regimes={64: TimeModel(1, 0, 0)})


def _time_run(budget: float, steps: int = 60, times=FLAT_TIMES, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(GBLRLinear(48, 96), nn.ReLU(), GBLRLinear(96, 48))
    teacher = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 48))
    opt = torch.optim.AdamW(param_groups(model, 3e-3, 0.0, structure_lr=1e-2))
    ctl = BudgetController(model, budget, total_steps=steps, optimizer=opt, cost="time",
                           tokens=64, times=times, **kw)
    _fit_teacher(model, teacher, opt, ctl, steps, (64, 48))
    return model, ctl


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_time_budget_ends_within_one_percent_of_the_predicted_time(budget):
    from gblr.core.timemodel import predict_seconds

    model, ctl = _time_run(budget)
    # packings run more MACs than the sharp cost, so the MAC target fell below the budget
    assert ctl.target < budget and ctl.budget == budget
    assert ctl.target < 0.9 * ctl.state_dict()["target"]
    ctl.enforce()
    t = ctl.predicted_time()
    assert 0.99 * budget <= t <= budget
    assert ctl.cost_fraction < t
    # the prediction: every layer packed for the tokens, over the dense layers
    layers = [m for m in model if isinstance(m, GBLRLinear)]
    dense = sum(predict_seconds(nn.Linear(m.in_features, m.out_features), 64, FLAT_TIMES)
                for m in layers)
    packed = sum(predict_seconds(m.packed(tokens=64, memory_tokens=1, overhead=0, io=0), 64,
                                 FLAT_TIMES) for m in layers)
    assert t == pytest.approx(packed / dense)


def test_time_budget_bad_input_and_an_unreachable_budget():
    model = Toy()
    with pytest.raises(ValueError, match="cost"):
        BudgetController(model, 0.5, total_steps=10, cost="seconds")
    with pytest.raises(ValueError, match="tokens"):
        BudgetController(model, 0.5, total_steps=10, cost="time")
    with pytest.raises(ValueError, match="cost=\"time\" only"):
        BudgetController(model, 0.5, total_steps=10, tokens=64)
    with pytest.raises(ValueError, match="tokens"):
        BudgetController(model, 0.5, total_steps=10, cost="time", tokens=0, times=FLAT_TIMES)
    with pytest.raises(ValueError, match="predicted_time"):
        BudgetController(model, 0.5, total_steps=10).predicted_time()
    # each call costs far more than the GEMMs of these small layers: no shrink gets there
    slow = MeasuredTimes(key="slow", seconds_per_mac=1e-10, regimes={64: TimeModel(4, 1e9, 8)})
    ctl = BudgetController(model, 0.2, total_steps=10, cost="time", tokens=64, times=slow)
    before = [m.widths.detach().clone() for m in model.blocks]
    with pytest.raises(RuntimeError, match="cannot meet the time budget 0.2"):
        ctl.enforce()
    # nothing half-done: the widths are those enforce() started from
    for m, w in zip(model.blocks, before, strict=True):
        assert torch.equal(m.widths, w)


def test_time_budget_state_resumes_the_mac_target():
    _, ctl = _time_run(0.5, steps=20)
    state = ctl.state_dict()
    assert state["cost"] == "time" and state["target"] == 0.5
    assert state["mac_target"] == ctl.target != 0.5
    model2 = nn.Sequential(GBLRLinear(48, 96), nn.ReLU(), GBLRLinear(96, 48))
    ctl2 = BudgetController(model2, 0.5, total_steps=20, cost="time", tokens=64,
                            times=FLAT_TIMES)
    ctl2.load_state_dict(state)
    assert ctl2.target == ctl.target
    with pytest.raises(ValueError, match="cost"):
        BudgetController(model2, 0.5, total_steps=20).load_state_dict(state)


# -- distributed: two gloo processes stay identical --------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = Toy()
    ddp = DDP(model)
    opt = torch.optim.AdamW(param_groups(model, 3e-3, 0.0, structure_lr=1e-2))
    ctl = BudgetController(model, 0.4, total_steps=25, optimizer=opt)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for _ in range(25):
        loss = ddp(torch.randn(16, 16, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.step()
    ctl.enforce()
    widths = torch.cat([m.widths.detach().flatten() for m in model.blocks])
    torch.save({"widths": widths, "cost": ctl.cost_fraction}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # about 20-40 s: two processes start, import torch and synchronise
def test_two_process_gloo_ddp_keeps_structure_identical(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "1.pt", weights_only=True)
    assert torch.equal(r0["widths"], r1["widths"])
    assert r0["cost"] == r1["cost"] <= 0.4
    assert (r0["widths"] < 1).any()  # the controller did act


# -- the runner --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", runner.list_experiments())
def test_every_experiment_composes(name):
    cfg = runner.compose([f"experiment={name}"])
    assert cfg.name == name
    assert 0 < cfg.budget <= 1
    assert cfg.model.linear in ("dense", "gblr", "lowrank", "monarch", "blr", "blocksparse")


OFFLINE = ["mnist1d/mixer-gblr", "mnist1d/mixer-dense", "mnist1d/mixer-lowrank",
           "mnist1d/mixer-monarch", "shakespeare/gpt-gblr", "shakespeare/gpt-lowrank"]


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_experiment_runs_one_step(name, tmp_path):
    if name.startswith("shakespeare") and not shakespeare_available():
        pytest.skip("../shared/data/shakespeare is absent")
    extra = ["data.num_samples=400"] if name.startswith("mnist1d") else ["data.max_chars=20000"]
    cfg = runner.compose([f"experiment={name}", "trainer.fast_dev_run=true", f"out_dir={tmp_path}",
                          "trainer.enable_progress_bar=false", "threads=1",
                          f"data.root={tmp_path / 'data'}", *extra])
    summary = runner.run(cfg)
    assert summary["steps"] == 1
    assert summary["cost_fraction"] <= cfg.budget + 1e-9 or cfg.model.linear == "dense"
    assert (tmp_path / "summary.json").is_file()


def _mixer_cfg(tmp_path, out, steps, extra=()):
    return runner.compose([
        "experiment=mnist1d/mixer-gblr", f"out_dir={out}", f"trainer.max_steps={steps}",
        "data.num_samples=400", "data.batch_size=96", f"data.root={tmp_path / 'data'}",
        "trainer.val_check_interval=3", "checkpoint.every_n_train_steps=3",
        "trainer.enable_progress_bar=false", "threads=1", "logging.figures=false",
        "model.depth=1", "model.dim=16", "model.channel_hidden=32", "optim.warmup_steps=0",
        *extra,
    ])


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    # 288 training samples / batch 96 = 3 steps per epoch; checkpoints every 3 steps
    full = runner.run(_mixer_cfg(tmp_path, tmp_path / "full", 6, ["structure.enforce=false"]))
    ckpt = tmp_path / "full" / "checkpoints" / "step0000003.ckpt"
    assert ckpt.is_file()
    resumed = runner.run(_mixer_cfg(tmp_path, tmp_path / "resumed", 6,
                                    ["structure.enforce=false", f"resume={ckpt}"]))
    assert resumed["steps"] == full["steps"] == 6
    a = torch.load(tmp_path / "full" / "final.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "final.ckpt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_cli_bad_input(tmp_path, capsys):
    assert runner.main(["experiment=no/such"]) == 2
    assert "no/such" in capsys.readouterr().err
    assert runner.main(["experiment=mnist1d/mixer-gblr", "not_a_key=1"]) == 2
    assert "not_a_key" in capsys.readouterr().err
    assert runner.main(["experiment=mnist1d/mixer-gblr", "budget=1.5",
                        f"out_dir={tmp_path}"]) == 2
    assert "budget" in capsys.readouterr().err
    assert runner.main(["experiment=shakespeare/gpt-gblr", "data.path=/no/such/dir",
                        f"out_dir={tmp_path}"]) == 2
    assert "/no/such/dir" in capsys.readouterr().err
    assert runner.main(["experiment=mnist1d/mixer-gblr", "resume=/no/such.ckpt",
                        f"out_dir={tmp_path}"]) == 2
    assert "resume" in capsys.readouterr().err
    assert runner.main(["--help"]) == 0
    assert "mnist1d/compare" in capsys.readouterr().out


def test_mask_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from gblr.train.figure import plot_masks

    fig = plot_masks(Toy(), tmp_path / "m.png", title="toy")
    assert (tmp_path / "m.png").stat().st_size > 1000
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_resnet18_gblr_convs_are_controlled():
    from gblr.models import ResNet18

    model = ResNet18(num_classes=5, width=8, small_input=True, linear="gblr", budget=0.5)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    ctl = BudgetController(model, 0.3, total_steps=5)
    assert len(ctl.layers) == 16  # the 3x3 convs of the 8 residual blocks
    assert ctl.enforce() <= 0.3
    with pytest.raises(ValueError, match="linear"):
        ResNet18(linear="monarch")


@pytest.mark.parametrize("rank_fraction", [None, 0.5])
def test_resnet18_gblr_builds_from_its_experiment(rank_fraction):
    # every key of model.gblr reaches the GBLR convolutions, rank_fraction included
    cfg = runner.compose(["experiment=imagenet/resnet18-gblr", "model.width=8",
                          f"model.gblr.rank_fraction={rank_fraction or 'null'}"])
    model = runner.build_model(cfg, {"task": "classify", "num_classes": 5, "in_chans": 3,
                                     "img_size": (32, 32)})
    convs = [m for m in model.modules() if isinstance(m, GBLRConv2d)]
    assert len(convs) == 16
    # the first 3x3 conv: 8 -> 8 channels, a GBLR matrix of 8 x 72
    expected = 8 if rank_fraction is None else 4
    assert convs[0].linears[0].num_components == expected


def test_compare_runs_each_structure_and_writes_the_table(tmp_path, capsys):
    cfg = runner.compose(["experiment=mnist1d/compare", "trainer.fast_dev_run=true",
                          f"out_dir={tmp_path}", "trainer.enable_progress_bar=false", "threads=1",
                          f"data.root={tmp_path / 'data'}", "data.num_samples=400"])
    summaries = runner.run_all(cfg)
    assert [s["linear"] for s in summaries] == ["gblr", "dense"]
    assert (tmp_path / "gblr" / "summary.json").is_file()
    assert (tmp_path / "dense" / "summary.json").is_file()
    table = (tmp_path / "compare.md").read_text()
    assert "| gblr | 0.3 |" in table and "| dense | — |" in table


def test_controller_magnitude_weighting_shrinks_weak_components_first():
    torch.manual_seed(0)
    model = nn.Sequential(GBLRLinear(32, 32, num_components=8, init="random"))
    layer = model[0]
    with torch.no_grad():
        scale = torch.tensor([4.0, 4.0, 4.0, 4.0, 0.25, 0.25, 0.25, 0.25])
        layer.U.mul_(scale[None, :])  # components 0-3 strong, 4-7 weak
    controller = BudgetController(model, target=0.25, total_steps=10, reach=0.5,
                                  weighting="magnitude")
    for _ in range(3):
        controller.step()
    widths = layer.widths.detach()
    assert float(widths[:, 4:].mean()) < float(widths[:, :4].mean()) < 1.0
    uniform = copy.deepcopy(nn.Sequential(GBLRLinear(32, 32, num_components=8, init="random")))
    BudgetController(uniform, target=0.25, total_steps=10, reach=0.5).step()
    w = uniform[0].widths.detach()
    assert torch.allclose(w, w[0, 0].expand_as(w))  # uniform: every width alike
    with pytest.raises(ValueError, match="weighting"):
        BudgetController(model, target=0.5, total_steps=10, weighting="random")


def test_gpt_runs_the_fused_gelu():
    """GPT-2's tanh GELU runs as one fused op, the same function as the separate ops."""
    pytest.importorskip("transformers")
    from gblr.models import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=30, n_positions=16, n_embd=32, n_layer=2, n_head=2).eval()
    acts = [blk.mlp.act for blk in model.lm.transformer.h]
    assert all(isinstance(a, nn.GELU) and a.approximate == "tanh" for a in acts)
    from transformers.activations import NewGELUActivation

    x = torch.randn(4, 32) * 3
    assert torch.allclose(acts[0](x), NewGELUActivation()(x), atol=1e-6)


def test_gpt2_projection_takes_the_runner_gblr_options():
    """A fine-tune projects GPT-2's layers with the keys a projection takes; the options of
    a fresh layer in ``model.gblr`` (``num_components``, ``rank_fraction``, ...) are left out."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    from gblr.models.gpt import structure_gpt2

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1,
                                    n_head=2)).eval()
    opts = dict(runner.compose(["experiment=shakespeare/gpt-gblr"]).model.gblr)
    assert opts["rank_fraction"] == 0.5 and "num_components" in opts
    ids = torch.randint(0, 20, (1, 8))
    with torch.no_grad():
        ref = lm(ids).logits
    structure_gpt2(lm, "gblr", budget=1.0, gblr=opts, project=True)
    layers = [m for m in lm.modules() if isinstance(m, GBLRLinear)]
    assert len(layers) == 3 and all(m.rank_per_component == 4 for m in layers)
    with torch.no_grad():  # at the full budget the projection stays close to the weights
        assert (lm(ids).logits - ref).abs().max() < 0.05
