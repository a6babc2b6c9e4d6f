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
    "capture_token_counts",
    "NotReached",
    "shared_input_groups",
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
    """Raised by a hook once it has the layers' inputs: the rest of the forward is skipped."""


def _inputs_of(model: nn.Module, names: list[str], batch: Any) -> dict[str, torch.Tensor]:
    """The inputs of the named layers when ``model`` runs on ``batch`` (stops once all are seen)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            seen.setdefault(name, inputs[0].detach())
            if len(seen) == len(names):
                raise _Captured

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        run_model(model, batch)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"calibration_data never reached layer(s) {missing[:4]}")
    return seen


class NotReached(ValueError):
    """The calibration batches never reached a module they were meant to."""


@torch.no_grad()
def capture_token_counts(model: nn.Module, name: str, data: Any) -> torch.Tensor:
    """How often each token id reaches the embedding ``name`` over the calibration batches:
    ``(num_embeddings,)`` float64 counts. Each forward stops at the embedding. Positions a
    batch's ``attention_mask`` leaves out, and the embedding's ``padding_idx``, are not
    counted. Raises :class:`NotReached` when no batch reaches the embedding."""
    embedding = model.get_submodule(name)
    counts = torch.zeros(embedding.num_embeddings, dtype=torch.float64)
    seen = 0
    mask: torch.Tensor | None = None

    def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
        nonlocal seen
        ids = inputs[0].detach()
        if mask is not None and mask.shape == ids.shape:
            ids = ids[mask.to(ids.device).bool()]
        ids = ids.reshape(-1).to("cpu", torch.long)
        counts.add_(torch.bincount(ids, minlength=counts.numel()).double())
        seen += 1
        raise _Captured

    handle = embedding.register_forward_pre_hook(hook)
    try:
        for batch in _batches(data):
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            try:
                run_model(model, batch)
            except _Captured:
                pass
    finally:
        handle.remove()
    if not seen:
        raise NotReached(f"calibration_data never reached the embedding {name!r}")
    if embedding.padding_idx is not None:
        counts[embedding.padding_idx] = 0.0
    return counts


@torch.no_grad()
def shared_input_groups(model: nn.Module, names: list[str], data: list[Any]) -> list[list[str]]:
    """``names`` in order, consecutive layers that read the very same input tensor grouped
    (e.g. an attention block's query, key and value): compressing one of them does not
    change the others' input, so a group shares one calibration pass."""
    was_training = model.training
    model.eval()
    try:
        inputs = _inputs_of(model, names, data[0])
    finally:
        model.train(was_training)
    groups: list[list[str]] = []
    for name in names:
        x = inputs[name]
        if groups:
            y = inputs[groups[-1][0]]
            if x.data_ptr() == y.data_ptr() and x.shape == y.shape:
                groups[-1].append(name)
                continue
        groups.append([name])
    return groups


@torch.no_grad()
def capture_teacher_moments(
    student: nn.Module, teacher: nn.Module, names: list[str], data: Any
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (C_ss, C_ts)}``: the second moment of the inputs of each named layer in
    ``student`` and their cross moment ``X_t^T X_s / N`` with the same layer's inputs in
    ``teacher``.

    Both models run on the same batches (evaluation mode; each forward stops once it has
    reached every named layer).
    """
    sums: dict[str, list[torch.Tensor]] = {}
    count = 0
    modes = [(m, m.training) for m in (student, teacher)]
    for m, _ in modes:
        m.eval()
    try:
        for batch in _batches(data):
            xs_all = _inputs_of(student, names, batch)
            xt_all = _inputs_of(teacher, names, batch)
            for name in names:
                xs = xs_all[name].reshape(-1, xs_all[name].shape[-1]).double()
                xt = xt_all[name].reshape(-1, xt_all[name].shape[-1]).double().to(xs.device)
                if xs.shape != xt.shape:
                    raise ValueError(
                        f"layer {name!r} sees inputs of shape {tuple(xs.shape)} in the "
                        f"compressed model but {tuple(xt.shape)} in the dense one"
                    )
                if name not in sums:
                    zeros = torch.zeros(xs.shape[1], xs.shape[1], dtype=torch.float64,
                                        device=xs.device)
                    sums[name] = [zeros, zeros.clone()]
                sums[name][0].addmm_(xs.t(), xs)
                sums[name][1].addmm_(xt.t(), xs)
            count += xs.shape[0]
    finally:
        for m, mode in modes:
            m.train(mode)
    if count == 0:
        raise ValueError(f"calibration_data never reached layer(s) {names[:4]}")
    return {n: (c_ss / count, c_ts / count) for n, (c_ss, c_ts) in sums.items()}


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
