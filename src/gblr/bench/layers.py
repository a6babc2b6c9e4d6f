"""Training-step time of GBLRLinear against nn.Linear on CPU, and mask-building time.

For each shape, ``GBLRLinear`` in training mode (``K = min(in, out)`` rank-1
components, ``sigma = 1.0``) and ``nn.Linear`` run forward + backward on the same
input, interleaved repetition by repetition in one process; the medians and their
ratio are reported. Results go to ``results/layers/{results.md,results.json}``.

    python -m gblr.bench.layers            # 768->3072 and 3072->768, 4096 tokens
    python -m gblr.bench.layers --quick    # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from gblr.core.progress import progress as show_progress
from gblr.layers.gblr import GBLRLinear

FULL_SHAPES = [(768, 3072), (3072, 768)]
QUICK_SHAPES = [(32, 64), (64, 32)]
TARGET_RATIO = 1.5


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device | None = None) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _train_step(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad_out)

    return step


def _build_masks(layers: list[GBLRLinear]) -> Callable[[], None]:
    def build() -> None:
        with torch.no_grad():
            for layer in layers:
                layer.masks()

    return build


def run(
    shapes: list[tuple[int, int]],
    tokens: int,
    reps: int,
    warmup: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict:
    """Measure every shape; return a JSON-ready dict of medians (seconds) and ratios."""
    device = torch.device(device)
    torch.manual_seed(seed)
    rows = []
    gblr_layers: list[GBLRLinear] = []
    for n_in, n_out in shapes:
        gblr = GBLRLinear(n_in, n_out, num_components=min(n_in, n_out), sigma=1.0)
        gblr = gblr.to(device).train()
        dense = nn.Linear(n_in, n_out).to(device).train()
        gblr_layers.append(gblr)
        x = torch.randn(tokens, n_in, device=device, requires_grad=True)
        grad_out = torch.randn(tokens, n_out, device=device)
        steps = {"gblr": _train_step(gblr, x, grad_out), "dense": _train_step(dense, x, grad_out)}
        for _ in range(warmup):
            for step in steps.values():
                step()
        times: dict[str, list[float]] = {"gblr": [], "dense": []}
        order = ["dense", "gblr"]
        for _ in show_progress(range(reps), desc=f"{n_in}->{n_out}", unit="rep", leave=False):
            for name in order:
                times[name].append(_timed(steps[name], device))
            order.reverse()  # alternate which layer runs first
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append(
            {
                "in_features": n_in,
                "out_features": n_out,
                "tokens": tokens,
                "path": gblr._choose_path(tokens),
                "dense_s": med["dense"],
                "gblr_s": med["gblr"],
                "ratio": med["gblr"] / med["dense"],
                "dense_all_s": times["dense"],
                "gblr_all_s": times["gblr"],
            }
        )
    masks = {}
    for sigma in (1.0, None):
        for layer in gblr_layers:
            layer.sigma = sigma
        build = _build_masks(gblr_layers)
        build()
        masks["sigma=1.0" if sigma else "sigma=None"] = statistics.median(
            _timed(build, device) for _ in range(max(3, reps))
        )
    return {"rows": rows, "mask_build_s": masks}


def _markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# GBLRLinear training step vs nn.Linear ({meta['device']})",
        "",
        f"Command: `{meta['command']}`. {meta['threads']} threads, torch {meta['torch']}, "
        f"{meta['reps']} interleaved repetitions (medians), {meta['processor']}; "
        f"load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end.",
        "GBLR: training mode, K = min(in, out) rank-1 components, sigma = 1.0.",
        "",
        "| shape | tokens | GBLR path | nn.Linear fwd+bwd (ms) | GBLR fwd+bwd (ms) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['in_features']}->{r['out_features']} | {r['tokens']} | {r['path']} | "
            f"{1e3 * r['dense_s']:.1f} | {1e3 * r['gblr_s']:.1f} | {r['ratio']:.2f}x |"
        )
    lines += [
        "",
        f"Target: GBLR training step <= {TARGET_RATIO}x dense: "
        + ("met." if result["target_met"] else "not met."),
        "",
        "Time to build all masks (forward, both layers):",
        "",
    ]
    for key, value in result["mask_build_s"].items():
        lines.append(f"- {key}: {1e3 * value:.1f} ms")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gblr.bench.layers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (4096)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (15)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--out", type=Path, default=Path("results/layers"), help="output folder")
    parser.add_argument("--device", default="cpu", help="device to measure on (cpu)")
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)
    if args.threads <= 0:
        parser.error("--threads must be positive")
    torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    tokens = args.tokens or (64 if args.quick else 4096)
    reps = args.reps or (3 if args.quick else 15)
    if tokens <= 0 or reps <= 0:
        parser.error("--tokens and --reps must be positive")
    load_start = os.getloadavg()[0]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    result = run(shapes, tokens, reps, warmup=1 if args.quick else 2, device=device)
    result["target_met"] = all(r["ratio"] <= TARGET_RATIO for r in result["rows"])
    result["meta"] = {
        "command": " ".join(["python -m gblr.bench.layers", *given]),
        "threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
        "reps": reps,
        "loadavg_start": round(load_start, 2),
        "loadavg_end": round(os.getloadavg()[0], 2),
    }
    table = _markdown(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
