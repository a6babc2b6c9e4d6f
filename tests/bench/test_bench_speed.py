"""The speed benchmark and the timing harness, on tiny settings."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_layer
from torch import nn


def test_speed_bench_quick(tmp_path):
    from gblr.bench import speed

    assert speed.main(["--quick", "--no-minilm", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "packed vs dense" in text and (tmp_path / "speed_vs_cost.png").exists()
    rows = json.loads((tmp_path / "results.json").read_text())["layers"]
    assert rows and all(r["packed_max_rel_error"] < 1e-4 for r in rows)
    # the time model's prediction beside every measured form
    assert "predicted beside measured" in text
    for r in rows:
        for form in ("dense", "lowrank", "packed"):
            assert r[f"pred_{form}_ms"] > 0
            ratio = r[f"pred_{form}_ms"] / r[f"time_{form}_ms"]
            assert r[f"pred_over_measured_{form}"] == pytest.approx(ratio)


def test_speed_bench_tile_sweep_and_bfloat16(tmp_path):
    from gblr.bench import speed

    args = ["--quick", "--no-minilm", "--dtype", "bfloat16", "--tile-sweep", "16x32x32",
            "32x64x64/32", "--out", str(tmp_path)]
    assert speed.main(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["meta"]["dtype"] == "bfloat16"
    assert all(r["packed_max_rel_error"] < 3e-2 for r in result["layers"])
    sweep = result["tile_sweep"]
    assert {r["config"] for r in sweep} == {"16x32x32", "32x64x64/32"}
    assert {r["tokens"] for r in sweep} == {1, 16}
    assert all(r["backend"] == "torch" and r["max_rel_error"] < 3e-2 for r in sweep)
    text = (tmp_path / "results.md").read_text()
    assert "## Tile sizes (torch)" in text and "| 16x32x32 | 32x64x64/32 |" in text
    assert "bfloat16, medians" in text


@pytest.mark.parametrize("args,message", [
    (["--tile-sweep", "16x64"], "tile configuration"),
    (["--tile-sweep", "ax64x64"], "tile configuration"),
    (["--graphs"], "--graphs needs --device cuda"),
    (["--dtype", "float16"], "invalid choice"),
])
def test_speed_bench_refuses_bad_options(args, message, capsys):
    from gblr.bench import speed

    with pytest.raises(SystemExit):
        speed.main(["--quick", *args])
    assert message in capsys.readouterr().err


def test_time_samples_are_paired_repetitions():
    from gblr.bench.timing import time_samples, time_side_by_side

    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    samples = time_samples(fns, reps=5, min_time=0.0)
    assert set(samples) == {"a", "b"} and all(len(s) == 5 for s in samples.values())
    assert all(t > 0 for s in samples.values() for t in s)
    # one warm-up pair of calls each, then every repetition calls each function once
    assert calls.count("a") == calls.count("b") == 2 + 5
    assert set(time_side_by_side(fns, reps=3, min_time=0.0)) == {"a", "b"}


def test_time_side_by_side_graphs_need_cuda():
    from gblr.bench.speed import parse_tile_config
    from gblr.bench.timing import time_side_by_side

    with pytest.raises(ValueError, match="CUDA"):
        time_side_by_side({"f": lambda: None}, graphs=True)
    assert parse_tile_config("16x64x128") == (16, 64, 128, None)
    assert parse_tile_config("32x64x64/128") == (32, 64, 64, 128)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_time_side_by_side_graphs():
    from gblr.bench.timing import time_side_by_side

    layer = random_layer(96, 160, 40, seed=14, dtype=torch.float32).cuda()
    x = torch.randn(64, 96, device="cuda")
    packed = layer.packed(tokens=64)
    dense = nn.Linear(96, 160, device="cuda")
    with torch.inference_mode():
        times = time_side_by_side({"packed": lambda: packed(x), "dense": lambda: dense(x)},
                                  reps=3, device="cuda", graphs=True)
    assert set(times) == {"packed", "dense"} and all(t > 0 for t in times.values())
