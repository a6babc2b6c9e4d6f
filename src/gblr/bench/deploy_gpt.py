"""Deploy the Shakespeare GPT trained with GBLR layers, and time it against the dense GPT.

Takes a finished run of ``gblr train experiment=shakespeare/gpt-gblr`` (its folder holds
``config.yaml`` and ``final.ckpt``), or trains one first. It rebuilds the trained model,
swaps its GBLR layers for packed ones with :func:`gblr.deploy`, checks that the logits
agree, and times the dense GPT of the same shape, the trained (masked) GBLR GPT and the
deployed one side by side. Results go to ``results/deploy_gpt/``.

    python -m gblr.bench.deploy_gpt --run runs/shakespeare_gpt-gblr
    python -m gblr.bench.deploy_gpt               # trains the experiment first
    python -m gblr.bench.deploy_gpt --quick       # a few training steps, tiny timings
    python -m gblr.bench.deploy_gpt --run RUN --baseline LOWRANK_RUN   # also time that one
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from gblr.bench.timing import steady_allocator, time_side_by_side
from gblr.deploy import deploy

__all__ = ["load_run", "gpt_end_to_end", "plot_tradeoff", "main"]

EXPERIMENT = "shakespeare/gpt-gblr"


def load_run(run_dir: Path) -> tuple[nn.Module, object]:
    """The trained model of a ``gblr train`` run folder, in evaluation mode, and its config
    (any experiment: a model other than the GPT reads its input size from its data set)."""
    from omegaconf import OmegaConf

    from gblr.train.runner import build_data, build_model

    config, ckpt = run_dir / "config.yaml", run_dir / "final.ckpt"
    for path in (config, ckpt):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is {run_dir} a finished gblr train run?")
    cfg = OmegaConf.load(config)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    if cfg.model.arch == "gpt":
        vocab = next(v.shape[0] for k, v in state.items() if k.endswith("wte.weight"))
        info = {"task": "lm", "vocab_size": vocab, "block_size": int(cfg.data.block_size)}
    else:  # the input size and classes come from the run's data set
        info = build_data(cfg)[3]
    model = build_model(cfg, info)
    model.load_state_dict(state)
    return model.eval(), cfg


def gpt_end_to_end(run_dir: Path, batch: int, reps: int, baselines: Sequence[Path] = (),
                   tune: bool = False) -> dict:
    """Outputs agreement and median forward times: dense, trained GBLR, deployed GBLR.

    ``baselines`` are finished runs of the same GPT with another structure (say low rank
    at the same cost), timed side by side as they were trained."""
    from omegaconf import OmegaConf

    from gblr.train.runner import build_model

    trained, cfg = load_run(run_dir)
    dense_cfg = copy.deepcopy(cfg)
    OmegaConf.update(dense_cfg, "model.linear", "dense")
    vocab = trained.lm.config.vocab_size
    seq = int(cfg.data.block_size)
    dense = build_model(dense_cfg, {"task": "lm", "vocab_size": vocab, "block_size": seq}).eval()
    deployed = copy.deepcopy(trained)
    report = deploy(deployed, tokens=batch * seq, tune=tune)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    others = {}
    for path in baselines:
        model, other_cfg = load_run(path)
        if model.lm.config.vocab_size != vocab or int(other_cfg.data.block_size) != seq:
            raise ValueError(f"--baseline {path}: not the same GPT (vocabulary or block size)")
        others[f"{other_cfg.model.linear} ({path})"] = model
    models = {"dense": dense, "trained": trained, "deployed": deployed, **others}
    with torch.inference_mode():
        ref, out = trained(ids).double(), deployed(ids).double()
        times = time_side_by_side({k: partial(m, ids) for k, m in models.items()},
                                  reps=reps, min_time=0.0)
    return {
        "run": str(run_dir), "tuned": tune, "batch": batch, "seq": seq,
        "layers": len(report.layers),
        "true_cost": report.true_macs / report.dense_macs,
        "packed_cost": report.packed_macs / report.dense_macs,
        "max_abs_diff": float((out - ref).abs().max()),
        "cosine": float(nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)),
        "same_argmax": float((out.argmax(-1) == ref.argmax(-1)).double().mean()),
        "time_ms": {k: v * 1e3 for k, v in times.items()},
        "baselines": list(others),
        "test_loss": _test_loss(run_dir),
        "baseline_losses": {name: _test_loss(path) for name, path in zip(others, baselines,
                                                                           strict=True)},
        "rank_per_component": OmegaConf.select(cfg, "model.gblr.rank_per_component"),
        "speedup_vs_dense": times["dense"] / times["deployed"],
        "speedup_vs_trained": times["trained"] / times["deployed"],
    }


def _test_loss(run_dir: Path) -> float | None:
    """The test loss a ``gblr train`` run recorded in its ``summary.json`` (None without one)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    loss = json.loads(path.read_text()).get("test_loss")
    return None if loss is None else float(loss)


