"""The measured time model: calibration, its cache, and predictions of layers' time."""

import json

import pytest
import torch
from torch import nn

import gblr
from gblr.core import timemodel as tm


def test_model_time_counts_overhead_per_call_and_work_per_batch_element():
    model = tm.TimeModel(memory_tokens=4, overhead=100.0, io=2.0)
    one = model.gemm(8, 3, 5)
    assert tm.model_time([(1, 3, 5)], 8, model) == one
    assert tm.model_time([(4, 3, 5)], 8, model) == 4 * (one - 100.0) + 100.0
    assert tm.model_time([(1, 3, 5)], 8, model, sparse_nnz=10) == one + model.sparse(8, 10)


def test_calibration_is_cached_and_predicts(tmp_path, monkeypatch):
    monkeypatch.setenv("GBLR_CACHE", str(tmp_path))
    assert tm.load_calibration("cpu") is None
    times = tm.calibrate("cpu", tokens=(1, 64), sizes=(16, 64, 128), reps=2)
    assert set(times.regimes) == {1, 64} and times.seconds_per_mac > 0
    assert tm.load_calibration("cpu") == times
    files = list((tmp_path / "timemodel").iterdir())
    assert len(files) == 1 and "cpu" in files[0].name and torch.__version__ in files[0].name
    assert times.model_for(3) == times.regimes[1] and times.model_for(40) == times.regimes[64]
    # a low-rank layer of a tenth of the MACs is predicted faster than dense at 64 tokens
    dense = nn.Linear(512, 512)
    low = gblr.LowRankLinear(512, 512, rank=25)
    assert tm.predict_seconds(low, 64, times) < tm.predict_seconds(dense, 64, times)
    packed = gblr.GBLRLinear.from_dense(torch.randn(256, 128), 0.3, steps=0).packed(tokens=64)
    assert tm.predict_seconds(packed, 64, times) > 0
    assert tm.predict_seconds(packed, 1500, times) > tm.predict_seconds(packed, 500, times)


def test_a_damaged_calibration_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GBLR_CACHE", str(tmp_path))
    times = tm.calibrate("cpu", tokens=(1,), sizes=(16, 32), reps=1)
    path = tmp_path / "timemodel" / f"{times.key}.json"
    data = json.loads(path.read_text())
    data["seconds_per_mac"] = -1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="gblr calibrate"):
        tm.load_calibration("cpu")
    with pytest.raises(ValueError, match="positive token counts"):
        tm.calibrate("cpu", tokens=(0,), save=False)


@pytest.mark.parametrize("name", ["lowrank", "monarch", "blr", "blocksparse", "blockdiag", "gblr"])
def test_every_structure_lists_gemms_that_add_up_to_its_macs(name):
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    layer = gblr.get_structure(name).from_dense(w, 0.4, **({"steps": 0} if name == "gblr" else {}))
    work = sum(b * r * c for b, r, c in layer.gemms())
    assert work >= layer.macs()  # padding and dense-cheaper blocks may compute more
    assert work <= 96 * 64 * 4


def test_calibrate_command(tmp_path, monkeypatch, capsys):
    from gblr.cli import main

    monkeypatch.setenv("GBLR_CACHE", str(tmp_path))
    assert main(["calibrate", "--tokens", "1", "8", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "ps per MAC" in out and str(tmp_path) in out
    assert tm.load_calibration("cpu") is not None
    with pytest.raises(SystemExit):
        main(["calibrate", "--threads", "0"])
