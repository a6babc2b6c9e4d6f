"""``gblr.compress``: replace a model's targeted layers in place by projected structured layers."""

from __future__ import annotations

import copy
import inspect
import re
import time
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from gblr.accounting import flops_report
from gblr.convert.calibrate import (
    calibration_batches,
    capture_second_moments,
    capture_teacher_moments,
    shared_input_groups,
    teacher_target,
)
from gblr.convert.config import REGEX_PREFIX, CompressionConfig
from gblr.convert.fingerprint import architecture_fingerprint
from gblr.convert.report import CompressionReport, LayerRecord
from gblr.convert.select import layer_settings, select_layers
from gblr.convert.sensitivity import sensitivity_budgets
from gblr.core.surgery import set_submodule
from gblr.layers.base import StructuredLinear, get_structure
from gblr.layers.conv import GBLRConv2d
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
    if any(isinstance(m, StructuredLinear) for m in model.modules()):
        raise ValueError("model already holds structured layers; compress the dense model")
    fingerprint = architecture_fingerprint(model)
    layers = select_layers(model, config.target_modules, config.exclude_modules)
    settings = layer_settings(model, config, layers)
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
    leader: dict[str, list[str]] = {}
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
        calibrated = [n for n in layers if n in wants_data]
        leader = {g[0]: g for g in shared_input_groups(model, calibrated, calibration_data)}
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

    report = CompressionReport(budget=config.budget)
    bar = tqdm(layers.items(), desc="project", unit="layer", disable=not progress)
    for name, kind in bar:
        bar.set_postfix_str(name[-40:])
        old = modules[name]
        setting = settings[name]
        start = time.perf_counter()
        if kind == "conv2d":
            w_param = old.weight
            weight = w_param.detach().to(torch.float32).reshape(w_param.shape[0], -1)
            new = _project_conv(name, old, setting, budgets[name])
        else:
            w_param = dense_weight(old, kind)
            weight = w_param.detach().to(torch.float32)
            bias = None if old.bias is None else old.bias.detach().to(torch.float32)
            target, moment = weight, moments.get(name)
            if name in leader:
                pending.update(capture_teacher_moments(model, teacher, leader[name],
                                                       calibration_data))
            if name in pending:
                moment, cross = pending.pop(name)
                target = teacher_target(weight, moment, cross)
            new = _project(name, target, bias, setting, budgets[name], moment)
        seconds = time.perf_counter() - start
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
        report.layers.append(
            LayerRecord(
                name=name, kind=kind, in_features=in_f, out_features=out_f,
                structure=setting["structure"], budget=budgets[name],
                dense_cost=in_f * out_f, cost=int(new.macs()),
                params=sum(p.numel() for p in new.parameters()),
                dense_params=sum(p.numel() for p in old.parameters()),
                rel_error=rel, seconds=seconds,
            )
        )
        set_submodule(model, name, new)
    report.flops = flops_report(model)
    setattr(model, COMPRESSION_ATTR, {
        "config": _recordable_config(config, layers),
        "fingerprint": fingerprint,
        "layers": dict(layers),
    })
    return CompressionResult(model, report)
