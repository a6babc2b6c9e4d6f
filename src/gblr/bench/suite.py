"""Run every benchmark and write ``RESULTS.md`` from their outputs.

Each benchmark is a module ``gblr.bench.<name>`` with a ``main(argv)`` that
accepts ``--out DIR`` and ``--quick`` and writes ``results.md``/``results.json``
(and figures) into ``DIR``. The suite runs each one in its own process, so
thread settings and memory do not leak between them, then stitches their
tables and figures into one page with the machine, versions, date and command.

    python -m gblr.bench all            # full CPU-sized settings
    python -m gblr.bench all --quick    # tiny settings, a few minutes
    python -m gblr.bench layers speed   # a subset
    python -m gblr.bench all --collect  # rebuild RESULTS.md from results/ without rerunning
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["BENCHMARKS", "BenchSpec", "PAPER_RUNS", "paper_reference", "main", "write_results_page"]


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark of the suite: its module, title, and whether it has a CUDA variant."""

    module: str
    title: str
    cuda: bool = False
    extra_args: tuple[str, ...] = field(default_factory=tuple)


#: name -> benchmark, in the order they run and appear in RESULTS.md
BENCHMARKS: dict[str, BenchSpec] = {
    "layers": BenchSpec("gblr.bench.layers", "Layer training step (GBLR vs dense)", cuda=True),
    "speed": BenchSpec("gblr.bench.speed", "Deployment speed (packed GBLR)", cuda=True),
    "deploy_gpt": BenchSpec("gblr.bench.deploy_gpt", "Deployed Shakespeare GPT (end to end)"),
    "approx": BenchSpec("gblr.bench.approx", "Projecting MiniLM-L6's weights onto each structure"),
    "fronts": BenchSpec("gblr.bench.fronts",
                        "Error against measured deployed time (MiniLM-L6's weights)"),
    "train": BenchSpec("gblr.bench.train", "Training with learned structure vs baselines"),
    "train_step": BenchSpec("gblr.bench.train_step",
                            "Training step and wall clock of learned structure vs dense"),
    "train_fronts": BenchSpec("gblr.bench.train_fronts",
                              "Trained models at equal measured time (GPT and Mixer fronts)"),
    "compress": BenchSpec("gblr.bench.compress", "Compressing all-MiniLM-L6-v2", cuda=True),
    "serve": BenchSpec("gblr.bench.serve", "Served: ONNX Runtime vs PyTorch (MiniLM-L6)"),
    "contention": BenchSpec("gblr.bench.contention",
                            "Wall time on an idle CPU and beside busy processes"),
}

#: The paper's own numbers (Lee & Kim, ICLR 2024), reported beside ours, never mixed with them:
#: (run, result, cost, the command that would reproduce it on real hardware and data).
PAPER_RUNS = [
    (
        "ViT-B fine-tuned from dense, ImageNet",
        "78.51% top-1",
        "5.65 GFLOPs",
        "gblr train experiment=imagenet/vit-b-gblr-finetune data.root=/path/to/imagenet",
    ),
    (
        "GPT-2 fine-tuned, WikiText-103",
        "18.98 perplexity",
        "43.7% of dense",
        "gblr train experiment=wt103/gpt2-gblr-finetune",
    ),
]


def paper_reference() -> str:
    """The paper's reference table, clearly marked as the paper's."""
    lines = [
        "| run (the paper's, full hardware) | result | cost | config that would reproduce it |",
        "|---|---|---|---|",
        *[f"| {run} | {res} | {cost} | `{cmd}` |" for run, res, cost, cmd in PAPER_RUNS],
        "",
        "These figures are the paper's, measured on GPUs with the full data sets; the",
        "CPU-sized runs on this page do not reproduce them.",
    ]
    return "\n".join(lines) + "\n"


