"""One switch that builds the linear layers the paper replaces: dense, GBLR or a baseline."""

from __future__ import annotations

from typing import Any

from torch import nn

from gblr.core.budget import check_budget
from gblr.core.surgery import replace_modules
from gblr.layers.base import get_structure
from gblr.layers.gblr import GBLRLinear

__all__ = ["LINEAR_KINDS", "PROJECTION_KEYS", "make_linear", "project_linears"]

#: Values of the ``linear`` switch of every model in :mod:`gblr.models`.
LINEAR_KINDS = ("dense", "gblr", "lowrank", "monarch", "blr", "blocksparse")
#: The keys of a ``gblr`` options dict that a projection (``from_dense``) takes; the others
#: (``num_components``, ``rank_fraction``, ``init``, ...) describe a fresh layer only.
PROJECTION_KEYS = ("rank_per_component", "path", "sigma")


def make_linear(
    kind: str,
    in_features: int,
    out_features: int,
    budget: float = 1.0,
    bias: bool = True,
    gblr: dict[str, Any] | None = None,
) -> nn.Module:
    """A ``in -> out`` layer of structure ``kind`` at ``budget`` (fraction of dense cost).

    ``"dense"`` is ``nn.Linear`` (the budget is ignored); ``"gblr"`` is :class:`GBLRLinear`
    built with the keyword arguments in ``gblr`` (``init``, ``num_components``, ...;
    ``budget`` is its ``init_fraction`` unless given, for the ``"lowrank"`` and
    ``"sparse_lowrank"`` inits); the others come from the structure registry,
    ``get_structure(kind)(in, out, budget=budget, bias=bias)``.
    """
    if kind not in LINEAR_KINDS:
        raise ValueError(f"linear must be one of {LINEAR_KINDS}, got {kind!r}")
    if kind == "dense":
        return nn.Linear(in_features, out_features, bias=bias)
    budget = check_budget(budget)
    if kind == "gblr":
        opts = dict(gblr or {})
        opts.setdefault("init_fraction", budget)
        return GBLRLinear(in_features, out_features, bias=bias, **opts)
    return get_structure(kind)(in_features, out_features, budget=budget, bias=bias)


def project_linears(
    model: nn.Module,
    kind: str,
    budget: float,
    names: tuple[str, ...],
    gblr: dict[str, Any] | None = None,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose attribute name is in ``names`` by its
    projection onto structure ``kind`` at ``budget`` (``cls.from_dense``): the fine-tuning start.
    """
    if kind not in LINEAR_KINDS:
        raise ValueError(f"linear must be one of {LINEAR_KINDS}, got {kind!r}")
    if kind == "dense":
        return model
    budget = check_budget(budget)
    cls = get_structure(kind)
    kwargs = {}
    if kind == "gblr":
        kwargs = {k: v for k, v in dict(gblr or {}).items() if k in PROJECTION_KEYS}
    targets = [(name, module) for name, module in model.named_modules()
               if name.rpartition(".")[2] in names and isinstance(module, nn.Linear)]
    if not targets:
        raise ValueError(f"model has no nn.Linear named any of {names} to project")
    replace_modules(model, targets, lambda _, linear: cls.from_linear(linear, budget, **kwargs))
    return model
