"""Trained models judged at equal measured time: ``python -m gblr.bench.train_fronts``.

For each offline experiment (the Shakespeare GPT and the MNIST-1D MLP-Mixer) it trains
dense and each structure (GBLR, low rank, Monarch, BLR) at several MAC budgets with the
experiment's own ``gblr train`` configuration (one process per run, ``--jobs`` at a time,
one CPU thread each; finished runs with the same configuration are reused). Then every
trained model of an experiment is deployed (GBLR layers packed for the regime's token
counts, ``gblr.deploy(tune=True)``; the other structures as they are) and timed in one
process, one thread, repetitions interleaved, in two regimes:

- GPT: a batch of 32 x 64 characters, and one-token decoding (one new character with a
  cache of 63);
- Mixer: a batch of 128 sequences, and one sequence.

A point is one structure at one budget (mean over seeds): its test loss (GPT) or test
error rate (Mixer) against its time over dense's in a regime, and against its training
wall clock. A point is *beaten* when a point of another structure runs no slower with a
lower loss. The issue's targets are checked and printed. Writes
``results/train_fronts/{results.md,results.json}`` and one figure per experiment.

    python -m gblr.bench.train_fronts --seeds 1        # one seed: about 1.5 h on 2 cores
    python -m gblr.bench.train_fronts --quick          # a smoke test: GBLR and low rank at
                                                       # two budgets, a few steps, no tuning
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from gblr.bench.deploy_gpt import load_run
from gblr.bench.fronts import beaten_by
from gblr.bench.timing import cpu_name, steady_allocator, time_side_by_side
from gblr.bench.train import _reused, _run
from gblr.core.files import write_text_atomic
from gblr.deploy import deploy

__all__ = ["EXPERIMENTS", "STRUCTURES", "QUICK_STRUCTURES", "RIVALS", "fronts", "targets", "main"]

#: the structures trained beside dense
STRUCTURES = ("gblr", "lowrank", "monarch", "blr")
#: the most seeds looked for among finished runs of structures not being trained
MAX_SEEDS = 10
#: the structures of ``--quick``
QUICK_STRUCTURES = ("gblr", "lowrank")
#: the structures GBLR's front must lie below
RIVALS = ("lowrank", "monarch", "blr")
#: experiment prefix -> MAC budgets, the quality metric, the timing regimes (name -> batch)
EXPERIMENTS = {
    "shakespeare/gpt": {"budgets": (0.2, 0.3, 0.4), "metric": "test loss",
                        "regimes": {"batch 32x64": 32, "decode 1 token": 1}},
    "mnist1d/mixer": {"budgets": (0.15, 0.3, 0.5), "metric": "test error (%)",
                      "regimes": {"batch 128": 128, "1 sequence": 1}},
}
#: the Mixer target: a GBLR model at this speed-up over dense or more ...
MIXER_SPEEDUP = 2.0
#: ... within this many points of dense accuracy
MIXER_POINTS = 1.0
#: the budget of the low-rank point at whose latency GBLR must have the lower loss
LOWRANK_REFERENCE = 0.4


def _jobs(experiments: list[str], seeds: int, quick: bool,
          structures: tuple[str, ...] = STRUCTURES) -> list[dict]:
    jobs = []
    # a smoke test: two structures at the two extreme budgets, a few steps each
    structures = QUICK_STRUCTURES if quick else structures
    for exp in experiments:
        suite = exp.split("/")[0]
        budgets = EXPERIMENTS[exp]["budgets"]
        budgets = (budgets[0], budgets[-1]) if quick else budgets
        for kind in ("dense", *structures):
            for budget in (budgets[-1:] if kind == "dense" else budgets):
                for seed in range(seeds):
                    over = [f"budget={budget}", f"seed={seed}"]
                    if quick:
                        over += ["trainer.max_steps=6", "trainer.val_check_interval=3",
                                 "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]
                        over += (["data.num_samples=600"] if suite == "mnist1d"
                                 else ["data.max_chars=50000"])
                    name = f"{exp}-{kind}"
                    jobs.append({"suite": suite, "experiment": name, "kind": kind,
                                 "seed": seed, "overrides": over,
                                 "folder": f"{name}-b{budget}".replace("/", "_")})
    return jobs


def _prefix(run: dict) -> str:
    return run["name"].rsplit("-", 1)[0]


def _decode(model, ids: torch.Tensor):
    """One new token of the GPT ``model`` after ``ids[:, :-1]``: returns the call to time
    (the cache is trimmed back before each call, so every call decodes the same token)."""
    out = model.lm(input_ids=ids[:, :-1], use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    key = "cache" if hasattr(out, "cache") else "past_key_values"
    length = ids.shape[1] - 1

    def step():
        if cache.get_seq_length() > length:
            cache.crop(length - cache.get_seq_length())
        return model.lm(input_ids=ids[:, -1:], use_cache=True, **{key: cache}).logits
    return step


def _inputs(exp: str, cfg, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if exp == "shakespeare/gpt":
        return torch.randint(0, 64, (batch, int(cfg.data.block_size)), generator=g)
    from gblr.train.runner import build_data

    info = build_data(cfg)[3]
    return torch.randn(batch, info["img_size"], generator=g)


def _deployed(model, exp: str, cfg, batches: list[int], tune: bool = True):
    """``model`` with its GBLR layers packed for the token counts its layers see (``tune``:
    the fastest of the candidate packings, timed)."""
    if model.linear != "gblr":
        return model
    tokens = set()
    for b in batches:
        if exp == "shakespeare/gpt":
            tokens.add(b * (1 if b == 1 else int(cfg.data.block_size)))
        else:  # the channel MLPs see batch x patches tokens, the token MLPs batch x dim
            tokens |= {b * model.patch.num_patches, b * int(cfg.model.dim)}
    deploy(model, tokens=sorted(tokens), tune=tune)
    return model


def measure_latency(exp: str, runs: list[dict], reps: int, tune: bool = True
                    ) -> dict[str, dict[str, float]]:
    """Median seconds per call of each run's deployed model, per regime: ``{regime:
    {run_dir: seconds}}``, all models of the experiment interleaved."""
    regimes = EXPERIMENTS[exp]["regimes"]
    models, cfg = {}, None
    for r in runs:
        model, cfg = load_run(Path(r["run_dir"]))
        models[r["run_dir"]] = _deployed(model, exp, cfg, list(regimes.values()), tune)
    out = {}
    with torch.inference_mode():
        for regime, batch in regimes.items():
            x = _inputs(exp, cfg, batch)  # the runs of an experiment share its input shape
            fns = {}
            for key, model in models.items():
                if exp == "shakespeare/gpt" and batch == 1:
                    fns[key] = _decode(model, x)
                else:
                    fns[key] = partial(model, x)
            out[regime] = time_side_by_side(fns, reps=reps, min_time=0.05)
            print(f"{exp}, {regime}: timed {len(fns)} models")
    return out


def _quality(run: dict) -> float:
    if "test_acc" in run:
        return 100.0 * (1.0 - float(run["test_acc"]))
    return float(run["test_loss"])


def fronts(exp: str, runs: list[dict], latency: dict[str, dict[str, float]]) -> list[dict]:
    """One point per structure and budget (dense: one), seeds averaged: quality (lower is
    better), its spread, the MAC cost, time over dense per regime, training seconds."""
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for r in runs:
        key = (r["linear"], None if r["linear"] == "dense" else float(r["budget"]))
        groups.setdefault(key, []).append(r)
    dense = groups.get(("dense", None))
    if not dense:
        raise ValueError(f"{exp}: no finished dense run; every time is a ratio to dense's")
    dense_seconds = statistics.mean(float(r["fit_seconds"]) for r in dense)
    points = []
    for (kind, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        q = [_quality(r) for r in rs]
        p = {"structure": kind, "budget": budget, "seeds": len(rs),
             "quality": statistics.mean(q),
             "spread": statistics.stdev(q) if len(q) > 1 else 0.0,
             "macs": statistics.mean(float(r["cost_fraction"]) for r in rs),
             "train_seconds": statistics.mean(float(r["fit_seconds"]) for r in rs),
             "train_time": statistics.mean(float(r["fit_seconds"]) for r in rs)
             / dense_seconds,
             "times": {}}
        for regime, seconds in latency.items():
            p["times"][regime] = (statistics.mean(seconds[r["run_dir"]] for r in rs)
                                  / statistics.mean(seconds[d["run_dir"]] for d in dense))
        points.append(p)
    for regime in latency:
        at = [{**p, "time": p["times"][regime], "mean_error": p["quality"]} for p in points]
        for p, q in zip(points, at, strict=True):
            p.setdefault("beaten_by", {})[regime] = [
                b for b in beaten_by(q, at) if not b.startswith("dense")]
    return points


def _interpolate(points: list[dict], regime: str, time: float) -> float | None:
    """GBLR's quality on its front (linear between its points) at ``time``, or None
    outside its points' range."""
    xs = sorted((p["times"][regime], p["quality"]) for p in points if p["structure"] == "gblr")
    for (t0, q0), (t1, q1) in zip(xs, xs[1:], strict=False):
        if t0 <= time <= t1:
            return q0 if t1 == t0 else q0 + (q1 - q0) * (time - t0) / (t1 - t0)
    return None


