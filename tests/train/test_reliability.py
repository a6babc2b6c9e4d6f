"""``gblr train`` reliability: safe loading, SIGTERM, exact resumes, command-line errors,
progress output and threads."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from gblr.data import EpochShuffleSampler
from gblr.train import runner

L = pytest.importorskip("lightning")  # every test here trains through Lightning


def _tiny(tmp_path, out, steps, extra=()):
    # 288 training samples / batch 96 = 3 steps per epoch
    return runner.compose([
        "experiment=mnist1d/mixer-gblr", f"out_dir={out}", f"trainer.max_steps={steps}",
        "data.num_samples=400", "data.batch_size=96", f"data.root={tmp_path / 'data'}",
        "trainer.val_check_interval=3", "checkpoint.every_n_train_steps=2",
        "logging.progress=none", "logging.figures=false", "logging.tensorboard=false",
        "model.depth=1", "model.dim=16", "model.channel_hidden=32", "optim.warmup_steps=0",
        *extra,
    ])


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- 1. nothing unpickles code -------------------------------------------------------------------
class _Payload:
    """Unpickling this object calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_with_code_is_refused_and_does_not_run(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker),
                "loops": {}, "global_step": 1}, evil)
    with pytest.raises(runner.UsageError, match="refused"):
        runner.load_weights(evil)
    assert not marker.exists()
    base = ["experiment=mnist1d/mixer-gblr", f"out_dir={tmp_path / 'out'}",
            f"data.root={tmp_path / 'data'}"]
    for key in ("model.init_from", "resume"):
        assert runner.main([*base, f"{key}={evil}"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and key in err and "refused" in err and "io.open" in err
        assert not marker.exists()
    assert not (tmp_path / "out").exists()  # refused before any work
    # the payload is live: an unrestricted load would have run it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_init_from_reads_safetensors_and_checkpoints(tmp_path):
    from safetensors.torch import save_file

    cfg = _tiny(tmp_path, tmp_path / "o", 1, ["model.linear=dense"])
    *_, info = runner.build_data(cfg)
    torch.manual_seed(1)
    dense = runner.build_model(cfg, info)
    state = {k: v.contiguous() for k, v in dense.state_dict().items()}
    save_file(state, str(tmp_path / "dense.safetensors"))
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}},
               tmp_path / "dense.ckpt")
    for name in ("dense.safetensors", "dense.ckpt"):
        loaded = runner.load_weights(tmp_path / name)
        _assert_identical(loaded, state)
        ft = _tiny(tmp_path, tmp_path / "o", 1, [f"model.init_from={tmp_path / name}"])
        runner.validate(ft)
        model = runner.build_model(ft, info)  # dense weights loaded, then projected
        head = [k for k in state if "head" in k]
        assert head and all(torch.equal(model.state_dict()[k], state[k]) for k in head)


# -- 2. SIGTERM and exact resumes ----------------------------------------------------------------
def test_sampler_state_skips_what_was_consumed():
    s = EpochShuffleSampler(10, seed=3)
    s.set_epoch(2)
    full = list(s)
    state = s.state_dict(consumed=4)
    t = EpochShuffleSampler(10, seed=99)
    t.load_state_dict(state)
    t.set_epoch(2)
    assert list(t) == full[4:]
    assert list(t) == full  # only the first pass after loading is shortened
    u = EpochShuffleSampler(10)
    u.load_state_dict(state)
    u.set_epoch(3)  # the saved epoch was finished: the next one is whole
    assert sorted(u) == list(range(10))
    with pytest.raises(ValueError, match="same data"):
        EpochShuffleSampler(11).load_state_dict(state)


class _SigtermAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_mid_epoch_resume_and_sigterm_resume_are_bit_exact(tmp_path):
    extra = ["model.dropout=0.1"]  # the random state must be restored too
    full = runner.run(_tiny(tmp_path, tmp_path / "full", 7, extra))
    assert full["steps"] == 7
    expected = _final_state(tmp_path / "full")

    # a checkpoint in the middle of the second epoch (step 4 of 3-step epochs)
    mid = tmp_path / "full" / "checkpoints" / "step0000004.ckpt"
    assert mid.is_file()
    runner.run(_tiny(tmp_path, tmp_path / "resumed", 7, [*extra, f"resume={mid}"]))
    _assert_identical(_final_state(tmp_path / "resumed"), expected)

    # SIGTERM at step 5: a checkpoint, no summary, an exception that says where to resume
    cut = tmp_path / "cut"
    with pytest.raises(runner.TrainingInterrupted, match="SIGTERM") as info:
        runner.run(_tiny(tmp_path, cut, 7, extra), callbacks=[_SigtermAt(5)])
    assert info.value.step == 5
    assert info.value.checkpoint == cut / "checkpoints" / "interrupted.ckpt"
    assert info.value.checkpoint.is_file()
    assert not (cut / "summary.json").exists()
    runner.run(_tiny(tmp_path, tmp_path / "cut2", 7, [*extra, f"resume={info.value.checkpoint}"]))
    _assert_identical(_final_state(tmp_path / "cut2"), expected)


