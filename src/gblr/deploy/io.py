"""Save and load packed and tiled layers with safetensors, without the training module.

A packed file holds the layers' tensors and three metadata entries: the packing as JSON
(``gblr.packed``: every layer's sizes, every GEMM's slices, the tile sizes), the format
version (``gblr.packed.format``) and a SHA-256 over the format, the packing JSON and every
tensor's name, dtype, shape and bytes (``gblr.packed.sha256``).

Loading checks every field of the packing (types, ranges, every slice against the weight
shapes and the layer's sizes), every tensor (present, expected, floating weights, no NaN
or Inf) and the checksum, and builds every layer before the first change to the model: a
refused file raises a ``ValueError`` naming the layer and field, and leaves the model as
it was. Files written before the checksum are refused unless ``allow_unverified=True``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from gblr.core.files import atomic_path
from gblr.core.surgery import replace_modules
from gblr.deploy.executor import SPARSE_BUFFERS, _Plan
from gblr.deploy.filecheck import _TILED_ATTRS, check_packing
from gblr.deploy.packed import PackedGBLRLinear
from gblr.deploy.tiled import TiledGBLRLinear

__all__ = ["save_packed", "load_packed", "PACKED_FORMAT"]

_META_KEY = "gblr.packed"
_FORMAT_KEY = "gblr.packed.format"
_SHA_KEY = "gblr.packed.sha256"
#: Format of the packed files written now (v1, unversioned, had no checksum).
PACKED_FORMAT = "gblr-packed-v2"


def _packed_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (PackedGBLRLinear, TiledGBLRLinear)
    return [(n, m) for n, m in module.named_modules() if isinstance(m, kinds)]


def _checksum(fmt: str, raw_meta: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the format, the packing JSON and every tensor (name, dtype, shape and
    bytes, in name order)."""
    h = hashlib.sha256()
    for text in (fmt, raw_meta):
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little") + data)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        head = json.dumps([name, str(t.dtype), list(t.shape)]).encode("utf-8")
        h.update(len(head).to_bytes(8, "little") + head)
        flat = t.reshape(-1)
        if flat.numel() and flat.stride(0) != 1:  # (one element, any stride)
            flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


# -- saving ---------------------------------------------------------------------------------------
def _save_tiled(name: str, layer: TiledGBLRLinear, tensors: dict[str, torch.Tensor]) -> dict:
    for key in layer.TILE_BUFFERS:
        tensors[f"{name}/{key}"] = getattr(layer, key).detach().cpu().contiguous()
    return {"form": "tiled", **{key: getattr(layer, key) for key in _TILED_ATTRS}}


def save_packed(module: nn.Module, path: str | Path, overwrite: bool = False) -> None:
    """Write every packed or tiled layer in ``module`` (or ``module`` itself) to ``path``.

    The file holds the weights and, as JSON metadata, the slices of every GEMM (or the
    tile sizes), a format version and a SHA-256 checksum over both; loading it needs
    neither the training layer nor its masks. An existing ``path`` is an error unless
    ``overwrite=True``. The file is written next to ``path`` under a temporary name and
    renamed into place once complete, so a failure leaves any previous file intact.
    Weights that are not floating point, or hold NaN or Inf, are refused, naming them.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() or path.is_symlink():
        if path.is_dir():
            raise FileExistsError(f"{str(path)!r} is a directory")
        if not overwrite:
            raise FileExistsError(f"{str(path)!r} already exists; pass overwrite=True to "
                                  "replace it")
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
    raw = json.dumps(meta)
    # the file as load_packed will read it: refuse now what loading would refuse
    check_packing(f"cannot save to {path}", json.loads(raw), tensors)
    metadata = {_META_KEY: raw, _FORMAT_KEY: PACKED_FORMAT,
                _SHA_KEY: _checksum(PACKED_FORMAT, raw, tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# -- loading --------------------------------------------------------------------------------------
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


def _read(path: Path, allow_unverified: bool) -> tuple[dict, dict[str, torch.Tensor], bool]:
    """The packing and tensors of ``path``, checked field by field; the checksum is not
    yet compared (see :func:`_verify`). Returns whether the file is of the old format."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            # each tensor in its own allocation: tensors read from the file may start at any
            # byte, and a GEMM on a misaligned operand takes another kernel (other rounding)
            tensors = {key: f.get_tensor(key).clone() for key in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is corrupted (not a readable safetensors file: {err})") from None
    raw = header.get(_META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a packed GBLR file (no {_META_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupted: its {_META_KEY!r} metadata is not valid "
                         f"JSON ({err})") from None
    fmt = header.get(_FORMAT_KEY)
    legacy = fmt is None
    if legacy and not allow_unverified:
        raise ValueError(
            f"{path} was written by an older gblr: it has no format version and no checksum, "
            "so damage to it cannot be detected. Re-create it (gblr.deploy, then "
            "gblr.save_packed), or load it once with load_packed(..., allow_unverified=True) "
            "(every field is still validated) and save it again with gblr.save_packed"
        )
    if not legacy and fmt != PACKED_FORMAT:
        raise ValueError(f"{path} has format {fmt!r}; this gblr reads {PACKED_FORMAT!r} "
                         "(written by a newer gblr?)")
    if not legacy and not isinstance(header.get(_SHA_KEY), str):
        raise ValueError(f"{path} is corrupted: its {_SHA_KEY!r} checksum is missing")
    check_packing(str(path), meta, tensors, legacy=legacy)
    return {"meta": meta, "raw": raw, "header": header}, tensors, legacy


def _verify(path: Path, info: dict, tensors: dict[str, torch.Tensor]) -> None:
    expected = info["header"][_SHA_KEY]
    if _checksum(PACKED_FORMAT, info["raw"], tensors) != expected:
        raise ValueError(
            f"{path} is corrupted or was edited: its SHA-256 checksum over metadata and "
            "tensors differs from the one recorded when it was saved"
        )


def _create(path: Path, meta: dict, tensors: dict[str, torch.Tensor], name: str) -> nn.Module:
    try:
        return _build(meta[name], tensors, name)
    except (ValueError, TypeError, IndexError, RuntimeError) as err:
        raise ValueError(f"{path}: layer {name!r} cannot be built: {err}") from None


def load_packed(
    path: str | Path, model: nn.Module | None = None, device: torch.device | str = "cpu",
    allow_unverified: bool = False,
) -> nn.Module:
    """Load packed layers from ``path``.

    Without ``model`` the file must hold one lone layer, which is returned. With ``model``
    each stored layer replaces the module of the same name (a ``Linear``, a GBLR layer or a
    packed one), which must have the same ``in_features`` and ``out_features``; the model is
    returned.

    Every field, slice and tensor is checked, and the file's checksum compared, before the
    model changes: a refused file (``ValueError``, naming the layer and field) leaves it as
    it was. A file written before checksums existed is refused unless
    ``allow_unverified=True`` (meant for loading it once to save it again).
    """
    path = Path(path)
    info, tensors, legacy = _read(path, allow_unverified)
    meta = info["meta"]
    if model is None:
        if list(meta) != [""]:
            raise ValueError(
                f"{path} holds layers {sorted(meta)}; pass the model they belong to"
            )
        layer = _create(path, meta, tensors, "")
        if not legacy:
            _verify(path, info, tensors)
        return layer.to(device)
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
    created = {name: _create(path, meta, tensors, name).to(device) for name, _ in targets}
    if not legacy:
        _verify(path, info, tensors)
    replace_modules(model, targets, lambda name, _: created[name])
    return model
