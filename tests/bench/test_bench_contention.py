"""The contention benchmark: its quick run, its timeout and its table."""

import json
import sys

import pytest

from gblr.bench import contention


def test_bench_contention_quick(tmp_path):
    pytest.importorskip("lightning", reason="lightning not installed (pip install -e '.[train]')")
    pytest.importorskip("mnist1d", reason="mnist1d not installed (pip install -e '.[train]')")
    out = tmp_path / "out"
    assert contention.main(["--quick", "--jobs", "train", "--busy", "1", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    (row,) = result["rows"]
    assert row["job"] == "train" and row["threads"] == 1
    assert row["idle_finished"] and row["loaded_finished"]
    assert row["ratio"] == round(row["loaded_seconds"] / row["idle_seconds"], 2)
    # bounded by steps: the same numbers beside a busy process
    assert row["same_numbers"] is True
    assert set(row["idle_numbers"]) == {"gblr test loss", "gblr test acc", "dense test loss",
                                        "dense test acc"}
    assert "| train | 1 |" in (out / "results.md").read_text()


def test_a_run_past_the_timeout_is_stopped(tmp_path):
    seconds, finished, status = contention._timed(
        [sys.executable, "-c", "import time; time.sleep(30)"], 0.5, tmp_path / "log")
    assert not finished and status == -1 and seconds < 10


def test_unfinished_runs_are_shown_as_lower_bounds():
    row = {"job": "train", "threads": 2, "idle_seconds": 70.0, "idle_finished": True,
           "loaded_seconds": 420.0, "loaded_finished": False, "ratio": 6.0,
           "idle_numbers": {"gblr test loss": 1.0}, "loaded_numbers": None,
           "same_numbers": None}
    text = contention.markdown({"machine": {"cpu": "cpu", "cores": 2}, "busy": 2,
                                "timeout": 420.0, "commands": {"train": "train ..."},
                                "rows": [row], "skipped": {}})
    assert "| train | 2 | 70.0 | > 420.0 | > 6.00 | — |" in text


@pytest.mark.parametrize("flags", [["--busy", "-1"], ["--threads", "0"], ["--timeout", "0"],
                                   ["--train-steps", "0"]])
def test_bad_settings_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as err:
        contention.main(flags)
    assert err.value.code == 2