def targets(exp: str, points: list[dict]) -> list[str]:
    """The issue's targets for ``exp``, one line each, starting with met / not met."""
    lines = []
    missing = [r for r in RIVALS if not any(p["structure"] == r for p in points)]
    for regime in EXPERIMENTS[exp]["regimes"]:
        bad = [f"GBLR@{p['budget']} beaten by {', '.join(p['beaten_by'][regime])}"
               for p in points if p["structure"] == "gblr"
               and any(b.split("@")[0] in RIVALS for b in p["beaten_by"][regime])]
        verdict = "not met" if bad else "not checked" if missing else "met"
        lines.append(f"{verdict}: {regime}, GBLR's front below low rank's, Monarch's and "
                     "BLR's" + (f" ({'; '.join(bad)})" if bad else "")
                     + (f" (no runs of {', '.join(missing)})" if missing else ""))
    ref = [p for p in points if p["structure"] == "lowrank" and p["budget"] == LOWRANK_REFERENCE]
    gblr = [p for p in points if p["structure"] == "gblr"]
    for regime in EXPERIMENTS[exp]["regimes"]:
        if not ref:
            break
        t = ref[0]["times"][regime]
        q = _interpolate(points, regime, t)
        if q is None:
            lines.append(f"not met: {regime}, GBLR has no point on both sides of low rank@"
                         f"{LOWRANK_REFERENCE}'s time {t:.3f}")
            continue
        spread = max([ref[0]["spread"], *(p["spread"] for p in gblr)])
        margin = ref[0]["quality"] - q
        seeds = min([ref[0]["seeds"], *(p["seeds"] for p in gblr)])
        ok = margin > spread and seeds >= 3
        lines.append(f"{'met' if ok else 'not met'}: {regime}, at low rank@{LOWRANK_REFERENCE}'s "
                     f"time ({t:.3f} of dense) GBLR {q:.4f} vs low rank {ref[0]['quality']:.4f}"
                     f" (margin {margin:+.4f}, largest seeds' spread {spread:.4f}, "
                     f"at least {seeds} seed(s) per point; 3 needed)")
    if exp == "mnist1d/mixer":
        dense = next(p for p in points if p["structure"] == "dense")
        for regime in EXPERIMENTS[exp]["regimes"]:
            fast = [p for p in gblr if p["times"][regime] <= 1.0 / MIXER_SPEEDUP]
            best = min(fast, key=lambda p: p["quality"], default=None)
            ok = best is not None and best["quality"] - dense["quality"] <= MIXER_POINTS
            what = ("no GBLR point" if best is None else
                    f"GBLR@{best['budget']} {best['quality']:.2f}% error vs dense "
                    f"{dense['quality']:.2f}%")
            lines.append(f"{'met' if ok else 'not met'}: {regime}, a GBLR model at >= "
                         f"{MIXER_SPEEDUP}x within {MIXER_POINTS} point of dense ({what})")
    return lines


