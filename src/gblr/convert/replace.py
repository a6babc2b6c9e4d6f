"""``gblr.compress``: replace a model's targeted layers in place by projected structured layers."""

from __future__ import annotations

import copy
import inspect
import re
import time
import warnings
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn

from gblr.accounting import flops_report
from gblr.convert.calibrate import (
    NotReached,
    calibration_batches,
    capture_second_moments,
    capture_teacher_moments,
    capture_token_counts,
    shared_input_groups,
    teacher_target,
)
from gblr.convert.config import REGEX_PREFIX, CompressionConfig
from gblr.convert.embeddings import EMBEDDING_KIND, input_embedding, project_embedding
from gblr.convert.fingerprint import architecture_fingerprint
from gblr.convert.report import CompressionReport, LayerRecord
from gblr.convert.select import (
    layer_settings,
    module_paths,
    same_view,
    select_layers,
    weight_ties,
)
from gblr.convert.sensitivity import sensitivity_budgets
from gblr.core.progress import progress as show_progress
from gblr.core.surgery import set_submodule, tie_tensor
from gblr.layers.base import StructuredLinear, get_structure
from gblr.layers.conv import GBLRConv2d
from gblr.layers.embedding import LowRankEmbedding
from gblr.projection import Calibration, allocate

__all__ = ["compress", "CompressionResult", "dense_weight", "COMPRESSION_ATTR"]

#: Attribute of a compressed model holding what ``save_compressed`` needs to record.
COMPRESSION_ATTR = "gblr_compression"


class CompressionResult(NamedTuple):
    """The compressed model (the same object, changed in place) and its report."""

    model: nn.Module
    report: CompressionReport


def dense_weight(module: nn.Module, kind: str) -> torch.Tensor:
    """The layer's ``(out, in)`` weight (HF ``Conv1D`` stores ``(in, out)``: transposed here)."""
    if kind == "linear":
        return module.weight
    if kind == "conv1d":
        return module.weight.t()
    raise ValueError(f"no dense (out, in) weight for a layer of kind {kind!r}")


def _global_budgets(
    weights: dict[str, torch.Tensor], settings: dict[str, dict[str, Any]], budget: float,
    moments: dict[str, torch.Tensor], progress: bool,
) -> dict[str, float]:
    structures = {settings[n]["structure"] for n in weights}
    if len(structures) != 1:
        raise ValueError(
            f"allocation='global' needs one structure for all layers, got {sorted(structures)}"
        )
    kwargs: dict[str, Any] = {"structure": structures.pop(), "progress": progress}
    if moments:
        kwargs["calibration"] = {n: Calibration.from_second_moment(moments[n])
                                 for n in weights if n in moments}
    return dict(allocate(weights, budget, **kwargs))


def _project_conv(name: str, conv: nn.Conv2d, setting: dict[str, Any], budget: float) -> nn.Module:
    """``nn.Conv2d`` -> ``gblr.GBLRConv2d`` (one GBLR matrix over ``out x (in*kh*kw)``)."""
    if setting["structure"] != "gblr":
        raise ValueError(
            f"layer {name!r} is an nn.Conv2d, which only structure 'gblr' (gblr.GBLRConv2d) "
            f"can replace, not {setting['structure']!r}; exclude it or override its structure"
        )
    try:
        return GBLRConv2d.from_conv(conv, budget, **setting["kwargs"])
    except (TypeError, ValueError) as err:
        raise type(err)(f"projecting conv layer {name!r}: {err}") from err


def _project(
    name: str, weight: torch.Tensor, bias: torch.Tensor | None, setting: dict[str, Any],
    budget: float, moment: torch.Tensor | None,
) -> StructuredLinear:
    cls = get_structure(setting["structure"])
    kwargs = dict(setting["kwargs"])
    if moment is not None:
        # the activations' second moment C = X^T X / N, under the name from_dense takes it
        takes = inspect.signature(cls.from_dense).parameters
        key = "second_moment" if "second_moment" in takes else "calibration"
        kwargs[key] = moment.to(torch.float32)
    try:
        return cls.from_dense(weight, budget, bias=bias, **kwargs)
    except (TypeError, ValueError) as err:
        raise type(err)(f"projecting layer {name!r} onto {setting['structure']!r}: {err}") from err


def _project_layer(
    name: str, module: nn.Module, kind: str, setting: dict[str, Any], budget: float,
    moment: torch.Tensor | None,
) -> nn.Module:
    """The structured replacement of one layer of ``kind`` at ``budget`` (from its own weight)."""
    if kind == "conv2d":
        return _project_conv(name, module, setting, budget)
    weight = dense_weight(module, kind).detach().to(torch.float32)
    bias = None if module.bias is None else module.bias.detach().to(torch.float32)
    return _project(name, weight, bias, setting, budget, moment)


