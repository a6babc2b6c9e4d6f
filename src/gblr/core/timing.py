"""Side-by-side timing: the functions being compared run in one process, their repetitions
interleaved in a rotating order, and their medians compared, so that a slow spell of a
shared machine touches every contender alike. The benchmarks and ``gblr compress``'s
measured speed-up both time through here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["time_side_by_side", "time_samples", "cuda_graph"]


def time_side_by_side(
    fns: dict[str, Callable[[], object]], reps: int = 7, min_time: float = 0.02,
    device: str = "cpu", graphs: bool = False,
) -> dict[str, float]:
    """Median seconds per call of each function, repetitions interleaved in rotating order
    (:func:`time_samples`, whose arguments these are)."""
    samples = time_samples(fns, reps, min_time, device, graphs)
    return {name: statistics.median(s) for name, s in samples.items()}


def time_samples(
    fns: dict[str, Callable[[], object]], reps: int = 7, min_time: float = 0.02,
    device: str = "cpu", graphs: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call of each function in each of ``reps`` repetitions, interleaved in
    rotating order: sample ``i`` of every function comes from the same repetition, so
    ratios of paired samples show the spread of a comparison on a noisy machine.

    On a CUDA ``device`` the calls of one repetition are queued back to back and the
    device is synchronised once at its end, as a model's layers run: the time is the
    larger of the GPU's work and the host's launch overhead. ``graphs`` (CUDA only)
    captures each function once in a CUDA graph and times its replays instead, which
    leaves the GPU's work alone; a function that cannot be captured gets ``nan`` samples.
    """
    cuda = torch.device(device).type == "cuda"
    if graphs and not cuda:
        raise ValueError("graphs=True needs a CUDA device")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    failed: list[str] = []
    if graphs:
        fns = {n: cuda_graph(f) for n, f in fns.items()}
        failed = [n for n, f in fns.items() if f is None]
        fns = {n: f for n, f in fns.items() if f is not None}
    names = list(fns)
    inner = {}
    for name, fn in fns.items():  # warm up, and pick calls per repetition
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        dt = max(time.perf_counter() - t0, 1e-7)
        inner[name] = max(1, int(min_time / dt))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            fn, n = fns[name], inner[name]
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / n)
    samples.update({name: [float("nan")] * reps for name in failed})
    return samples


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object] | None:
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream), as a
    function that replays it; ``None`` when ``fn`` cannot be captured (a host sync)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as exc:
        print(f"not capturable in a CUDA graph: {str(exc).splitlines()[0]}")
        torch.cuda.synchronize()
        return None
    return graph.replay