def _markdown(result: dict) -> str:
    lines = ["# Trained models at equal measured time", "",
             "Training: one thread per run; timing: one thread, interleaved repetitions, "
             "medians, all models of an experiment in one process. Quality is the mean over "
             "seeds (± their standard deviation); time is the deployed model's over dense's "
             "(GBLR packed by `gblr.deploy`); train time is `gblr train`'s fit time over "
             "dense's (runs shared the cores). A point is beaten by a point of another "
             "structure that runs no slower with lower loss/error.", ""]
    for exp, ex in result["experiments"].items():
        s = ex["settings"]
        lines += [f"## {exp}", "",
                  f"Command: `{s['command']}`. {s['cpu']}, torch {s['torch']}; {s['jobs']} "
                  f"runs at a time; {s['reps']} repetitions; `tune={s['tune']}`.", ""]
        regimes = list(EXPERIMENTS[exp]["regimes"])
        metric = EXPERIMENTS[exp]["metric"]
        lines += [f"| structure | budget | seeds | MACs / dense | {metric} | "
                  + " | ".join(f"time / dense, {r} | beaten by ({r})" for r in regimes)
                  + " | train time / dense |",
                  "|---|---:|---:|---:|---:|" + "---:|---|" * len(regimes) + "---:|"]
        for p in ex["points"]:
            q = f"{p['quality']:.4f}" + (f" ± {p['spread']:.4f}" if p["seeds"] > 1 else "")
            cells = " | ".join(f"{p['times'][r]:.3f} | {', '.join(p['beaten_by'][r]) or '-'}"
                               for r in regimes)
            lines.append(f"| {p['structure']} | {p['budget'] or '-'} | {p['seeds']} | "
                         f"{p['macs']:.3f} | {q} | {cells} | {p['train_time']:.2f} |")
        lines += ["", f"![{exp}]({ex['figure']})", "", "Targets:", ""]
        lines += [f"- {t}" for t in ex["targets"]] + [""]
    return "\n".join(lines)


