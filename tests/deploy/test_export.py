"""ONNX export of deployed models: the packed layers' plain path, the graph's GEMMs, checks."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from helpers import random_layer, tiny_bert
from torch import nn

import gblr
from gblr import GBLRLinear, LowRankLinear, PackedGBLRLinear
from gblr.core.surgery import replace_modules
from gblr.deploy import export as export_mod
from gblr.deploy.export import ExportMismatchError, export_onnx, onnx_gemms


def _ort():
    return pytest.importorskip("onnxruntime", reason="ONNX export tests need gblr[onnx]")


def _layers() -> dict[str, tuple[GBLRLinear, int]]:
    """Layers whose packings cover every step of a plan: several stage-1 and stage-2 GEMMs
    with a permutation and zeroed slices of h, dense blocks, a CSR and a COO sparse part."""
    perm = random_layer(256, 128, 40, 2, seed=0)
    with torch.no_grad():
        perm.widths.mul_(0.3)
    torch.manual_seed(15)
    tiny = GBLRLinear.from_block_sparse(
        torch.randn(24, 40, dtype=torch.float64), torch.rand(12, 20) < 0.2, (2, 2)).eval()
    blocks = GBLRLinear.from_block_sparse(
        torch.randn(24, 32, dtype=torch.float64),
        torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool), (8, 8),
    ).eval()
    return {"perm_hzero": (perm, 64), "sparse_csr": (tiny, 64), "sparse_coo": (tiny, 4096),
            "dense_blocks": (blocks, 64), "wrap": (random_layer(37, 53, 20, seed=1), 64),
            "no_bias": (random_layer(30, 41, 9, bias=False, seed=3), 1)}


def _packed(layer: GBLRLinear, tokens: int, dtype=torch.float32) -> PackedGBLRLinear:
    return PackedGBLRLinear.from_gblr(layer, tokens=tokens, allow_dense=False, dtype=dtype)


@pytest.mark.parametrize("name", list(_layers()))
def test_plain_path_equals_the_packed_forward(name):
    layer, tokens = _layers()[name]
    packed = _packed(layer, tokens, torch.float64)
    plan = packed.plans[0]
    if name == "perm_hzero":
        assert plan.perm is not None and plan._h_zero and len(plan._s1) > 1
    if name.startswith("sparse"):
        assert plan.sp_val is not None and (plan.sp_crow is not None) == (name == "sparse_csr")
    if name == "dense_blocks":
        assert len(plan._dense) == 5
    for shape in [(1,), (5,), (3, 7), (300,)]:
        x = torch.randn(*shape, layer.in_features, dtype=torch.float64)
        assert torch.allclose(packed.forward_plain(x), packed(x), atol=1e-12, rtol=0)
        assert torch.allclose(packed.forward_plain(x), layer(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["perm_hzero", "sparse_csr", "sparse_coo", "dense_blocks"])
def test_packed_layer_exports_as_its_gemms(name, tmp_path):
    _ort()
    layer, tokens = _layers()[name]
    model = nn.Sequential(_packed(layer.float(), tokens), nn.GELU()).eval()
    report = export_onnx(model, torch.randn(16, layer.in_features), tmp_path / "m.onnx")
    assert report.max_rel_error is not None and report.max_rel_error < 1e-5
    plan = model[0].plans[0]
    # one ONNX matrix product per GEMM of the packing, each over that GEMM's weight
    assert len(report.gemms) == len(plan.gemms()) == len(report.weight_gemms)
    expected = sorted(tuple(sorted(s[1:])) for s in plan.gemms())
    assert sorted(tuple(sorted(g.weight_shape)) for g in report.gemms) == expected
    dense = (layer.out_features, layer.in_features)
    assert all(sorted(g.weight_shape) != sorted(dense) for g in report.gemms)
    assert onnx_gemms(tmp_path / "m.onnx") == report.gemms


def test_low_rank_exports_as_two_gemms(tmp_path):
    _ort()
    model = nn.Sequential(LowRankLinear(64, 96, rank=8), nn.ReLU(), nn.Linear(96, 10)).eval()
    report = export_onnx(model, (torch.randn(5, 64),), tmp_path / "lr.onnx")
    shapes = sorted(tuple(sorted(g.weight_shape)) for g in report.gemms)
    assert shapes == [(8, 64), (8, 96), (10, 96)] and report.max_rel_error < 1e-5


def test_deployed_transformer_exports_with_keyword_inputs(tmp_path):
    _ort()
    model = tiny_bert()
    targets = [(n, m) for n, m in model.named_modules()
               if n.startswith("encoder.") and type(m) is nn.Linear]
    replace_modules(model, targets, lambda _, lin: GBLRLinear.from_linear(lin, 0.5, steps=0))
    report = gblr.deploy(model, tokens=16)
    ids = torch.randint(0, 100, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = export_onnx(model, inputs, tmp_path / "bert.onnx")
    assert out.input_names == ["input_ids", "attention_mask"]
    assert out.max_rel_error < 1e-4
    packed_gemms = sum(layer.gemms for layer in report.layers)
    # the packed layers' GEMMs, the pooler's dense one, attention's two per layer
    assert len(out.weight_gemms) == packed_gemms + 1
    assert len(out.gemms) == packed_gemms + 1 + 2 * 2


def test_dynamic_token_axis(tmp_path):
    ort = _ort()
    layer, _ = _layers()["perm_hzero"]
    model = nn.Sequential(_packed(layer.float(), 64)).eval()
    batch = torch.export.Dim("batch", min=2, max=4096)
    export_onnx(model, torch.randn(16, 256), tmp_path / "d.onnx",
                dynamic_shapes=({0: batch},))
    session = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(300, 256)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert torch.allclose(got, model(x), atol=1e-4, rtol=1e-4)
    multi = nn.Sequential(PackedGBLRLinear.from_gblr(layer.float(), tokens=(1, 64))).eval()
    with pytest.raises(ValueError, match="single tokens value"):
        export_onnx(multi, torch.randn(16, 256), tmp_path / "e.onnx",
                    dynamic_shapes=({0: batch},))
    assert not (tmp_path / "e.onnx").exists()


def test_refusals_leave_nothing_behind(tmp_path):
    _ort()
    layer = GBLRLinear.from_dense(torch.randn(64, 32), 0.5, steps=0).eval()
    model = nn.Sequential(copy.deepcopy(layer)).eval()
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"not deployed .*gblr.deploy"):
        export_onnx(model, x, tmp_path / "a.onnx")
    gblr.deploy(model, tokens=4)
    with pytest.raises(ValueError, match="training mode"):
        export_onnx(nn.Sequential(model, nn.Dropout()), x, tmp_path / "a.onnx")
    for bad, err, match in [((), ValueError, "empty"), ((x, "x"), TypeError, r"\[1\] must be"),
                            ("x", TypeError, "must be a tensor"),
                            ({"input": 3}, TypeError, "must be a tensor"),
                            (torch.full((4, 32), float("nan")), ValueError, "NaN"),
                            (torch.randn(4, 31), ValueError, "does not run")]:
        with pytest.raises(err, match=match):
            export_onnx(model, bad, tmp_path / "a.onnx")
    assert list(tmp_path.iterdir()) == []
    target = tmp_path / "a.onnx"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(model, x, target)
    with pytest.raises(FileExistsError, match="directory"):
        export_onnx(model, x, tmp_path)
    assert target.read_bytes() == b"old"
    export_onnx(model, x, target, overwrite=True)
    assert target.read_bytes() != b"old"


def test_mismatch_is_an_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    _ort()
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    real = export_mod._run_ort
    monkeypatch.setattr(export_mod, "_run_ort",
                        lambda *a, **k: [o + 1e-2 for o in real(*a, **k)])
    with pytest.raises(ExportMismatchError, match="max relative error"):
        export_onnx(model, x, target, overwrite=True)
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1
    report = export_onnx(model, x, target, overwrite=True, check=False)  # check switched off
    assert report.max_rel_error is None and target.read_bytes() != b"old"


def test_missing_extra_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"gblr\[onnx\]"):
        export_onnx(nn.Linear(2, 2).eval(), torch.randn(1, 2), tmp_path / "m.onnx")


def test_torchscript_exporter_takes_the_plain_path_too(tmp_path):
    _ort()
    layer, tokens = _layers()["perm_hzero"]
    model = nn.Sequential(_packed(layer.float(), tokens)).eval()
    report = export_onnx(model, torch.randn(16, 256), tmp_path / "ts.onnx", dynamo=False)
    assert len(report.weight_gemms) == len(model[0].plans[0].gemms())
    assert report.max_rel_error < 1e-5
    with pytest.raises(ValueError, match="dynamo=True"):
        export_onnx(model, torch.randn(16, 256), tmp_path / "ts2.onnx", dynamo=False,
                    dynamic_shapes=({0: torch.export.Dim("t")},))