def test_sigterm_exits_143_with_a_message_and_a_checkpoint(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gblr.cli", "train", "experiment=mnist1d/mixer-gblr",
           f"out_dir={out}", "trainer.max_steps=100000", "data.num_samples=400",
           "data.batch_size=96", f"data.root={tmp_path / 'data'}", "model.depth=1",
           "model.dim=16", "model.channel_hidden=32", "logging.progress=lines",
           "logging.progress_every_steps=1", "logging.figures=false",
           "logging.tensorboard=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if line.startswith("step 3/100000"):
                break
            assert time.monotonic() < deadline, "no progress line"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == runner.EXIT_SIGTERM, err
    assert "SIGTERM" in err and "resume=" in err
    assert (out / "checkpoints" / "interrupted.ckpt").is_file()
    assert not (out / "summary.json").exists()


def test_summary_and_config_are_written_atomically(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        runner.write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left
    monkeypatch.undo()

    written = []
    real = runner.write_text_atomic

    def spy(path, text):
        written.append(Path(path).name)
        real(path, text)

    monkeypatch.setattr(runner, "write_text_atomic", spy)
    runner.run(_tiny(tmp_path, tmp_path / "run", 1))
    assert {"config.yaml", "summary.json", "summary.md"} <= set(written)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1


# -- 3. command-line errors ----------------------------------------------------------------------
@pytest.fixture
def no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("work started before the command line was checked")

    monkeypatch.setattr(runner, "build_data", fail)


def _bad_args(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a checkpoint\n")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    return [
        ("budget", ["budget=abc"]),
        ("budget", ["budget=0"]),
        ("trainer.max_steps", ["trainer.max_steps=abc"]),
        ("trainer.max_steps", ["trainer.max_steps=0"]),
        ("seed", ["seed=abc"]),
        ("threads", ["threads=abc"]),
        ("out_dir", [f"out_dir={a_file}/run"]),
        ("resume", [f"resume={a_file}"]),
        ("resume", [f"resume={empty}"]),
        ("resume", [f"resume={tmp_path / 'none.ckpt'}"]),
        ("optim.lr", ["optim.lr=fast"]),
        ("logging.progress", ["logging.progress=loud"]),
        ("structure.cost", ["structure.cost=seconds"]),
        ("structure.tokens", ["structure.cost=time"]),
        ("structure.tokens", ["structure.cost=time", "structure.tokens=0"]),
        ("structure.tokens", ["structure.tokens=64"]),
        ("structure.cost", ["structure.cost=time", "structure.tokens=64", "model.linear=lowrank"]),
    ]


def test_bad_command_lines_exit_2_with_one_line_naming_the_key(tmp_path, capsys, no_work):
    for key, args in _bad_args(tmp_path):
        base = ["experiment=mnist1d/mixer-gblr", f"data.root={tmp_path / 'data'}"]
        if not any(a.startswith("out_dir=") for a in args):
            base.append(f"out_dir={tmp_path / 'out'}")
        assert runner.main([*base, *args]) == 2, args
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith(f"gblr train: {key}="), (args, err)
        assert "\n" not in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "out").exists()


def test_no_arguments_asks_for_an_experiment(capsys):
    assert runner.main([]) == 2
    err = capsys.readouterr().err
    assert "choose an experiment=" in err and "MissingMandatoryValue" not in err
    for name in runner.list_experiments():
        assert name in err
    assert runner.main(["budget=0.5"]) == 2
    assert "choose an experiment=" in capsys.readouterr().err


def test_version(capsys):
    from importlib.metadata import version

    from gblr.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gblr {version('gblr')}"


# -- 4. progress output and 5. threads -----------------------------------------------------------
def test_redirected_progress_is_plain_lines_with_the_total(tmp_path, capfd):
    torch.set_num_threads(2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = runner.run(_tiny(tmp_path, tmp_path / "run", 6, [
                "logging.progress=auto", "logging.progress_every_steps=2"]))
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
    out, err = capfd.readouterr()
    assert "\r" not in out and "\r" not in err
    assert "step 2/6" in out and "step 6/6 (100%)" in out and "eta" in out
    assert "validation" in out
    assert "Tip" not in out + err and "litlogger" not in out + err
    noise = [str(w.message) for w in caught if "LeafSpec" in str(w.message)
             or "logging interval" in str(w.message)]
    assert not noise
    # one thread unless told otherwise, and the run says so
    assert threads_after == 1 and summary["threads"] == 1
    assert "1 CPU thread" in out


def test_terminal_progress_bar_counts_total_steps():
    from gblr.train.callback import StepProgress

    class FakeTrainer:
        max_steps = 40
        estimated_stepping_batches = 40
        global_step = 10  # resumed at step 10
        callbacks: list = []

    stream = io.StringIO()
    bar = StepProgress("bar", stream=stream)
    trainer = FakeTrainer()
    bar.on_train_start(trainer, None)
    for step in range(11, 16):
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.5)}, None, step)
    bar.on_train_end(trainer, None)
    assert "15/40" in stream.getvalue()
