"""Module surgery: the one way gblr finds and replaces submodules.

Replacement goes create -> replace: every new module is built first and the model is
changed only when all of them exist, so a failure part-way leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

__all__ = ["set_submodule", "replace_modules", "tie_tensor"]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` of ``model``; return the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def replace_modules(
    model: nn.Module,
    targets: Iterable[tuple[str, nn.Module]],
    create: Callable[[str, nn.Module], nn.Module],
) -> dict[str, nn.Module]:
    """Replace each ``(name, module)`` of ``targets`` by ``create(name, module)``.

    All replacements are created before the first is put in place (an exception from
    ``create`` leaves ``model`` untouched). Returns ``{name: new module}`` in order.
    """
    created = {name: create(name, module) for name, module in targets}
    for name, new in created.items():
        set_submodule(model, name, new)
    return created


def tie_tensor(model: nn.Module, name: str, tensor) -> bool:
    """Make the parameter or buffer at the dotted path ``name`` the very object ``tensor``
    (a tie: both names then hold one tensor). Returns False when ``name`` is neither."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = tensor
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        return False
    return True
