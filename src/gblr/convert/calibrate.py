"""Inputs of chosen layers, captured by forward hooks while the model runs on calibration data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "calibration_batches",
    "capture_second_moments",
    "capture_teacher_moments",
    "teacher_target",
    "run_model",
]


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


def calibration_batches(data: Any) -> list[Any]:
    """The calibration batches as a list (a generator can be read only once)."""
    return list(_batches(data))


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


class _Captured(Exception):
    """Raised by a hook once it has the layer's input: the rest of the forward is skipped."""


def _first_input(model: nn.Module, name: str, batch: Any) -> torch.Tensor:
    """The input of layer ``name`` when ``model`` runs on ``batch``, ``(tokens, in)`` float64."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
        seen.append(inputs[0].detach())
        raise _Captured

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        run_model(model, batch)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"calibration_data never reached layer {name!r}")
    x = seen[0]
    return x.reshape(-1, x.shape[-1]).double()


@torch.no_grad()
def capture_teacher_moments(
    student: nn.Module, teacher: nn.Module, name: str, data: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C_ss, C_ts)``: the second moment of the inputs of layer ``name`` in ``student`` and
    their cross moment ``X_t^T X_s / N`` with the same layer's inputs in ``teacher``.

    Both models run on the same batches (evaluation mode; each forward stops at the layer).
    """
    c_ss: torch.Tensor | None = None
    c_ts: torch.Tensor | None = None
    count = 0
    modes = [(m, m.training) for m in (student, teacher)]
    for m, _ in modes:
        m.eval()
    try:
        for batch in _batches(data):
            xs = _first_input(student, name, batch)
            xt = _first_input(teacher, name, batch).to(xs.device)
            if xs.shape != xt.shape:
                raise ValueError(
                    f"layer {name!r} sees inputs of shape {tuple(xs.shape)} in the compressed "
                    f"model but {tuple(xt.shape)} in the dense one"
                )
            if c_ss is None:
                c_ss = torch.zeros(xs.shape[1], xs.shape[1], dtype=torch.float64,
                                   device=xs.device)
                c_ts = torch.zeros_like(c_ss)
            c_ss.addmm_(xs.t(), xs)
            c_ts.addmm_(xt.t(), xs)
            count += xs.shape[0]
    finally:
        for m, mode in modes:
            m.train(mode)
    if c_ss is None or count == 0:
        raise ValueError(f"calibration_data never reached layer {name!r}")
    return c_ss / count, c_ts / count


def teacher_target(
    weight: torch.Tensor, c_ss: torch.Tensor, c_ts: torch.Tensor, damping: float = 1e-3
) -> torch.Tensor:
    """The matrix whose data-aware projection (with ``C_ss``) fits the teacher's outputs.

    ``||X_s W_hat^T - X_t W^T||^2 = N ||(W_hat - W_eff) C_ss^{1/2}||^2 + const`` with
    ``W_eff = W C_ts C_ss^{-1}``, so projecting ``W_eff`` with second moment ``C_ss`` fits
    the student layer to the teacher layer's outputs. ``C_ss`` is damped by ``damping``
    times its mean diagonal. Returned in ``weight``'s dtype.
    """
    w = weight.detach().double()
    a = c_ss.to(w.device).double()
    a = a + damping * a.diagonal().mean().clamp_min(1e-12) * torch.eye(
        a.shape[0], dtype=a.dtype, device=a.device)
    # W_eff^T = A^{-1} C_ts^T W^T (A symmetric)
    w_eff = torch.linalg.solve(a, c_ts.to(w.device).double().t() @ w.t()).t()
    return w_eff.to(weight.dtype)
