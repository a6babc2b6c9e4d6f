"""Benchmark of learned structure at equal cost: ``python -m gblr.bench.train``.

Runs the offline experiments ``mnist1d/mixer-{gblr,dense,lowrank,monarch}`` at 30% cost over
several seeds and ``shakespeare/gpt-{gblr,dense,lowrank,monarch}`` at 40% cost, each as its own
``gblr train`` process (``--jobs`` in parallel, one CPU thread each), then writes
``results/train/results.{md,json}`` and ``results/train/layer_costs.png`` (the learned
per-layer cost of the GBLR runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STRUCTURES = ("gblr", "dense", "lowrank", "monarch")


def _jobs(args) -> list[dict]:
    jobs = []
    for seed in range(args.seeds):
        for kind in STRUCTURES:
            over = [f"budget={args.mnist_budget}", f"seed={seed}"]
            if args.quick:
                over += ["trainer.max_steps=20", "data.num_samples=600",
                         "trainer.val_check_interval=10"]
            elif args.mnist_steps:
                over += [f"trainer.max_steps={args.mnist_steps}"]
            jobs.append({"suite": "mnist1d", "experiment": f"mnist1d/mixer-{kind}", "kind": kind,
                         "seed": seed, "overrides": over})
    if not args.no_text:
        for kind in STRUCTURES:
            over = [f"budget={args.text_budget}", "seed=0"]
            if args.quick:
                over += ["trainer.max_steps=10", "data.max_chars=50000",
                         "trainer.val_check_interval=5", "trainer.limit_val_batches=2",
                         "trainer.limit_test_batches=2"]
            elif args.text_steps:
                # a validation point every twelfth of the run: the curves show whether the
                # loss has flattened
                over += [f"trainer.max_steps={args.text_steps}",
                         f"trainer.val_check_interval={max(1, args.text_steps // 12)}"]
            jobs.append({"suite": "shakespeare", "experiment": f"shakespeare/gpt-{kind}",
                         "kind": kind, "seed": 0, "overrides": over})
    return jobs


def _finished(out: Path, args: list[str]) -> dict | None:
    """The summary of a finished run in ``out`` whose saved configuration is the one ``args``
    compose now (same experiment, overrides and packaged config; only ``out_dir`` may differ,
    so a run folder can be moved); else None."""
    from omegaconf import OmegaConf

    from gblr.train.runner import compose

    summary, saved = out / "summary.json", out / "config.yaml"
    if not (summary.is_file() and saved.is_file()):
        return None
    wanted = OmegaConf.to_container(compose(args), resolve=True)
    found = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    wanted.pop("out_dir", None)
    found.pop("out_dir", None)
    if found != wanted:
        return None
    return json.loads(summary.read_text())


def _job_args(job: dict, work: Path, data_root: Path) -> tuple[Path, list[str]]:
    """A job's run folder and its ``gblr train`` arguments."""
    out = work / job["experiment"].replace("/", "_") / f"seed{job['seed']}"
    args = [f"experiment={job['experiment']}", f"out_dir={out}", f"data.root={data_root}",
            "threads=1", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
            *job["overrides"]]
    return out, args


def _reused(job: dict, work: Path, data_root: Path) -> dict | None:
    """The job's finished run as a result row, if ``--reuse`` may take it (see _finished)."""
    out, args = _job_args(job, work, data_root)
    done = _finished(out, args)
    if done is None:
        return None
    print(f"reusing the finished run in {out}")
    return {**done, "wall_seconds": done["fit_seconds"], "suite": job["suite"],
            "run_dir": str(out)}


def _run(job: dict, work: Path, data_root: Path) -> dict:
    out, args = _job_args(job, work, data_root)
    cmd = [sys.executable, "-m", "gblr.cli", "train", *args]
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # the child runs the same gblr as this process (the checkout's src, not another install)
    import gblr

    src = str(Path(gblr.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(out / "stdout.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False,
                            env=env).returncode
    summary_path = out / "summary.json"
    if rc != 0 or not summary_path.is_file():
        tail = (out / "stdout.log").read_text()[-2000:]
        raise RuntimeError(f"{job['experiment']} seed {job['seed']} failed (rc={rc}):\n{tail}")
    summary = json.loads(summary_path.read_text())
    summary["wall_seconds"] = time.time() - start
    summary["suite"] = job["suite"]
    summary["run_dir"] = str(out)
    return summary


def validation_curve(run_dir: str | Path) -> list[tuple[int, float]]:
    """``(step, validation loss)`` of a finished run, from its ``logs/metrics.csv``."""
    import csv

    path = Path(run_dir) / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(row["step"]), float(row["val/loss"])) for row in csv.DictReader(f)
                if row.get("val/loss")]