def plot_tradeoff(results: Sequence[Path], path: Path) -> int:
    """Test loss against end-to-end speedup over the dense GPT, one point per deployed run
    in the ``results.json`` files given (and one per baseline run): returns the points drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, tuple[float, float, bool]] = {}
    for file in results:
        r = json.loads(Path(file).read_text())
        t = r["time_ms"]
        loss = r.get("test_loss", _test_loss(Path(r["run"])))
        if loss is not None:
            rank = r.get("rank_per_component")
            config = Path(r["run"]) / "config.yaml"
            if rank is None and config.is_file():
                from omegaconf import OmegaConf

                rank = OmegaConf.select(OmegaConf.load(config), "model.gblr.rank_per_component")
            label = f"GBLR deployed ({Path(r['run']).name})" if rank is None else (
                f"GBLR deployed, rank-{rank} components")
            points[label] = (t["dense"] / t["deployed"], loss, True)
        for name in r.get("baselines", []):
            run = name[name.find("(") + 1:-1] if "(" in name else name
            b_loss = r.get("baseline_losses", {}).get(name, _test_loss(Path(run)))
            if b_loss is not None:
                points.setdefault(name.split(" (")[0] + " (as trained)",
                                  (t["dense"] / t[name], b_loss, False))
    if not points:
        return 0
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (x, y, ours) in sorted(points.items()):
        ax.scatter([x], [y], marker="o" if ours else "s", s=40)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    xs = [x for x, _, _ in points.values()]
    ax.set_xlim(min(0.95, min(xs) - 0.05), max(xs) + 0.35)
    ax.set_xlabel("end-to-end speed vs the dense GPT (x)")
    ax.set_ylabel("test loss (lower is better)")
    ax.set_title("Shakespeare GPT at 40% of the linear layers' cost (CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(points)


def _markdown(r: dict, command: str, threads: int) -> str:
    t = r["time_ms"]
    return "\n".join([
        "# Deployed Shakespeare GPT (GBLR layers, trained)",
        "",
        f"Command: `{command}`; {threads} thread(s), medians of interleaved repetitions, "
        f"batch {r['batch']} x {r['seq']} characters, run `{r['run']}`"
        f"{', packings tuned by timing' if r.get('tuned') else ''}; allocator: "
        f"{r.get('allocator', 'default')}.",
        "",
        "| model | ms | speedup vs dense |",
        "|---|---|---|",
        f"| dense GPT (same shape) | {t['dense']:.2f} | 1.00x |",
        f"| trained GBLR (masked) | {t['trained']:.2f} | {t['dense'] / t['trained']:.2f}x |",
        f"| deployed (packed) | {t['deployed']:.2f} | {r['speedup_vs_dense']:.2f}x |",
        *(f"| baseline: {name}, as trained | {t[name]:.2f} | {t['dense'] / t[name]:.2f}x |"
          for name in r.get("baselines", [])),
        "",
        f"Deployed vs trained logits: cosine {r['cosine']:.9f}, max abs diff "
        f"{r['max_abs_diff']:.1e}, same next-character prediction on {100 * r['same_argmax']:.2f}% "
        f"of positions. Replaced layers ({r['layers']}): true cost {r['true_cost']:.3f}, packed "
        f"MACs {r['packed_cost']:.3f} of their dense cost.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m gblr.bench.deploy_gpt",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None,
                        help=f"a finished `gblr train experiment={EXPERIMENT}` folder")
    parser.add_argument("--baseline", type=Path, nargs="+", default=[], metavar="RUN",
                        help="finished runs of the same GPT with other structures (e.g. "
                        "shakespeare/gpt-lowrank), timed side by side as trained")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is (by default freed activation "
                        "memory is kept for reuse, so no model is timed on page faults)")
    parser.add_argument("--tune", action="store_true",
                        help="time candidate packings of each layer and keep the fastest")
    parser.add_argument("--plot", type=Path, default=None, metavar="DIR",
                        help="only draw DIR/tradeoff.png (test loss vs speedup) from the "
                        "results.json files under DIR, and exit")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/deploy_gpt"))
    parser.add_argument("--work", type=Path, default=None,
                        help="where the GPT is trained when --run is not given "
                        "(runs/deploy_gpt; with --quick, OUT/run)")
    args = parser.parse_args(given)
    if args.plot is not None:
        files = sorted(args.plot.rglob("results.json"))
        drawn = plot_tradeoff(files, args.plot / "tradeoff.png")
        print(f"drew {drawn} points from {len(files)} results in {args.plot / 'tradeoff.png'}")
        return 0 if drawn else 1
    if args.batch <= 0 or args.threads <= 0:
        parser.error("--batch and --threads must be positive")
    torch.set_num_threads(args.threads)
    steady = False if args.default_allocator else steady_allocator()
    torch.manual_seed(0)
    run_dir = args.run
    if run_dir is None:
        from gblr.train.runner import main as train_main

        run_dir = args.work or (args.out / "run" if args.quick else Path("runs/deploy_gpt"))
        overrides = [f"experiment={EXPERIMENT}", f"out_dir={run_dir}", f"threads={args.threads}"]
        if args.quick:
            overrides += ["trainer.max_steps=4", "trainer.val_check_interval=2",
                          "data.max_chars=20000", "checkpoint.every_n_train_steps=2"]
        if train_main(overrides) != 0:
            print("deploy_gpt: training the GPT failed (see above)", file=sys.stderr)
            return 1
    result = gpt_end_to_end(run_dir, 4 if args.quick else args.batch,
                            args.reps or (3 if args.quick else 30), args.baseline, args.tune)
    result["allocator"] = "steady (freed memory kept)" if steady else "default"
    command = " ".join(["python -m gblr.bench.deploy_gpt", *given])
    table = _markdown(result, command, args.threads)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
