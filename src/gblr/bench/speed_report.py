"""Tables and the figure of the speed benchmark (``python -m gblr.bench.speed``)."""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["plot_speed", "speed_markdown"]


def plot_speed(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for t in sorted({r["tokens"] for r in rows}):
        sel = [r for r in rows if r["tokens"] == t]
        ax.scatter([r["packed_cost"] for r in sel], [r["speedup_vs_dense"] for r in sel],
                   label=f"packed GBLR, {t} tok")
        ax.scatter([r["lowrank_cost"] for r in sel], [r["lowrank_speedup_vs_dense"] for r in sel],
                   marker="x", label=f"low-rank, {t} tok")
    xs = [0.1, 1.0]
    ax.plot(xs, [1 / x for x in xs], "k--", lw=0.8, label="ideal 1/cost")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_xlabel("MACs computed / dense MACs")
    ax.set_ylabel("speedup vs nn.Linear")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 4)
    ax.legend(fontsize=7)
    ax.set_title("CPU float32, layers at 30% true cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

def speed_markdown(meta: dict, rows: list[dict], e2e: dict | None,
              sweep: list[dict] | None = None) -> str:
    lines = [
        "# Deployment speed (packed GBLR)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Device: {meta['gpu'] or meta['cpu']}, torch {meta['torch']}, threads {meta['threads']}, "
        f"{meta.get('dtype', 'float32')}, medians of {meta['reps']} interleaved repetitions"
        + ("; CUDA-graph replays (GPU work alone)" if meta.get("graphs") else
           "; on CUDA the calls of a repetition are queued, one synchronisation at its end"
           if meta["gpu"] else "") + ".",
        "",
        "GBLR layers: 'synthetic, width shrink' ones are fitted to a dense target (decaying "
        f"spectrum) while widths shrink to {meta['budget']:.0%} of dense cost "
        f"({meta['shrink_steps']} shrink steps); 'projected' ones are real MiniLM-L6 weights "
        "projected by `GBLRLinear.from_dense` (the projection search) at the same budget. "
        "Low-rank: "
        "`LowRankLinear` (truncated SVD) at the largest rank within the same budget. "
        "All three layers add the same bias (`nn.Linear`'s; `LowRankLinear` fuses it into "
        "its second GEMM, the packed layer into a stage-2 GEMM over every output row where "
        "it has one). "
        "Packed: `layer.packed(tokens=(1, 64, 4096), tune=True)` (candidate packings timed "
        "once at packing time on this machine, the fastest kept; packed MACs include band "
        "unions and rank padding).",
        "",
        "| layer | shape | tokens | true cost | packed MACs | GEMMs | dense ms | low-rank ms "
        "| packed ms | packed vs dense | packed / low-rank time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['source']} | {r['in']}->{r['out']} | {r['tokens']} | {r['true_cost']:.3f} | "
            f"{r['packed_cost']:.3f} | {r['gemms']} | {r['time_dense_ms']:.3f} | "
            f"{r['time_lowrank_ms']:.3f} | {r['time_packed_ms']:.3f} | "
            f"{r['speedup_vs_dense']:.2f}x | {r['packed_over_lowrank']:.2f} |"
        )
    if rows:
        lines += [
            "",
            "Fit of the layers (relative Frobenius error): "
            + ", ".join(
                f"{r['source']} {r['in']}->{r['out']}: GBLR {r['fit_error_gblr']:.3f} vs "
                f"truncated SVD "
                f"{r['fit_error_svd']:.3f}"
                for r in rows if r["tokens"] == rows[0]["tokens"]
            )
            + f". Packed vs masked layer: max relative error "
            f"{max(r['packed_max_rel_error'] for r in rows):.1e}.",
        ]
    predicted = [r for r in rows if "pred_packed_ms" in r]
    if predicted:
        lines += [
            "",
            "## Time model: predicted beside measured",
            "",
            "The time model (`gblr.core.timemodel`), calibrated on this machine at these token "
            "counts (`gblr calibrate`), predicts each form from the GEMMs it runs. Ratios "
            "are predicted / measured.",
            "",
            "| layer | shape | tokens | dense ms (pred / meas) | low-rank ms | packed ms "
            "| dense ratio | low-rank ratio | packed ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in predicted:
            cells = [f"{r[f'pred_{n}_ms']:.3f} / {r[f'time_{n}_ms']:.3f}"
                     for n in ("dense", "lowrank", "packed")]
            ratios = [f"{r[f'pred_over_measured_{n}']:.2f}" for n in ("dense", "lowrank", "packed")]
            lines.append(f"| {r['source']} | {r['in']}->{r['out']} | {r['tokens']} | "
                         + " | ".join(cells + ratios) + " |")
    tiled = [r for r in rows if "time_tiled_ms" in r]
    if tiled:
        lines += [
            "",
            f"## Tiled form ({tiled[0]['tiled_backend']})",
            "",
            "`layer.tiled()`: the folded factors cut into 16x64 tiles, the nonzero ones kept, "
            "one block-sparse GEMM per stage (one Triton kernel launch each on CUDA; the "
            "layer's matrix itself where that has fewer nonzero tiles: 'direct'). Timed in "
            "the same interleaved repetitions as the table above.",
            "",
            "| layer | shape | tokens | tiled MACs | direct | tiled ms | tiled vs dense "
            "| tiled / packed time | tiled / low-rank time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in tiled:
            lines.append(
                f"| {r['source']} | {r['in']}->{r['out']} | {r['tokens']} | "
                f"{r['tiled_cost']:.3f} | {'yes' if r['tiled_direct'] else 'no'} | "
                f"{r['time_tiled_ms']:.3f} | {r['tiled_speedup_vs_dense']:.2f}x | "
                f"{r['tiled_over_packed']:.2f} | {r['tiled_over_lowrank']:.2f} |"
            )
    if sweep:
        lines += [
            "",
            f"## Tile sizes ({sweep[0]['backend']})",
            "",
            "`layer.tiled(rank_tile, in_tile, out_tile)` as RxIxO, /M forcing M tokens per "
            "kernel program (else 16 up to 16 tokens, 32 up to 256, 64 above). Time relative "
            "to the packed (grouped) layer, timed side by side; below 1 the tiling is faster.",
            "",
            *_sweep_table(sweep),
        ]
    if e2e is not None:
        lines += [
            "",
            f"## MiniLM-L6 end to end (batch {e2e['batch']} x {e2e['seq']} tokens, "
            f"encoder linears at budget {e2e['budget']})",
            "",
            "| model | ms | speedup vs dense |",
            "|---|---|---|",
            f"| dense | {e2e['time_dense_ms']:.1f} | 1.00x |",
            *([f"| compressed (GBLR, masked) | {e2e['time_compressed_ms']:.1f} | "
               f"{e2e['time_dense_ms'] / e2e['time_compressed_ms']:.2f}x |"]
              if not math.isnan(e2e["time_compressed_ms"]) else []),
            f"| deployed (packed) | {e2e['time_deployed_ms']:.1f} | "
            f"{e2e['speedup_vs_dense']:.2f}x |",
            *([f"| deployed (tiled) | {e2e['time_tiled_ms']:.1f} | "
               f"{e2e['tiled_speedup_vs_dense']:.2f}x |"] if "time_tiled_ms" in e2e else []),
            "",
            f"Deployed vs compressed outputs: cosine {e2e['cosine']:.7f}, lowest per-token "
            f"cosine {e2e['min_token_cosine']:.7f}, max abs diff {e2e['max_abs_diff']:.1e}. "
            f"True cost {e2e['true_cost']:.3f}, packed MACs {e2e['packed_cost']:.3f} of dense "
            f"({e2e['layers']} layers)."
            + (f" Tiled: MACs {e2e['tiled_cost']:.3f} of dense, outputs' cosine to the "
               f"compressed model {e2e['tiled_cosine']:.7f}." if "tiled_cost" in e2e else ""),
        ]
    return "\n".join(lines) + "\n"


def _sweep_table(sweep: list[dict]) -> list[str]:
    """One row per layer and token count, one column per tile configuration."""
    configs = list(dict.fromkeys(r["config"] for r in sweep))
    cases = list(dict.fromkeys((r["source"], r["in"], r["out"], r["tokens"]) for r in sweep))
    ratio = {(r["source"], r["in"], r["out"], r["tokens"], r["config"]): r for r in sweep}
    lines = ["| layer | shape | tokens | packed ms | " + " | ".join(configs) + " |",
             "|---|---|---|---|" + "---|" * len(configs)]
    for case in cases:
        cells = [ratio[(*case, c)] for c in configs]
        best = min(cells, key=lambda r: r["tiled_over_packed"])
        lines.append(
            f"| {case[0]} | {case[1]}->{case[2]} | {case[3]} | "
            f"{cells[0]['time_packed_ms']:.3f} | "
            + " | ".join(
                (f"**{r['tiled_over_packed']:.2f}**" if r is best
                 else f"{r['tiled_over_packed']:.2f}") for r in cells
            ) + " |"
        )
    return lines