def _curves(results: list[dict], path: Path) -> bool:
    """Validation loss against step of every Shakespeare run; False when there is none."""
    runs = [(r, validation_curve(r["run_dir"])) for r in results
            if r["suite"] == "shakespeare" and r.get("run_dir")]
    runs = [(r, c) for r, c in runs if c]
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r, curve in runs:
        steps, losses = zip(*curve, strict=True)
        ax.plot(steps, losses, marker="o", ms=3, label=f"{r['linear']} ({_budget(r)})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("Shakespeare GPT: validation loss during training", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _curve_table(results: list[dict]) -> str:
    """Validation loss of each Shakespeare run at a half, three quarters and the end of its
    run: how far from flat the loss still was."""
    rows = []
    for r in (r for r in results if r["suite"] == "shakespeare" and r.get("run_dir")):
        curve = validation_curve(r["run_dir"])
        if len(curve) < 3:
            continue
        last = curve[-1][0]

        def at(frac: float, curve=curve, last=last) -> str:
            step, loss = min(curve, key=lambda c: abs(c[0] - frac * last))
            return f"{loss:.4f} (step {step})"

        rows.append(f"| {r['linear']} | {_budget(r)} | {at(0.5)} | {at(0.75)} | {at(1.0)} |")
    if not rows:
        return ""
    return "\n".join([
        "Validation loss during the Shakespeare runs (`curves.png`):", "",
        "| structure | budget | at half the run | at three quarters | at the end |",
        "|---|---:|---:|---:|---:|", *rows, ""])


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _budget(r: dict) -> str:
    return "—" if r["linear"] == "dense" else str(r["budget"])


def _table(results: list[dict]) -> str:
    lines = []
    mnist = [r for r in results if r["suite"] == "mnist1d"]
    if mnist:
        lines += ["### MNIST-1D, MLP-Mixer (token + channel MLPs replaced)", "",
                  "| structure | budget | seeds | cost (% of dense) | test accuracy (%) | "
                  "train time per run (s) |", "|---|---:|---:|---:|---:|---:|"]
        for kind in STRUCTURES:
            rs = [r for r in mnist if r["linear"] == kind]
            if not rs:
                continue
            lines.append(
                f"| {kind} | {_budget(rs[0])} | {len(rs)} | "
                f"{_mean_std([100 * r['cost_fraction'] for r in rs])} | "
                f"{_mean_std([100 * r['test_acc'] for r in rs])} | "
                f"{statistics.mean(r['fit_seconds'] for r in rs):.0f} |")
        lines.append("")
    text = [r for r in results if r["suite"] == "shakespeare"]
    if text:
        lines += ["### Shakespeare (characters), 4-layer GPT-2 (c_attn, c_fc, c_proj replaced)", "",
                  "| structure | budget | cost (% of dense) | test loss (nats/char) | "
                  "perplexity | train time (s) |", "|---|---:|---:|---:|---:|---:|"]
        for kind in STRUCTURES:
            for r in (r for r in text if r["linear"] == kind):
                lines.append(
                    f"| {kind} | {_budget(r)} | {100 * r['cost_fraction']:.2f} | "
                    f"{r['test_loss']:.4f} | {r['test_ppl']:.3f} | {r['fit_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def _figure(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r["linear"] == "gblr" and r["layers"]]
    if not runs:
        return
    fig, axes = plt.subplots(1, len({r["suite"] for r in runs}), figsize=(11, 3.6), squeeze=False)
    for ax, suite in zip(axes[0], sorted({r["suite"] for r in runs}), strict=False):
        for r in (r for r in runs if r["suite"] == suite):
            fr = [100 * row["fraction"] for row in r["layers"]]
            ax.plot(range(len(fr)), fr, marker="o", ms=3, label=f"seed {r['seed']}")
        ax.axhline(100 * runs[0]["budget"] if suite == "mnist1d" else 100 * [
            r for r in runs if r["suite"] == suite][0]["budget"], color="k", ls="--", lw=1,
            label="budget (total)")
        names = [row["layer"] for row in [r for r in runs if r["suite"] == suite][0]["layers"]]
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
        ax.set_ylabel("learned cost, % of dense")
        ax.set_title(f"{suite}: per-layer cost learned by GBLR", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--mnist-budget", type=float, default=0.3)
    p.add_argument("--text-budget", type=float, default=0.4)
    p.add_argument("--mnist-steps", type=int, default=None)
    p.add_argument("--text-steps", type=int, default=None)
    p.add_argument("--no-text", action="store_true", help="skip the Shakespeare runs")
    p.add_argument("--work", default=None,
                   help="where the runs go (default runs/bench-train; with --quick, OUT/runs, "
                   "so that a smoke test never overwrites real runs)")
    p.add_argument("--data-root", default=os.environ.get("GBLR_DATA", "~/.cache/gblr/data"))
    p.add_argument("--out", default="results/train")
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished runs in --work whose saved config matches exactly")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = min(args.seeds, 1)
    jobs = _jobs(args)
    work = Path(args.work or (Path(args.out) / "runs" if args.quick else "runs/bench-train"))
    data_root = Path(os.path.expanduser(args.data_root))
    # generate the MNIST-1D cache once before the parallel runs
    from gblr.data import mnist1d_splits

    mnist1d_splits(data_root, num_samples=600 if args.quick else 10000)
    # finished runs are looked up here, in one thread (composing a config is not thread-safe)
    reused = [_reused(j, work, data_root) if args.reuse else None for j in jobs]
    todo = [j for j, r in zip(jobs, reused, strict=True) if r is None]
    print(f"running {len(todo)} trainings, {args.jobs} at a time")
    with ThreadPoolExecutor(args.jobs) as pool:
        ran = iter(list(pool.map(lambda j: _run(j, work, data_root), todo)))
    results = [r if r is not None else next(ran) for r in reused]
    for r in results:
        print(f"{r['name']:<24} seed {r['seed']}: cost {100 * r['cost_fraction']:.2f}% "
              f"acc {100 * r.get('test_acc', float('nan')):.2f}% loss {r.get('test_loss'):.4f} "
              f"({r['fit_seconds']:.0f} s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = _table(results)
    header = ("# Training with learned structure: GBLR vs baselines at equal cost\n\n"
              f"Command: `python -m gblr.bench.train {' '.join(argv or sys.argv[1:])}`\n\n")
    text = header + table
    if _curves(results, out / "curves.png"):
        text += "\n" + _curve_table(results) + "\n![curves](curves.png)\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _figure(results, out / "layer_costs.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
