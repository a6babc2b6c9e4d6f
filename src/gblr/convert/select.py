"""Which layers of a model a compression config targets.

A pattern is a module name or dotted suffix (``"query"`` matches
``encoder.layer.0.attention.self.query``), a regular expression ``"re:<regex>"`` or a
compiled ``re.Pattern`` matched against the whole name, or a callable
``(name, module) -> bool``. A matched container stands for the replaceable layers inside
it; a matched weight-bearing leaf that cannot be replaced (an embedding, a norm) is an
error, as is a pattern matching nothing. Leaves without weights (dropout) are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from gblr.convert.config import ALL_LINEAR, REGEX_PREFIX, CompressionConfig

__all__ = [
    "layer_kind",
    "matches",
    "select_layers",
    "layer_settings",
    "output_head_names",
]

REPLACEABLE_TYPES = "nn.Linear, transformers Conv1D, nn.Conv2d"


def _hf_conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional
        return None
    return Conv1D


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` (HF GPT-2 style, weight stored ``(in, out)``), ``"conv2d"``
    or None for a module that is not a replaceable layer."""
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _hf_conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output head (``get_output_embeddings()``), left out by all-linear."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def matches(pattern: Any, name: str, module: nn.Module) -> bool:
    """Whether ``pattern`` (name/suffix, ``"re:"`` regex, ``re.Pattern`` or callable) matches."""
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    if isinstance(pattern, str):
        if pattern.startswith(REGEX_PREFIX):
            return re.fullmatch(pattern[len(REGEX_PREFIX):], name) is not None
        return name == pattern or name.endswith("." + pattern)
    if callable(pattern):
        return bool(pattern(name, module))
    raise TypeError(f"a module pattern must be a string, re.Pattern or callable, got {pattern!r}")


def _describe(pattern: Any) -> str:
    if isinstance(pattern, re.Pattern):
        return repr(REGEX_PREFIX + pattern.pattern)
    if isinstance(pattern, str):
        return repr(pattern)
    return getattr(pattern, "__name__", repr(pattern))


def _check_kind(name: str, module: nn.Module) -> str:
    kind = layer_kind(module)
    if kind is None:
        raise ValueError(
            f"layer {name!r} of type {type(module).__name__} cannot be replaced; "
            f"replaceable types: {REPLACEABLE_TYPES}"
        )
    return kind


def _expand(model_modules: dict[str, nn.Module], name: str) -> list[str]:
    """Replaceable layers at or under ``name`` (a matched leaf that is not replaceable raises)."""
    module = model_modules[name]
    if layer_kind(module) is not None:
        _check_kind(name, module)
        return [name]
    if not any(True for _ in module.children()):
        if any(True for _ in module.parameters(recurse=False)):
            _check_kind(name, module)  # a weight-bearing leaf that cannot be replaced
        return []  # a leaf without weights (dropout, activation): nothing to replace
    prefix = f"{name}." if name else ""
    found = []
    for sub, child in model_modules.items():
        if sub.startswith(prefix) and sub != name and layer_kind(child) is not None:
            # only layers not nested inside another replaceable layer
            found.append(sub)
    for sub in found:
        _check_kind(sub, model_modules[sub])
    return found


def _as_list(patterns: Any) -> list[Any]:
    if isinstance(patterns, list | tuple):
        return list(patterns)
    return [patterns]


def select_layers(
    model: nn.Module, target_modules: Any = ALL_LINEAR, exclude_modules: Iterable[Any] = ()
) -> dict[str, str]:
    """Ordered ``{layer name: kind}`` of the layers to replace.

    Raises a ``ValueError`` naming a pattern that matches nothing, a matched layer that
    cannot be replaced, or an empty selection.
    """
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    selected: set[str] = set()
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        heads = output_head_names(model)
        selected = {
            n for n in names if layer_kind(modules[n]) in ("linear", "conv1d") and n not in heads
        }
        if not selected:
            raise ValueError("target_modules='all-linear' found no nn.Linear or Conv1D layer")
    else:
        for pattern in _as_list(target_modules):
            hits = [n for n in names if matches(pattern, n, modules[n])]
            if not hits:
                raise ValueError(
                    f"target pattern {_describe(pattern)} matches no module of the model "
                    f"(module names look like {names[: min(4, len(names))]})"
                )
            layers = [layer for n in hits for layer in _expand(modules, n)]
            if not layers:
                raise ValueError(
                    f"target pattern {_describe(pattern)} matches {hits[:4]} but no "
                    f"replaceable layer ({REPLACEABLE_TYPES}) is among or inside them"
                )
            selected.update(layers)
    for pattern in _as_list(list(exclude_modules)):
        hits = [n for n in names if matches(pattern, n, modules[n])]
        if not hits:
            raise ValueError(f"exclude pattern {_describe(pattern)} matches no module of the model")
        for hit in hits:
            selected = {s for s in selected if s != hit and not s.startswith(hit + ".")}
    if not selected:
        raise ValueError("no layer left to compress after applying exclude_modules")
    # keep only the outermost replaceable layers, in the model's order
    ordered = [n for n in names if n in selected]
    outer = [n for n in ordered if not any(n.startswith(o + ".") for o in ordered if o != n)]
    return {n: layer_kind(modules[n]) for n in outer}


def layer_settings(
    model: nn.Module, config: CompressionConfig, layers: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """Per-layer settings (structure, budget, calibration, projection kwargs) after overrides.

    Every override pattern must match at least one selected layer (or a container of one).
    """
    modules = dict(model.named_modules())
    layers = list(layers)
    per_layer: dict[str, dict[str, Any]] = {n: {} for n in layers}
    for pattern, opts in config.overrides.items():
        hit = False
        for layer in layers:
            owners = [layer] + [layer.rsplit(".", i)[0] for i in range(1, layer.count(".") + 1)]
            if any(matches(pattern, o, modules[o]) for o in owners):
                per_layer[layer].update(opts)
                hit = True
        if not hit:
            raise ValueError(f"override pattern {_describe(pattern)} matches no targeted layer")
    return {
        n: config.layer_settings_from(opts, f"layer {n!r}: " if opts else "")
        for n, opts in per_layer.items()
    }