def _machine() -> dict[str, str]:
    info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": str(os.cpu_count()),
    }
    try:
        from gblr import __version__

        info["gblr"] = __version__
    except ImportError:  # pragma: no cover - the suite runs from the package
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _run_one(name: str, spec: BenchSpec, out: Path, quick: bool, device: str | None) -> dict:
    args = [sys.executable, "-m", spec.module, "--out", str(out), *spec.extra_args]
    if quick:
        args.append("--quick")
    if device is not None:
        args += ["--device", device]
    label = f"{name} ({device})" if device else name
    print(f"[bench] {label}: {' '.join(args[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(args, check=False)
    seconds = time.perf_counter() - start
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    print(f"[bench] {name}: {status} in {seconds:.0f} s", flush=True)
    return {"name": name, "out": out, "status": status, "seconds": seconds, "device": device}


def _results_block(folder: Path, page_dir: Path, level: str) -> list[str]:
    """A benchmark folder's table (its own title dropped, headings demoted) and figures."""
    body = (folder / "results.md").read_text().strip().splitlines()
    if body and body[0].startswith("# "):
        body = body[1:]  # the page supplies its own heading
    while body and not body[0].strip():
        body = body[1:]
    lines = [level + line[2:] if line.startswith("## ") else line for line in body]
    for figure in sorted(folder.glob("*.png")):
        lines += ["", f"![{figure.stem}]({os.path.relpath(figure, page_dir)})"]
    return lines


def _section(run: dict, spec: BenchSpec, page_dir: Path) -> str:
    title = spec.title + (" — CUDA" if run["device"] == "cuda" else "")
    lines = [f"## {title}", ""]
    if run["status"] != "ok":
        lines.append(f"This benchmark did not complete: {run['status']}.")
        return "\n".join(lines) + "\n"
    if not (run["out"] / "results.md").exists():
        lines.append("This benchmark wrote no results (its data was missing; see its output).")
        return "\n".join(lines) + "\n"
    lines += _results_block(run["out"], page_dir, "###")
    # further runs of the same benchmark (other settings) kept in sub-folders
    for sub in sorted(p for p in run["out"].iterdir() if (p / "results.md").exists()):
        lines += ["", f"### {title}: `{sub.name}`", ""]
        lines += _results_block(sub, page_dir, "####")
    if run["seconds"] is not None:
        lines += ["", f"_Run time: {run['seconds']:.0f} s._"]
    return "\n".join(lines) + "\n"


def _collect(names: list[str], out: Path) -> list[dict]:
    """Runs as found on disk: each benchmark's folder and, where present, its CUDA folder."""
    runs = []
    for name in names:
        for folder, device in ((out / name, None), (out / f"{name}-cuda", "cuda")):
            if device is not None and not folder.exists():
                continue
            found = (folder / "results.md").exists()
            status = "ok" if found else f"no results in {folder}"
            runs.append({"name": name, "out": folder, "status": status, "seconds": None,
                         "device": device})
    return runs


def write_results_page(runs: list[dict], page: Path, command: str) -> None:
    """Write the results page from the benchmarks' own ``results.md`` files and figures."""
    info = _machine()
    head = [
        "# gblr results",
        "",
        f"Generated by `{command}` on {info['date']}. Every figure below is read from the",
        "benchmarks' output folders; rerun the command to regenerate this page.",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in info.items() if key != "date"],
        "",
        "## The paper's reference numbers",
        "",
        paper_reference(),
    ]
    sections = [_section(run, BENCHMARKS[run["name"]], page.parent) for run in runs]
    page.write_text("\n".join(head) + "\n" + "\n".join(sections))


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m gblr.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["all"],
                        help=f"'all' or some of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="tiny settings for every benchmark")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="folder for each benchmark's output (results)")
    parser.add_argument("--page", type=Path, default=Path("RESULTS.md"),
                        help="results page to write (RESULTS.md)")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: rebuild the page from the results already in --out")
    parser.add_argument("--no-cuda", action="store_true",
                        help="skip the GPU section even when CUDA is present")
    args = parser.parse_args(given)
    names = list(BENCHMARKS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: all, {', '.join(BENCHMARKS)}")
    cuda = torch.cuda.is_available() and not args.no_cuda
    runs = []
    if args.collect:
        runs = _collect(names, args.out)
    for name in [] if args.collect else names:
        spec = BENCHMARKS[name]
        runs.append(_run_one(name, spec, args.out / name, args.quick, None))
        if cuda and spec.cuda:
            runs.append(_run_one(name, spec, args.out / f"{name}-cuda", args.quick, "cuda"))
    args.page.parent.mkdir(parents=True, exist_ok=True)
    write_results_page(runs, args.page, " ".join(["python -m gblr.bench", *given]))
    print(f"[bench] wrote {args.page}")
    return 0 if all(run["status"] == "ok" for run in runs) else 1
