"""Save and load packed and tiled layers with safetensors, without the training module."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from gblr.core.surgery import replace_modules
from gblr.deploy.executor import SPARSE_BUFFERS, _Plan
from gblr.deploy.packed import PackedGBLRLinear
from gblr.deploy.tiled import TiledGBLRLinear

__all__ = ["save_packed", "load_packed"]

_META_KEY = "gblr.packed"
#: Attributes of a tiled layer stored in the metadata (its buffers are tensors).
_TILED_ATTRS = ("rank", "rank_tile", "in_tile", "out_tile", "direct", "backend")


def _packed_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (PackedGBLRLinear, TiledGBLRLinear)
    return [(n, m) for n, m in module.named_modules() if isinstance(m, kinds)]


def _save_tiled(name: str, layer: TiledGBLRLinear, tensors: dict[str, torch.Tensor]) -> dict:
    for key in layer.TILE_BUFFERS:
        tensors[f"{name}/{key}"] = getattr(layer, key).detach().cpu().contiguous()
    return {"form": "tiled", **{key: getattr(layer, key) for key in _TILED_ATTRS}}


def save_packed(module: nn.Module, path: str | Path) -> None:
    """Write every packed or tiled layer in ``module`` (or ``module`` itself) to ``path``.

    The file holds the weights and, as JSON metadata, the slices of every GEMM (or the
    tile sizes); loading it needs neither the training layer nor its masks.
    """
    from safetensors.torch import save_file

    found = _packed_modules(module)
    if not found:
        raise ValueError(
            "module holds no PackedGBLRLinear or TiledGBLRLinear; run gblr.deploy(model) first"
        )
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for name, layer in found:
        common = {"in_features": layer.in_features, "out_features": layer.out_features,
                  "true_macs": layer.true_macs, "bias": layer.bias is not None}
        if layer.bias is not None:
            tensors[f"{name}/bias"] = layer.bias.detach().cpu().contiguous()
        if isinstance(layer, TiledGBLRLinear):
            meta[name] = {**common, **_save_tiled(name, layer, tensors)}
            continue
        plans = []
        for j, plan in enumerate(layer.plans):
            for i, w in enumerate(plan.weights()):
                # (a clone: a one-token packing's weights are views of one buffer)
                tensors[f"{name}/plan{j}.w{i}"] = w.detach().cpu().clone()
            for key in SPARSE_BUFFERS:
                if getattr(plan, key) is not None:
                    tensors[f"{name}/plan{j}.{key}"] = getattr(plan, key).cpu().contiguous()
            plans.append({**plan.spec, "n_weights": len(plan.weights())})
        meta[name] = {**common, "form": "grouped", "plans": plans}
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})


def _build(entry: dict, tensors: dict[str, torch.Tensor], name: str) -> nn.Module:
    form = entry.get("form", "grouped")
    # files written before the MACs rename name the layer's cost "true_flops"
    true_macs = entry["true_macs"] if "true_macs" in entry else entry["true_flops"]
    bias = tensors[f"{name}/bias"] if entry["bias"] else None
    if form == "tiled":
        tiles = {key: tensors[f"{name}/{key}"] for key in TiledGBLRLinear.TILE_BUFFERS}
        attrs = {key: entry[key] for key in _TILED_ATTRS}
        return TiledGBLRLinear(
            entry["in_features"], entry["out_features"], tiles, attrs["rank"],
            attrs["rank_tile"], attrs["in_tile"], attrs["out_tile"], bias,
            true_macs, attrs["backend"], attrs["direct"],
        )
    if form != "grouped":
        raise ValueError(f"layer {name!r} has an unknown form {form!r}")
    plans = []
    for j, spec in enumerate(entry["plans"]):
        weights = [tensors[f"{name}/plan{j}.w{i}"] for i in range(spec["n_weights"])]
        spec = {k: v for k, v in spec.items() if k != "n_weights"}
        sparse = {
            key: tensors[f"{name}/plan{j}.{key}"]
            for key in SPARSE_BUFFERS if f"{name}/plan{j}.{key}" in tensors
        }
        plans.append(_Plan(spec, weights, sparse))
    return PackedGBLRLinear(
        entry["in_features"], entry["out_features"], plans, bias, true_macs
    )


def load_packed(
    path: str | Path, model: nn.Module | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """Load packed layers from ``path``.

    Without ``model`` the file must hold one lone layer, which is returned. With ``model``
    each stored layer replaces the module of the same name (a ``Linear``, a GBLR layer or a
    packed one), which must have the same ``in_features`` and ``out_features``; the model is
    returned.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a packed GBLR file (no {_META_KEY!r} metadata)")
    meta = json.loads(raw)
    tensors = load_file(str(path), device=str(device))
    if model is None:
        if list(meta) != [""]:
            raise ValueError(
                f"{path} holds layers {sorted(meta)}; pass the model they belong to"
            )
        return _build(meta[""], tensors, "")
    targets = []
    for name, entry in meta.items():
        if name == "":
            raise ValueError(f"{path} holds a lone layer; load it without a model")
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path} has layer {name!r}, which the model does not have") from None
        shape = (getattr(target, "in_features", None), getattr(target, "out_features", None))
        if shape != (entry["in_features"], entry["out_features"]):
            raise ValueError(
                f"packed layer {name!r} in {path} is {entry['in_features']}->"
                f"{entry['out_features']}, but the model's module is "
                f"{shape[0]}->{shape[1]} ({type(target).__name__})"
            )
        targets.append((name, target))
    replace_modules(model, targets, lambda name, _: _build(meta[name], tensors, name))
    return model
