"""The measured speed-up of a compressed model: dense and deployed, side by side.

A compressed model is cheaper in MACs; what a user pays for is time. :func:`measured_speedup`
deploys a copy of the compressed model (``gblr.deploy``: packed GBLR layers) and times it
against the dense model on the same inputs, in one process, repetitions interleaved
(:func:`gblr.core.timing.time_side_by_side`), for each input setting, on a stated number of
CPU threads. ``gblr compress`` reports it beside the fidelity.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from gblr.core.timing import time_side_by_side
from gblr.deploy import deploy

__all__ = ["measured_speedup", "text_inputs", "token_settings"]


def text_inputs(batch: int, length: int, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ``batch x length`` batch of random token ids (and a full attention mask): a model's
    time does not depend on which tokens it reads."""
    if batch < 1 or length < 1 or vocab_size < 1:
        raise ValueError(f"batch, length and vocab_size must be positive, got "
                         f"{batch}, {length}, {vocab_size}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def token_settings(vocab_size: int, length: int = 128,
                   batches: tuple[int, ...] = (1, 32)) -> dict[str, dict[str, torch.Tensor]]:
    """Random-token inputs per batch size, labelled ``"{batch}x{length}"`` (such as
    ``"32x128"``): the settings :func:`measured_speedup` times a text model on."""
    return {f"{b}x{length}": text_inputs(b, length, vocab_size) for b in batches}


def measured_speedup(
    dense: nn.Module, compressed: nn.Module, settings: Mapping[str, Mapping[str, torch.Tensor]],
    threads: int = 1, reps: int = 7, min_time: float = 0.05,
) -> dict:
    """Median forward time of ``dense`` and of ``compressed`` deployed, per input setting.

    Args:
        dense: the original model (evaluation mode is set on it).
        compressed: the compressed model; it is left as it is (a copy is deployed).
        settings: a label (such as ``"32x128"``) -> keyword inputs of one forward call.
        threads: torch CPU threads while timing (restored afterwards).
        reps: interleaved repetitions per model; ``min_time`` seconds of calls in each.

    Returns:
        ``{"threads": t, "rows": [{"setting", "dense_ms", "deployed_ms", "speedup"}, ...],
        "deployed_layers": n}``; ``speedup`` is dense time / deployed time.

    Example:
        >>> result = measured_speedup(dense, compressed, {"8x128": text_inputs(8, 128, 30522)})
        >>> result["rows"][0]["speedup"]   # doctest: +SKIP
    """
    if not settings:
        raise ValueError("settings must name at least one input setting")
    if threads < 1 or reps < 1:
        raise ValueError(f"threads and reps must be positive, got {threads} and {reps}")
    deployed = copy.deepcopy(compressed).eval()
    tokens = sorted({int(next(iter(v.values())).shape[:2].numel()) for v in settings.values()})
    report = deploy(deployed, tokens=tokens)
    dense = dense.eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        with torch.inference_mode():
            for label, inputs in settings.items():
                calls = {"dense": lambda i=inputs: dense(**i),
                         "deployed": lambda i=inputs: deployed(**i)}
                times = time_side_by_side(calls, reps=reps, min_time=min_time)
                rows.append({"setting": label, "dense_ms": times["dense"] * 1e3,
                             "deployed_ms": times["deployed"] * 1e3,
                             "speedup": times["dense"] / times["deployed"]})
    finally:
        torch.set_num_threads(before)
    return {"threads": threads, "rows": rows, "deployed_layers": len(report.layers)}
