"""Optimizer parameter groups that keep GBLR structure parameters apart."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from gblr.layers.gblr import GBLRLinear

__all__ = ["adamw", "gblr_layers", "structure_parameters", "param_groups", "STRUCTURE_GROUP"]

#: Name stored under ``"name"`` in the structure parameter group.
STRUCTURE_GROUP = "structure"


def gblr_layers(model: nn.Module) -> Iterator[tuple[str, GBLRLinear]]:
    """``(qualified name, layer)`` for every :class:`GBLRLinear` in ``model``, in module order.

    Found by type (subclasses included), never by parameter name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, GBLRLinear):
            yield name, module


def structure_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``widths`` and ``locations`` of every GBLR layer of ``model``."""
    params: list[nn.Parameter] = []
    for _, layer in gblr_layers(model):
        params.extend([layer.widths, layer.locations])
    return params


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # biases and normalisation scales (1-D tensors) are not decayed, as usual for AdamW
    return param.dim() <= 1 or name.endswith(".bias")


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    structure_lr: float | None = None,
    structure_betas: tuple[float, float] | None = (0.0, 0.999),
    decay_1d: bool = False,
) -> list[dict]:
    """Parameter groups for any ``torch.optim`` optimizer (AdamW-ready).

    Returns up to three groups, each tagged with a ``"name"``: ``"decay"`` (weights,
    ``weight_decay``), ``"no_decay"`` (biases and 1-D parameters unless ``decay_1d``) and
    ``"structure"`` (every GBLR layer's widths and locations: no weight decay, learning rate
    ``structure_lr`` (default ``lr``) and, when ``structure_betas`` is not None, their own
    Adam ``betas``; pass ``structure_betas=None`` for optimizers without betas, e.g. SGD).
    Empty groups are left out. Code should look groups up by ``"name"``, not by position.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not float(lr) > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if float(weight_decay) < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    s_lr = float(lr) if structure_lr is None else float(structure_lr)
    if not s_lr > 0:
        raise ValueError(f"structure_lr must be positive, got {structure_lr!r}")
    if structure_betas is not None:
        b = tuple(float(x) for x in structure_betas)
        if len(b) != 2 or not all(0.0 <= x < 1.0 for x in b):
            raise ValueError(
                f"structure_betas must be two numbers in [0, 1), got {structure_betas!r}"
            )
        structure_betas = b
    structure_ids = {id(p) for p in structure_parameters(model)}
    decay, no_decay, structure = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in structure_ids:
            structure.append(param)
        elif not decay_1d and _no_decay(name, param):
            no_decay.append(param)
        else:
            decay.append(param)
    groups: list[dict] = []
    if decay:
        groups.append({"name": "decay", "params": decay, "lr": float(lr),
                       "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"name": "no_decay", "params": no_decay, "lr": float(lr),
                       "weight_decay": 0.0})
    if structure:
        group = {"name": STRUCTURE_GROUP, "params": structure, "lr": s_lr, "weight_decay": 0.0}
        if structure_betas is not None:
            group["betas"] = structure_betas
        groups.append(group)
    return groups


def adamw(groups: list[dict], lr: float | None = None) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` on ``groups`` (e.g. :func:`param_groups`), with PyTorch's fused
    kernel where every parameter allows it (floating point, on CPU or CUDA).

    The fused kernel computes the same update. On CPU it is several times faster than the
    default loop, more so for the factors of GBLR layers, whose masked entries keep exact
    zeros in Adam's second moments (``sqrt`` of zero is slow in the default kernel).
    """
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    kwargs = {} if lr is None else {"lr": float(lr)}
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)
