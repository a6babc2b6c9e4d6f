"""Error against measured deployed time: the fronts of every structure on MiniLM-L6's weights.

    python -m gblr.bench.fronts [--quick] [--budgets 0.15 0.3 0.5] [--tokens 1 2048]

Every linear weight of MiniLM-L6's encoder (36 matrices) is projected onto each structure
(low rank = truncated SVD, Monarch, block low rank, block sparse, GBLR) at each MAC budget,
as :mod:`gblr.bench.approx` does. Each projected layer then runs in its deployed form (a
GBLR layer packed for the token count, ``layer.packed(tokens, tune=True)``; the others as
they are) beside the dense ``nn.Linear`` of the same weight, one thread, repetitions
interleaved (:func:`gblr.core.timing.time_samples`), at each token count. A point of the
front is one structure at one budget: the mean relative Frobenius error over the 36
matrices against their summed time over the dense layers' summed time. The device's time
model predicts the same sums (``gblr calibrate``; calibrated on first use).

A point is *beaten* when a point of another structure has no larger time and a smaller
error. The issue's target: no GBLR point with a time between 0.25 and 0.8 of dense is
beaten, at every token count. Writes ``results/fronts/{results.md,results.json}`` and one
figure per token count, ``fronts_t<tokens>.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from gblr.bench.approx import LABELS, minilm_weights
from gblr.bench.timing import cpu_name, time_samples
from gblr.core.files import write_text_atomic
from gblr.core.progress import progress
from gblr.projection.calibration import Calibration, relative_error
from gblr.projection.timebudget import deployed_seconds, measured_times

__all__ = ["ERRORS", "STRUCTURES", "TIME_RANGE", "beaten_by", "input_moments", "main",
           "measure"]

#: the structures of the fronts (dense is the reference point: time 1, error 0)
STRUCTURES = ("lowrank", "monarch", "blr", "blocksparse", "gblr")
#: the range of deployed time (fraction of dense) over which the target compares the fronts
TIME_RANGE = (0.25, 0.8)
#: the figures' time axis ends here (fraction of dense); slower points are listed in them
MAX_PLOTTED_TIME = 2.0
#: the errors of a point: key -> label
ERRORS = {"mean_error": "plain error", "mean_data_error": "data-aware error"}
#: passages of the embedded text (about 48 words each) the input moments are taken over
MOMENT_PASSAGES = 64


def input_moments(weights: dict[str, torch.Tensor], passages: int = MOMENT_PASSAGES
                  ) -> dict[str, Calibration]:
    """The second moment of the inputs each weight's layer sees while the dense MiniLM-L6
    encodes ``passages`` passages of the embedded text (batches of 16, 128 tokens at most,
    padding included as the model computes it). A weight named ``layer[:rows,:cols]`` (the
    quick slices) gets the moment of the first ``cols`` input features."""
    from gblr.convert.calibrate import capture_second_moments
    from gblr.convert.hf import default_model_path, load_hf_model
    from gblr.convert.text import encode, read_passages
    from gblr.data.corpus import default_corpus_path

    model, tokenizer = load_hf_model(default_model_path())
    texts = read_passages(default_corpus_path())[:passages]
    batches = [encode(tokenizer, texts[i:i + 16], 128) for i in range(0, len(texts), 16)]
    bases = {name: name.split("[")[0] for name in weights}
    with torch.no_grad():
        moments = capture_second_moments(model, dict.fromkeys(set(bases.values()), "linear"),
                                         batches)
    return {name: Calibration.from_second_moment(
        moments[bases[name]][: w.shape[1], : w.shape[1]]) for name, w in weights.items()}


def _deployed(layer: nn.Module, tokens: int) -> nn.Module:
    from gblr.layers.gblr import GBLRLinear

    layer = layer.eval()
    if isinstance(layer, GBLRLinear):
        return layer.packed(tokens=tokens, tune=True)
    return layer


def measure(weights: dict[str, torch.Tensor], budgets: list[float], tokens: list[int],
            reps: int, steps: int | None) -> list[dict]:
    """One row per matrix, structure and budget: error, MACs, and per token count the
    measured and predicted seconds of its deployed form and of the dense layer."""
    import gblr

    model = measured_times("cpu", torch.float32)
    moments = input_moments(weights)
    rows = []
    for name, w in progress(list(weights.items()), desc="fronts: matrices"):
        dense = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            dense.weight.copy_(w)
        layers = {}
        for structure in STRUCTURES:
            for budget in budgets:
                try:
                    layer, rec = gblr.project(w, budget, structure=structure, steps=steps,
                                              progress=False, name=name)
                except ValueError as err:  # the structure has no layer within this budget
                    rows.append({"name": name, "structure": structure, "budget": budget,
                                 "skipped": str(err)})
                    continue
                layers[(structure, budget)] = (layer, rec)
        with torch.no_grad():
            timed = {(s, b): {"name": name, "structure": s, "budget": b, "error": rec.error,
                              "data_error": relative_error(layer.to_dense(), w, moments[name]),
                              "macs": int(layer.macs()), "dense_macs": w.numel(), "times": {}}
                     for (s, b), (layer, rec) in layers.items()}
        for t in tokens:
            x = torch.randn(t, w.shape[1])
            forms = {key: _deployed(layer, t) for key, (layer, _) in layers.items()}
            fns = {"dense": lambda d=dense, x=x: d(x)}
            fns.update({f"{s}@{b}": (lambda m=m, x=x: m(x)) for (s, b), m in forms.items()})
            with torch.inference_mode():
                samples = time_samples(fns, reps=reps)
            dense_s = statistics.median(samples["dense"])
            dense_pred = deployed_seconds(dense, t, model)
            for (s, b), (layer, _) in layers.items():
                timed[(s, b)]["times"][str(t)] = {
                    "seconds": statistics.median(samples[f"{s}@{b}"]),
                    "dense_seconds": dense_s,
                    "predicted": deployed_seconds(layer, t, model),
                    "dense_predicted": dense_pred,
                }
        rows += list(timed.values())
    return rows


def summarize(rows: list[dict], tokens: list[int]) -> dict[str, list[dict]]:
    """Per token count, one point per structure and budget (matrices pooled)."""
    done = [r for r in rows if "skipped" not in r]
    out: dict[str, list[dict]] = {}
    for t in map(str, tokens):
        points = []
        for s, b in sorted({(r["structure"], r["budget"]) for r in done}):
            rs = [r for r in done if r["structure"] == s and r["budget"] == b]
            if len(rs) < len({r["name"] for r in rows}):
                continue  # skipped on some matrix: no comparable sum
            tm = [r["times"][t] for r in rs]
            points.append({
                "structure": s, "budget": b, "matrices": len(rs),
                "mean_error": statistics.mean(r["error"] for r in rs),
                "mean_data_error": statistics.mean(r["data_error"] for r in rs),
                "macs": sum(r["macs"] for r in rs) / sum(r["dense_macs"] for r in rs),
                "time": sum(x["seconds"] for x in tm) / sum(x["dense_seconds"] for x in tm),
                "predicted": sum(x["predicted"] for x in tm)
                / sum(x["dense_predicted"] for x in tm),
            })
        for p in points:
            p["beaten_by"] = beaten_by(p, points)
            p["beaten_by_data"] = beaten_by(p, points, "mean_data_error")
        out[t] = points
    return out


def beaten_by(point: dict, points: list[dict], error: str = "mean_error") -> list[str]:
    """The points of other structures that run no slower than ``point`` with a smaller
    ``error`` (a key of :data:`ERRORS`), as ``structure@budget``."""
    return [f"{q['structure']}@{q['budget']}" for q in points
            if q["structure"] != point["structure"] and q["time"] <= point["time"]
            and q[error] < point[error]]


def target_met(fronts: dict[str, list[dict]]) -> tuple[bool, list[str]]:
    """Whether no GBLR point within :data:`TIME_RANGE` is beaten (and there is one), with
    the reasons where not."""
    lo, hi = TIME_RANGE
    why = []
    for t, points in fronts.items():
        inside = [p for p in points if p["structure"] == "gblr" and lo <= p["time"] <= hi]
        if not inside:
            why.append(f"{t} token(s): no GBLR point runs within {lo}-{hi} of dense")
        for p in inside:
            for key, by in (("mean_error", "beaten_by"), ("mean_data_error", "beaten_by_data")):
                if p[by]:
                    why.append(f"{t} token(s): GBLR@{p['budget']} (time {p['time']:.2f}, "
                               f"{ERRORS[key]} {p[key]:.3f}) beaten by {', '.join(p[by])}")
    return not why, why


def _markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Error against measured deployed time (MiniLM-L6's weights)", "",
        f"Command: `{s['command']}`. {s['matrices']} matrices, {s['cpu']}, torch {s['torch']},"
        f" 1 thread, float32; {s['reps']} interleaved repetitions, medians. Errors: mean "
        "relative Frobenius error over the matrices, plain and data-aware (weighted by the "
        "second moment of each layer's inputs on the embedded text). Time: the deployed "
        "forms' summed time "
        "over the dense layers' (GBLR packed for the token count with `tune=True`); "
        "predicted: the same ratio from the device's time model. A point is beaten by a "
        "point of another structure that runs no slower with a smaller error.", "",
    ]
    for t, points in result["fronts"].items():
        lines += [f"## {t} token(s) per call", "",
                  "| structure | budget (MACs) | MACs / dense | time / dense | predicted | "
                  "plain error | beaten by | data-aware error | beaten by |",
                  "|---|---:|---:|---:|---:|---:|---|---:|---|"]
        for p in sorted(points, key=lambda p: (p["structure"], p["budget"])):
            lines.append(
                f"| {LABELS[p['structure']]} | {p['budget']} | {p['macs']:.3f} | "
                f"{p['time']:.3f} | {p['predicted']:.3f} | {p['mean_error']:.4f} | "
                f"{', '.join(p['beaten_by']) or '-'} | {p['mean_data_error']:.4f} | "
                f"{', '.join(p['beaten_by_data']) or '-'} |")
        lines += ["", f"![fronts_t{t}](fronts_t{t}.png)", ""]
    met, why = result["target_met"], result["target_why"]
    lo, hi = TIME_RANGE
    lines.append(f"Target (no GBLR point with time in {lo}-{hi} of dense beaten, at every "
                 f"token count, by either error): {'met' if met else 'not met'}.")
    lines += [f"- {w}" for w in why]
    skipped = [r for r in result["rows"] if "skipped" in r]
    if skipped:
        lines += ["", f"Skipped (no layer of the structure within the budget): {len(skipped)} "
                  "matrix/structure/budget cases; their points are left out."]
    return "\n".join(lines) + "\n"


def plot(fronts: dict[str, list[dict]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for t, points in fronts.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharex=True)
        for ax, (key, label) in zip(axes, ERRORS.items(), strict=True):
            for s in STRUCTURES:
                pts = sorted((p["time"], p[key], p["budget"]) for p in points
                             if p["structure"] == s)
                if not pts:
                    continue
                xs, ys, _ = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=LABELS[s])
                for x, y, b in pts:
                    ax.annotate(f"{b}", (x, y), textcoords="offset points", xytext=(3, 3),
                                fontsize=7)
            ax.plot([1.0], [0.0], marker="*", markersize=12, color="black",
                    linestyle="none", label="dense")
            ax.axvspan(*TIME_RANGE, color="grey", alpha=0.08)
            # the fronts are compared within a few times dense; slower points are listed
            far = sorted((p for p in points if p["time"] > MAX_PLOTTED_TIME),
                         key=lambda p: (p["structure"], p["budget"]))
            ax.set_xlim(0.0, min(MAX_PLOTTED_TIME, 1.05 * max(p["time"] for p in points)))
            if far:
                ax.text(0.02, 0.02, "off scale: " + ", ".join(
                    f"{LABELS[p['structure']]} {p['budget']} ({p['time']:.3g}x)" for p in far),
                    transform=ax.transAxes, fontsize=6, wrap=True)
            ax.set_xlabel("measured deployed time / dense (sum over the matrices)")
            ax.set_ylabel(f"mean relative {label}")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"MiniLM-L6 weights, {t} token(s) per call, 1 thread "
                     "(labels: MAC budget)")
        fig.tight_layout()
        path = out / f"fronts_t{t}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gblr.bench.fronts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="two small slices of the weights, two budgets, few repetitions")
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help="MAC budgets (fractions of dense)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2048],
                        help="tokens per call")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
    parser.add_argument("--steps", type=int, default=None, help="GBLR search steps")
    parser.add_argument("--out", type=Path, default=Path("results/fronts"))
    args = parser.parse_args(argv)
    if any(t < 1 for t in args.tokens):
        parser.error("--tokens must be positive")
    torch.set_num_threads(1)
    budgets = args.budgets or ([0.25, 0.5] if args.quick else [0.15, 0.3, 0.5])
    if not all(0.0 < b <= 1.0 for b in budgets):
        parser.error("--budgets must be in (0, 1]")
    reps = args.reps or (3 if args.quick else 7)
    t0 = time.perf_counter()
    rows = measure(minilm_weights(args.quick), budgets, args.tokens, reps, args.steps)
    fronts = summarize(rows, args.tokens)
    met, why = target_met(fronts)
    command = "python -m gblr.bench.fronts " + " ".join(
        argv if argv is not None else sys.argv[1:])
    result = {
        "settings": {"command": command.strip(), "budgets": budgets, "tokens": args.tokens,
                     "reps": reps, "steps": args.steps, "quick": args.quick,
                     "matrices": len({r["name"] for r in rows}), "cpu": cpu_name(),
                     "torch": torch.__version__, "seconds": time.perf_counter() - t0},
        "rows": rows, "fronts": fronts, "target_met": met, "target_why": why,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "results.json", json.dumps(result, indent=1))
    plot(fronts, args.out)
    text = _markdown(result)
    write_text_atomic(args.out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