def _earlier(path: Path, rerun: list[str]) -> dict:
    """The experiments of an earlier ``results.json`` at ``path`` that are not in ``rerun``
    (each with its own settings), or nothing when there is no earlier file or it cannot
    be reported again (a warning says so when it exists)."""
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text())
        kept = {e: ex for e, ex in earlier["experiments"].items()
                if e in EXPERIMENTS and e not in rerun}
        for ex in kept.values():  # files written before settings were per experiment
            ex.setdefault("settings", earlier.get("settings"))
        _markdown({"experiments": kept})  # what is kept must render, or nothing is
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        print(f"warning: the earlier results in {path} are not kept ({type(err).__name__}: "
              f"{err})", file=sys.stderr)
        return {}
    return kept


def plot(exp: str, points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(EXPERIMENTS[exp]["regimes"])
    panels = [(r, lambda p, r=r: p["times"][r], f"deployed time / dense, {r}") for r in regimes]
    panels.append(("train", lambda p: p["train_time"], "training wall clock / dense"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), sharey=True)
    for ax, (_, x_of, label) in zip(axes, panels, strict=True):
        for kind in STRUCTURES:
            pts = sorted((x_of(p), p["quality"], p["spread"], p["budget"]) for p in points
                         if p["structure"] == kind)
            if not pts:
                continue
            xs, ys, es, bs = zip(*pts, strict=True)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=2, label=kind)
            for x, y, b in zip(xs, ys, bs, strict=True):
                ax.annotate(f"{b}", (x, y), textcoords="offset points", xytext=(3, 3),
                            fontsize=7)
        dense = next(p for p in points if p["structure"] == "dense")
        ax.plot([x_of(dense)], [dense["quality"]], marker="*", markersize=12, color="black",
                linestyle="none", label="dense")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(EXPERIMENTS[exp]["metric"])
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{exp}: quality vs measured time, 1 thread (labels: MAC budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gblr.bench.train_fronts",
                                description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS),
                   choices=list(EXPERIMENTS))
    p.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=STRUCTURES,
                   help="the structures trained with seeds 0 .. --seeds - 1 (dense always is). "
                   "Every finished run in --work whose config matches joins the fronts, "
                   "whatever its structure and seed (the table gives each point's seeds)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    p.add_argument("--work", default=None,
                   help="where the runs go (default runs/train-fronts; with --quick OUT/runs)")
    p.add_argument("--data-root", default=os.environ.get("GBLR_DATA", "~/.cache/gblr/data"))
    p.add_argument("--out", default="results/train_fronts")
    args = p.parse_args(argv)
    for name in ("seeds", "jobs", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.quick:
        args.seeds, args.reps = 1, 3
    out = Path(args.out)
    work = Path(args.work or (out / "runs" if args.quick else "runs/train-fronts"))
    data_root = Path(os.path.expanduser(args.data_root))
    torch.set_num_threads(1)
    steady_allocator()
    if "mnist1d/mixer" in args.experiments:  # the data cache, once, before parallel runs
        from gblr.data import mnist1d_splits

        mnist1d_splits(data_root, num_samples=600 if args.quick else 10000)
    jobs = _jobs(args.experiments, args.seeds, args.quick, tuple(args.structures))
    # finished runs beyond these jobs (other structures, other seeds) join the fronts too
    planned = {(j["seed"], j["folder"]) for j in jobs}
    extra = [j for j in _jobs(args.experiments, MAX_SEEDS, args.quick)
             if (j["seed"], j["folder"]) not in planned]
    for j in jobs + extra:
        j["work"] = work / j.pop("folder")
    found = [r for r in (_reused(j, j["work"], data_root) for j in extra) if r is not None]
    reused = [_reused(j, j["work"], data_root) for j in jobs]
    todo = [j for j, r in zip(jobs, reused, strict=True) if r is None]
    print(f"{len(jobs)} runs, {len(todo)} to train, {args.jobs} at a time")
    with ThreadPoolExecutor(args.jobs) as pool:
        ran = iter(list(pool.map(lambda j: _run(j, j["work"], data_root), todo)))
    runs = [r if r is not None else next(ran) for r in reused] + found
    settings = {"command": "python -m gblr.bench.train_fronts "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "cpu": cpu_name(), "torch": torch.__version__, "jobs": args.jobs,
                "reps": args.reps, "seeds": args.seeds, "tune": not args.quick}
    # the experiments not run this time keep their results from an earlier command
    result = {"experiments": _earlier(out / "results.json", args.experiments)}
    out.mkdir(parents=True, exist_ok=True)
    for exp in args.experiments:
        rs = [r for r in runs if _prefix(r) == exp]
        points = fronts(exp, rs, measure_latency(exp, rs, args.reps, tune=not args.quick))
        figure = exp.replace("/", "_") + ".png"
        plot(exp, points, out / figure)
        result["experiments"][exp] = {"settings": settings, "points": points,
                                      "targets": targets(exp, points), "figure": figure,
                                      "runs": rs}
    result["experiments"] = {e: result["experiments"][e] for e in EXPERIMENTS
                             if e in result["experiments"]}
    text = _markdown(result)
    write_text_atomic(out / "results.md", text)
    write_text_atomic(out / "results.json", json.dumps(result, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