def _tied_copy(
    shared: nn.Module, old: nn.Module, old_leader: nn.Module, like: torch.Tensor
) -> nn.Module:
    """The compressed module of a layer that held the weight of ``old_leader``: a copy of
    ``shared`` (``old_leader``'s compressed module) holding its very parameters and buffers,
    so the tie is kept, with ``old``'s own bias (shared too where the biases were)."""
    new = copy.deepcopy(shared)
    tensors = [*shared.named_parameters(remove_duplicate=False),
               *shared.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        if name == "bias":
            continue
        tie_tensor(new, name, tensor)
    bias, lead_bias = getattr(old, "bias", None), getattr(old_leader, "bias", None)
    if bias is None:
        new.bias = None
    elif lead_bias is not None and same_view(bias, lead_bias):
        new.bias = shared.bias
    else:
        new.bias = nn.Parameter(bias.detach().to(device=like.device, dtype=like.dtype).clone(),
                                requires_grad=bias.requires_grad)
    return new


def _check_tied_settings(settings: dict[str, dict[str, Any]], followers: dict[str, str]) -> None:
    """Layers holding one weight are compressed once: their settings (but the budget, of
    which the smallest is taken) must agree."""
    for follower, leader in followers.items():
        a, b = settings[leader], settings[follower]
        differ = [k for k in ("structure", "calibration", "kwargs") if a[k] != b[k]]
        if differ:
            what = ", ".join(f"{k} {a[k]!r} vs {b[k]!r}" for k in differ)
            raise ValueError(
                f"layers {leader!r} and {follower!r} share one weight tensor, which is "
                f"compressed once, but their settings differ ({what}); give them the same "
                "settings, or exclude both"
            )


def _recordable_config(config: CompressionConfig, layers: dict[str, str]) -> dict[str, Any]:
    """``config.to_dict()``; callable patterns are replaced by a regex of the resolved names."""
    try:
        return config.to_dict()
    except TypeError:
        exact = "|".join(re.escape(n) for n in layers)
        return replace(config, target_modules=f"{REGEX_PREFIX}(?:{exact})",
                       exclude_modules=[]).to_dict()


def compress(
    model: nn.Module,
    config: CompressionConfig | dict[str, Any],
    calibration_data: Any = None,
    progress: bool = True,
) -> CompressionResult:
    """Replace the layers ``config`` targets by structured layers projected within the budget.

    The model is changed in place and returned with a :class:`CompressionReport` (its
    ``flops`` attribute holds ``gblr.flops_report`` of the whole compressed model). With
    ``calibration_data`` (a tensor, a dict of model keyword inputs, or an iterable of
    batches) and ``config.calibration``, layer inputs are captured by forward hooks and the
    projection is data-aware (``config.calibration_mode="sequential"``: layer by layer,
    fitted to the dense model's outputs from the partly compressed model's inputs). The
    replaced layers keep the original's device, dtype and train/eval mode.
    """
    if isinstance(config, dict):
        config = CompressionConfig.from_dict(config)
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a CompressionConfig or dict, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config.validate()
    if any(isinstance(m, StructuredLinear | LowRankEmbedding) for m in model.modules()):
        raise ValueError("model already holds structured layers; compress the dense model")
    fingerprint = architecture_fingerprint(model)
    layers = select_layers(model, config.target_modules, config.exclude_modules)
    settings = layer_settings(model, config, layers)
    # a tie is never broken: layers holding one weight share one compressed module, and a
    # layer tied to a module that stays dense (GPT-2's head, tied to the embedding) is
    # left dense too, with a warning and an entry in the report
    followers, skipped = weight_ties(model, layers)
    if skipped:
        kept = {n: k for n, k in layers.items() if n not in skipped}
        if not kept:
            raise ValueError("no layer left to compress: " + "; ".join(
                f"layer {n!r} must stay dense: {why}" for n, why in skipped.items()))
        for name, why in skipped.items():
            warnings.warn(f"gblr.compress leaves layer {name!r} dense: {why}", UserWarning,
                          stacklevel=2)
        layers = kept
        settings = {n: settings[n] for n in layers}
    _check_tied_settings(settings, followers)
    wants_data = [n for n, s in settings.items() if s["calibration"]]
    if wants_data and calibration_data is None:
        raise ValueError(
            f"calibration=True (layers {wants_data[:3]}...) needs calibration_data"
            if len(wants_data) > 3
            else f"calibration=True (layers {wants_data}) needs calibration_data"
        )
    by_sensitivity = config.allocation == "sensitivity"
    if by_sensitivity and calibration_data is None:
        raise ValueError(
            "allocation='sensitivity' measures the model's output on calibration_data: "
            "pass some batches, or use allocation='uniform' or 'global'"
        )
    if calibration_data is not None and not wants_data and not by_sensitivity:
        raise ValueError(
            "calibration_data was given but config.calibration is False: set calibration=True "
            "for a data-aware projection, or drop calibration_data"
        )
    moments: dict[str, torch.Tensor] = {}
    sequential = bool(wants_data) and config.calibration_mode == "sequential"
    teacher = None
    pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    input_groups: dict[str, list[str]] = {}
    if sequential:
        # a calibration pass per group of layers with one input: keep the batches and the
        # dense model
        calibration_data = calibration_batches(calibration_data)
        if not calibration_data:
            raise ValueError("calibration_data holds no batch")
        convs = [n for n in wants_data if layers[n] not in ("linear", "conv1d")]
        if convs:
            raise ValueError(
                f"calibration of layer(s) {convs[:3]} of kind {layers[convs[0]]!r} is not "
                "supported; calibration works on linear and Conv1D layers"
            )
        teacher = copy.deepcopy(model)
        # a layer sharing an earlier one's weight is not projected: no calibration pass
        calibrated = [n for n in layers if n in wants_data and n not in followers]
        input_groups = {g[0]: g for g in shared_input_groups(model, calibrated,
                                                             calibration_data)}
    elif wants_data or by_sensitivity:
        calibration_data = calibration_batches(calibration_data)
        if not calibration_data:
            raise ValueError("calibration_data holds no batch")
        if wants_data:
            moments = capture_second_moments(model, {n: layers[n] for n in wants_data},
                                             calibration_data)
    modules = dict(model.named_modules())
    budgets = {n: s["budget"] for n, s in settings.items()}
    if config.allocation == "global":
        free = [n for n, s in settings.items() if not s["budget_overridden"]]
        weights = {n: dense_weight(modules[n], layers[n]).detach().float() for n in free}
        budgets.update(_global_budgets(weights, settings, config.budget, moments, progress))
    elif by_sensitivity:
        free = [n for n, s in settings.items() if not s["budget_overridden"]]

        def project_alone(name: str, budget: float) -> nn.Module:
            return _project_layer(name, modules[name], layers[name], settings[name], budget,
                                  moments.get(name))

        # dense MACs per token (per output position of a convolution)
        sizes = {n: int(modules[n].weight.numel()) for n in free}
        budgets.update(sensitivity_budgets(model, free, sizes, project_alone,
                                           calibration_data, config.budget, progress=progress))
    # layers holding one weight: compressed once, at the smallest of their budgets (so the
    # total stays within the budget), from the mean of their inputs' second moments
    groups: dict[str, list[str]] = {}
    for follower, first in followers.items():
        groups.setdefault(first, [first]).append(follower)
    for first, group in groups.items():
        budgets.update(dict.fromkeys(group, min(budgets[n] for n in group)))
        got = [moments[n] for n in group if n in moments]
        if len(got) > 1:
            moments[first] = torch.stack(got).mean(dim=0)

    report = CompressionReport(budget=config.budget)
    report.skipped = dict(skipped)
    # the token embedding: chosen, and its tokens counted, on the dense model before any
    # layer is projected (a problem shows before the long part, not after it)
    embedding_budget = (config.budget if config.embedding_budget is None
                        else config.embedding_budget)
    embedding = (_embedding_plan(model, config.calibration, calibration_data, embedding_budget,
                                 report) if config.embeddings else None)
    paths = module_paths(model)
    replaced: list[tuple[str, nn.Module]] = []  # (name, the module it held), in order
    kinds = dict(layers)
    try:
        _replace_layers(model, layers, modules, settings, budgets, moments, followers, paths,
                        input_groups, pending, teacher, calibration_data, report, replaced,
                        progress)
        if embedding is not None:
            name, counts = embedding
            new, record = project_embedding(name, modules[name], embedding_budget, counts)
            report.embeddings.append(record)
            for path in paths.get(name, [name]):
                replaced.append((path, set_submodule(model, path, new)))
            kinds[name] = EMBEDDING_KIND
    except BaseException:
        # nothing half done: put every replaced module back
        for path, previous in reversed(replaced):
            set_submodule(model, path, previous)
        raise
    report.flops = flops_report(model)
    setattr(model, COMPRESSION_ATTR, {
        "config": _recordable_config(config, layers),
        "fingerprint": fingerprint,
        "layers": kinds,
    })
    return CompressionResult(model, report)


def _embedding_plan(
    model: nn.Module, calibrate: bool, calibration_data: Any, budget: float,
    report: CompressionReport,
) -> tuple[str, torch.Tensor | None] | None:
    """``(name, token counts or None)`` of the input embedding to factorize, or None when
    the model has none or it stays dense (then with its reason in ``report.skipped``)."""
    name, why_not = input_embedding(model, budget)
    if name is None:
        return None
    if why_not is None and calibrate and calibration_data is not None:
        try:
            return name, capture_token_counts(model, name, calibration_data)
        except NotReached:
            why_not = ("the calibration batches never reach it (inputs_embeds?), so neither "
                       "would the model's inputs")
    if why_not is not None:
        report.skipped[name] = why_not
        return None
    return name, None


def _replace_layers(
    model: nn.Module, layers: dict[str, str], modules: dict[str, nn.Module],
    settings: dict[str, dict[str, Any]], budgets: dict[str, float],
    moments: dict[str, torch.Tensor], followers: dict[str, str], paths: dict[str, list[str]],
    input_groups: dict[str, list[str]],
    pending: dict[str, tuple[torch.Tensor, torch.Tensor]],
    teacher: nn.Module | None, calibration_data: Any, report: CompressionReport,
    replaced: list[tuple[str, nn.Module]], progress: bool,
) -> None:
    """Project each layer in order and put it in place under all its names (recorded in
    ``replaced``, so that the caller can undo them), with a record in ``report``."""
    created: dict[str, nn.Module] = {}
    bar = show_progress(layers.items(), total=len(layers), desc="project", unit="layer",
                        disable=not progress)
    for name, kind in bar:
        bar.set_postfix_str(name[-40:])
        old = modules[name]
        setting = settings[name]
        start = time.perf_counter()
        shared_with = followers.get(name)
        if shared_with is not None:
            # the weight of an earlier layer: share its compressed module's tensors
            w_param = old.weight if kind == "conv2d" else dense_weight(old, kind)
            weight = w_param.detach().to(torch.float32).reshape(w_param.shape[0], -1)
            new = _tied_copy(created[shared_with], old, modules[shared_with], w_param)
        elif kind == "conv2d":
            w_param = old.weight
            weight = w_param.detach().to(torch.float32).reshape(w_param.shape[0], -1)
            new = _project_conv(name, old, setting, budgets[name])
        else:
            w_param = dense_weight(old, kind)
            weight = w_param.detach().to(torch.float32)
            bias = None if old.bias is None else old.bias.detach().to(torch.float32)
            target, moment = weight, moments.get(name)
            if name in input_groups:
                pending.update(capture_teacher_moments(model, teacher, input_groups[name],
                                                       calibration_data))
            if name in pending:
                moment, cross = pending.pop(name)
                target = teacher_target(weight, moment, cross)
            new = _project(name, target, bias, setting, budgets[name], moment)
        seconds = time.perf_counter() - start
        if shared_with is None:
            new = new.to(device=w_param.device, dtype=w_param.dtype)
        new.train(old.training)
        with torch.no_grad():
            was = new.training
            new.eval()
            approx = new.to_dense().float().reshape(weight.shape)
            new.train(was)
            rel = float(torch.linalg.norm(approx - weight) / torch.linalg.norm(weight).clamp_min(
                torch.finfo(torch.float32).tiny))
        out_f, in_f = weight.shape
        # parameters held with the layer it shares a weight with count there only
        counted_new = set() if shared_with is None else {
            id(p) for p in created[shared_with].parameters()}
        counted_old = set() if shared_with is None else {
            id(p) for p in modules[shared_with].parameters()}
        report.layers.append(
            LayerRecord(
                name=name, kind=kind, in_features=in_f, out_features=out_f,
                structure=setting["structure"], budget=budgets[name],
                dense_cost=in_f * out_f, cost=int(new.macs()),
                params=sum(p.numel() for p in new.parameters() if id(p) not in counted_new),
                dense_params=sum(p.numel() for p in old.parameters()
                                 if id(p) not in counted_old),
                rel_error=rel, seconds=seconds,
            )
        )
        created[name] = new
        for path in paths.get(name, [name]):  # every name the layer is registered under
            replaced.append((path, set_submodule(model, path, new)))
