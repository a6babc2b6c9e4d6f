"""Inputs of chosen layers, captured by forward hooks while the model runs on calibration data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["capture_second_moments", "run_model"]


def run_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one batch: a tensor, a dict of keyword tensors or a tuple of tensors."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def _batches(data: Any) -> Iterable[Any]:
    if isinstance(data, torch.Tensor | Mapping):
        return [data]
    if isinstance(data, tuple):
        return [data]
    try:
        return iter(data)
    except TypeError:
        raise TypeError(
            "calibration_data must be a tensor, a dict of tensors (model keyword inputs), "
            f"a tuple of tensors or an iterable of those, got {type(data).__name__}"
        ) from None


@torch.no_grad()
def capture_second_moments(
    model: nn.Module, layers: dict[str, str], data: Any
) -> dict[str, torch.Tensor]:
    """``{name: X^T X / N}`` (float64, ``(in, in)``) of the inputs each named layer sees.

    ``layers`` maps names to kinds (``"linear"`` or ``"conv1d"``). Padding positions are
    included as the model computes them; pass attention-masked batches for text.
    """
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(layers, 0)
    handles = []

    def hook(name: str):
        def fn(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).double()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64,
                                         device=x.device)
            sums[name].addmm_(x.t(), x)
            counts[name] += x.shape[0]

        return fn

    for name, kind in layers.items():
        if kind not in ("linear", "conv1d"):
            raise ValueError(
                f"calibration of layer {name!r} of kind {kind!r} is not supported; "
                "calibration works on linear and Conv1D layers"
            )
        handles.append(modules[name].register_forward_pre_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(data):
            run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [n for n in layers if counts[n] == 0]
    if missing:
        raise ValueError(f"calibration_data never reached layer(s) {missing[:4]}")
    return {n: sums[n] / counts[n] for n in layers}
