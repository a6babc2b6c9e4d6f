"""Tuning a packing by measurement: time candidate packings on the device, keep the fastest."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from gblr.deploy.executor import _Plan

__all__ = ["TUNE_VARIANTS", "TUNE_REPS"]

#: Candidate packings timed by ``from_gblr(tune=True)``: ``(split, merge, overhead factor,
#: io factor, dense)`` (see :func:`_stage_groups`, :func:`_build_plan`): the model's choice,
#: with the per-GEMM overhead halved, doubled and quadrupled (the best factor varies by ~2x
#: between layers and token counts), with the activation cost halved or quartered (measured
#: up to 8% faster on some layers at 64 tokens), one group per stage segmented, unsegmented
#: groups, and the layer as one dense GEMM (so a tuned packing is not slower than dense).
TUNE_VARIANTS: tuple[tuple[bool, float | None | str, float, float, bool | None], ...] = (
    (True, "best", 1.0, 1.0, False),
    (True, "best", 0.5, 1.0, False),
    (True, "best", 2.0, 1.0, False),
    (True, "best", 4.0, 1.0, False),
    (True, "best", 1.0, 0.5, False),
    (True, "best", 2.0, 0.5, False),
    (True, "best", 1.0, 0.25, False),
    (True, None, 1.0, 1.0, False),
    (False, 1.0, 1.0, 1.0, False),
    (False, 1.0, 4.0, 1.0, False),
    (True, "best", 1.0, 1.0, True),
)
#: Timed repetitions per candidate when tuning (interleaved; the best one is compared).
TUNE_REPS = 7

@torch.no_grad()
def _fastest(
    plans: Sequence[_Plan], tokens: int, in_features: int, dtype: torch.dtype,
    device: torch.device, reps: int = TUNE_REPS,
) -> _Plan:
    """The plan with the lowest time on random ``(tokens, in_features)`` inputs.

    Repetitions are interleaved across the plans in a rotating order, and each plan's best
    repetition is compared: on a shared machine a slow spell only ever adds time, and the
    minimum picked the faster of two plans more reliably than the median (candidates are
    often within 5-10% of each other).
    """
    x = torch.randn(tokens, in_features, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    calls = []
    for p in plans:  # warm up, and pick calls per sample: ~10 ms of work
        p(x, None)
        sync()
        t0 = time.perf_counter()
        p(x, None)
        sync()
        calls.append(max(1, min(1000, int(0.01 / max(time.perf_counter() - t0, 1e-6)))))
    n = min(calls)  # the same count for every plan
    times: list[list[float]] = [[] for _ in plans]
    order = list(range(len(plans)))
    for rep in range(reps):
        for i in order[rep % len(order):] + order[: rep % len(order)]:
            p = plans[i]
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                p(x, None)
            sync()
            times[i].append(time.perf_counter() - t0)
    best = [min(t) for t in times]
    return plans[int(np.argmin(best))]
