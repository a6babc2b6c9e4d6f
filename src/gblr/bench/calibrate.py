"""``gblr calibrate``: measure this device's GEMM times and cache the fitted time model.

The time model (:mod:`gblr.core.timemodel`) predicts the deployed time of structured layers
from the GEMMs they run. A calibration takes a few seconds on a CPU; it is kept per device,
threads, dtype and torch version, and loaded with ``gblr.core.timemodel.load_calibration``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from gblr.core.timemodel import CALIBRATION_TOKENS, cache_dir, calibrate

__all__ = ["main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gblr calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads to calibrate for (default: torch's current setting)")
    p.add_argument("--tokens", type=int, nargs="+", default=list(CALIBRATION_TOKENS),
                   help="token counts to measure (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per shape (best kept)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.reps < 1 or any(t < 1 for t in args.tokens):
        parser.error("--reps and --tokens must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    times = calibrate(args.device, DTYPES[args.dtype], args.threads, tuple(args.tokens),
                      reps=args.reps, progress=True)
    print(f"calibration {times.key}: {times.seconds_per_mac * 1e12:.2f} ps per MAC")
    print(f"{'tokens':>7} {'memory tokens':>14} {'overhead (MACs)':>16} {'io':>8}")
    for t, m in sorted(times.regimes.items()):
        print(f"{t:>7} {m.memory_tokens:>14.1f} {m.overhead:>16.0f} {m.io:>8.2f}")
    print(f"saved in {cache_dir() / (times.key + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
