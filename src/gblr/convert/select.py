"""Which layers of a model a compression config targets.

A pattern is a module name or dotted suffix (``"query"`` matches
``encoder.layer.0.attention.self.query``), a regular expression ``"re:<regex>"`` or a
compiled ``re.Pattern`` matched against the whole name, or a callable
``(name, module) -> bool``. A matched container stands for the replaceable layers inside
it; a matched weight-bearing leaf that cannot be replaced (an embedding, a norm) is an
error, as is a pattern matching nothing. Leaves without weights (dropout) are skipped.

A module registered under several names is one layer, named by its first name (patterns
match any of its names). :func:`weight_ties` finds the selected layers whose parameters
share memory: with each other (compressed once, the result shared) or with a module left
dense (an embedding tied to the output head), which cannot be compressed without
breaking the tie.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from gblr.convert.config import ALL_LINEAR, REGEX_PREFIX, CompressionConfig

__all__ = [
    "layer_kind",
    "matches",
    "select_layers",
    "layer_settings",
    "output_head_names",
    "module_paths",
    "weight_ties",
    "same_view",
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


def module_paths(model: nn.Module) -> dict[str, list[str]]:
    """``{first name: every name}`` of each module of ``model`` (a module registered under
    several names, or inside a container that is, has several), in the model's order."""
    first: dict[int, str] = {}
    paths: dict[str, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        canonical = first.setdefault(id(module), name)
        paths.setdefault(canonical, []).append(name)
    return paths


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """``{any name: first name}`` of every module of ``model``."""
    return {alias: name for name, aliases in module_paths(model).items() for alias in aliases}


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
    # every name of every module (a module registered twice has two), each mapped to the
    # module's first name, under which it is selected and reported
    modules = dict(model.named_modules(remove_duplicate=False))
    canonical = _canonical_names(model)
    paths = module_paths(model)
    names = [n for n in modules if n]
    selected: set[str] = set()
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        heads = output_head_names(model)
        selected = {
            canonical[n] for n in names
            if layer_kind(modules[n]) in ("linear", "conv1d") and canonical[n] not in heads
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
            layers = [canonical[layer] for n in hits for layer in _expand(modules, n)]
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
            # excluded under any of its names: dense under all of them
            selected = {s for s in selected
                        if not any(p == hit or p.startswith(hit + ".") for p in paths[s])}
    if not selected:
        raise ValueError("no layer left to compress after applying exclude_modules")
    # keep only the outermost replaceable layers, in the model's order
    ordered = [n for n in paths if n in selected]
    outer = [n for n in ordered if not any(n.startswith(o + ".") for o in ordered if o != n)]
    return {n: layer_kind(modules[n]) for n in outer}


def layer_settings(
    model: nn.Module, config: CompressionConfig, layers: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """Per-layer settings (structure, budget, calibration, projection kwargs) after overrides.

    Every override pattern must match at least one selected layer (or a container of one).
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    paths = module_paths(model)
    layers = list(layers)
    per_layer: dict[str, dict[str, Any]] = {n: {} for n in layers}
    for pattern, opts in config.overrides.items():
        hit = False
        for layer in layers:
            # the layer and its containers, under every name
            owners = [path.rsplit(".", i)[0] for path in paths.get(layer, [layer])
                      for i in range(path.count(".") + 1)]
            if any(matches(pattern, o, modules[o]) for o in owners):
                per_layer[layer].update(opts)
                hit = True
        if not hit:
            raise ValueError(f"override pattern {_describe(pattern)} matches no targeted layer")
    return {
        n: config.layer_settings_from(opts, f"layer {n!r}: " if opts else "")
        for n, opts in per_layer.items()
    }


def _span(tensor: torch.Tensor) -> tuple[Any, int, int] | None:
    """``(where, first byte, end byte)`` of ``tensor``'s memory (None when it holds none:
    empty or on the meta device). Tensors overlap when their spans do."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride(), strict=True))
    start = tensor.data_ptr()
    where = (tensor.device, tensor.untyped_storage().data_ptr())
    return where, start, start + extent * tensor.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    sa, sb = _span(a), _span(b)
    return sa is not None and sb is not None and sa[0] == sb[0] and sa[1] < sb[2] and sb[1] < sa[2]


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same memory (a tied tensor)."""
    return (a.data_ptr(), a.shape, a.stride(), a.dtype) == (b.data_ptr(), b.shape, b.stride(),
                                                             b.dtype)


def _holder(name: str, module: nn.Module) -> str:
    return f"{name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"


def _shared_memory(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Groups of two or more ``(module name, parameter name)`` whose memory overlaps
    (parameters that are views of one flat buffer but do not overlap are not tied)."""
    spans: dict[Any, list[tuple[int, int, tuple[str, str]]]] = {}
    for mname, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            span = _span(param)
            if span is not None:
                spans.setdefault(span[0], []).append((span[1], span[2], (mname, pname)))
    groups = []
    for entries in spans.values():
        entries.sort(key=lambda e: e[:2])
        current: list[tuple[str, str]] = []
        end = -1
        for start, stop, holder in entries:
            if current and start >= end:
                groups.append(current)
                current = []
            current.append(holder)
            end = max(end, stop) if len(current) > 1 else stop
        groups.append(current)
    return [g for g in groups if len(g) > 1]


def weight_ties(
    model: nn.Module, layers: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The ties of the selected ``layers`` (``{name: kind}`` as :func:`select_layers` gives
    them): ``(followers, skipped)``.

    ``followers`` maps a layer to the earlier layer whose weight tensor it holds: compress
    that one once and share the result. ``skipped`` maps each layer that must stay dense to
    the reason: one of its parameters shares memory with a module that is not compressed
    (GPT-2's output head tied to the token embedding, a layer left out), or with another
    selected layer other than as the same weight tensor of the same kind of layer (one
    compressed module cannot keep that tie); a layer tied to a skipped one is skipped too.
    """
    modules = dict(model.named_modules())
    selected = [n for n in modules if n in layers]

    def layer_of(name: str) -> str | None:
        return next((n for n in selected if name == n or name.startswith(n + ".")), None)

    group = {n: n for n in selected}  # union-find of the layers that share memory

    def root(n: str) -> str:
        while group[n] != n:
            n = group[n] = group[group[n]]
        return n

    direct: dict[str, str] = {}  # layers tied to a module that is not compressed
    for holders in _shared_memory(model):
        inside = [(layer_of(m), q) for m, q in holders if layer_of(m) is not None]
        outside = [(m, q) for m, q in holders if layer_of(m) is None]
        for layer, pname in inside:
            group[root(layer)] = root(inside[0][0])
            if outside and layer not in direct:
                m, q = outside[0]
                direct[layer] = (f"its {pname} is tied to the {q} of {_holder(m, modules[m])}, "
                                 "which is not compressed; replacing it would untie them")
    members: dict[str, list[str]] = {}
    for n in selected:
        members.setdefault(root(n), []).append(n)
    followers: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for names in members.values():
        tied_out = [n for n in names if n in direct]
        if tied_out:
            first = tied_out[0]
            skipped.update({n: direct.get(n) or f"it shares memory with {first!r}, which stays "
                            f"dense ({direct[first]})" for n in names})
        elif len(names) > 1:
            bad = _unshareable(modules, layers, names)
            if bad is not None:
                for n in names:
                    partner = names[0] if n == bad else bad
                    skipped[n] = (f"it shares memory with {partner!r} other than as the same "
                                  "weight tensor of the same kind of layer, a tie that one "
                                  "compressed module cannot keep")
            else:
                followers.update({n: names[0] for n in names[1:]})
    return followers, skipped


def _unshareable(
    modules: dict[str, nn.Module], layers: Mapping[str, str], names: list[str]
) -> str | None:
    """The first of ``names[1:]`` that cannot share one compressed module with ``names[0]``
    (None when each holds the leader's very weight tensor in the same kind of layer, and
    any other memory they share is the same parameter as the same view: both biases)."""
    lead = modules[names[0]]
    lead_params = dict(lead.named_parameters())
    for n in names[1:]:
        module = modules[n]
        if layers[n] != layers[names[0]] or not same_view(module.weight, lead.weight):
            return n
        for pname, param in module.named_parameters():
            for qname, other in lead_params.items():
                if _overlap(param, other) and (pname != qname or not same_view(param, other)):
                    return n
    return None
