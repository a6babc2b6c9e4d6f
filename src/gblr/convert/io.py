"""Save a compressed model and rebuild it exactly from its base architecture.

A saved directory holds ``compression.json`` (the config, a fingerprint of the base
model's architecture, and for every structured layer its structure and constructor
arguments) and ``model.safetensors`` (every tensor of the compressed model, widths and
locations included, with its SHA-256 recorded in the JSON).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gblr.convert.fingerprint import architecture_fingerprint
from gblr.convert.replace import COMPRESSION_ATTR, dense_weight
from gblr.convert.select import layer_kind
from gblr.core.surgery import set_submodule
from gblr.layers.base import StructuredLinear, get_structure
from gblr.layers.conv import GBLRConv2d

__all__ = ["save_compressed", "load_compressed", "CONFIG_FILE", "WEIGHTS_FILE", "FORMAT"]

CONFIG_FILE = "compression.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "gblr-compressed-v1"
_SKIP_ARGS = ("self", "device", "dtype")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_value(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v, where) for v in value]
    raise TypeError(f"{where} is a {type(value).__name__}, which cannot be saved to JSON")


def _is_json(value: Any) -> bool:
    try:
        _json_value(value, "")
    except TypeError:
        return False
    return True


def _replaced_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Structured layers and GBLR convs of ``model``, not counting those nested in a conv."""
    conv_cls = GBLRConv2d
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in found):
            continue
        if isinstance(module, StructuredLinear) or (
            conv_cls is not None and isinstance(module, conv_cls)
        ):
            found[name] = module
    return found


def constructor_args(layer: nn.Module, name: str = "layer") -> dict[str, Any]:
    """The constructor arguments that rebuild ``layer``'s shapes, read from its attributes.

    An optional argument not stored as a plain attribute (a tensor kept as a buffer, say)
    is left at its default: the saved state dict restores it, and a shape that differs
    makes loading fail loudly rather than silently.
    """
    args: dict[str, Any] = {}
    params = inspect.signature(type(layer).__init__).parameters
    for arg, p in params.items():
        if arg in _SKIP_ARGS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        source = layer
        if not hasattr(layer, arg) and hasattr(layer, "linears"):
            source = layer.linears[0]  # GBLRConv2d keeps the matrices' settings on them
        value = getattr(source, arg, None)
        if arg == "bias":
            args[arg] = layer.bias is not None
        elif hasattr(source, arg) and not callable(value) and _is_json(value):
            args[arg] = _json_value(value, f"{name}: constructor argument {arg!r}")
        elif p.default is p.empty:
            raise TypeError(
                f"{name}: {type(layer).__name__} does not store its constructor argument {arg!r} "
                "as an attribute, so it cannot be rebuilt"
            )
    if args.get("init") not in (None, "random") and "random" in getattr(
        importlib.import_module(type(layer).__module__), "INIT_SCHEMES", ("random",)
    ):
        # the saved tensors replace every initial value; "random" builds any component count
        args["init"] = "random"
    return args


def _tensors_and_aliases(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every state-dict tensor once, as its own contiguous CPU copy, and ``{alias: name}``
    for tensors that share memory with an earlier one (tied embeddings)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, tensor in model.state_dict().items():
        if tensor.numel():
            key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape),
                   tuple(tensor.stride()))
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def save_compressed(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (the output of ``gblr.compress``) to ``directory``.

    An existing ``directory`` is an error unless ``overwrite=True``; the files are written
    to a temporary directory first, so a failure never leaves a half-written save or
    destroys the previous one.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(
            f"{str(directory)!r} already exists; pass overwrite=True to replace it"
        )
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{str(directory)!r} exists and is not a directory")
    info = getattr(model, COMPRESSION_ATTR, None)
    if not isinstance(info, dict):
        raise ValueError(
            "model carries no compression record; save a model returned by gblr.compress "
            "or gblr.load_compressed"
        )
    layers = {}
    for name, module in _replaced_layers(model).items():
        layers[name] = {
            "structure": module.structure_name,
            "class": f"{type(module).__module__}.{type(module).__qualname__}",
            "kind": info["layers"].get(name),
            "args": constructor_args(module, f"layer {name!r}"),
        }
    missing = sorted(set(info["layers"]) - set(layers))
    if missing or not layers:
        raise ValueError(
            f"compressed layers {missing[:4]} are no longer structured layers in the model"
            if missing else "model has no structured layers to save"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tensors, aliases = _tensors_and_aliases(model)
        save_file(tensors, str(tmp / WEIGHTS_FILE),
                  metadata={"format": FORMAT, "fingerprint": info["fingerprint"]})
        record = {
            "format": FORMAT,
            "config": info["config"],
            "base_fingerprint": info["fingerprint"],
            "base_name": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
            "layers": layers,
            "aliases": aliases,
            "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if directory.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, backup / "old")
            os.replace(tmp, directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _read_record(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ValueError(f"{str(directory)!r} is not a directory written by gblr.save_compressed")
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} has no {CONFIG_FILE}; not a gblr compressed model")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupted (not valid JSON: {err})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} record (format={record.get('format')!r})"
                         if isinstance(record, dict) else f"{path} is not a JSON object")
    for key in ("base_fingerprint", "layers", "weights_sha256"):
        if key not in record:
            raise ValueError(f"{path} is corrupted: key {key!r} is missing")
    return record


def load_compressed(
    base_model_or_factory: nn.Module | Callable[[], nn.Module], directory: str | Path
) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed` on top of its base architecture.

    ``base_model_or_factory`` is the dense model it was compressed from (or a model of the
    same architecture, or a function returning one); it is changed in place and returned.
    Its outputs equal the saved model's bit for bit on CPU. A file from another model, a
    corrupted or truncated file, or a changed layer raise a ``ValueError``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    record = _read_record(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{str(directory)!r} has no {WEIGHTS_FILE}")
    if _sha256(weights) != record["weights_sha256"]:
        raise ValueError(f"{weights} is corrupted: its SHA-256 differs from the one recorded")
    base = base_model_or_factory
    if not isinstance(base, nn.Module):
        if not callable(base):
            raise TypeError(
                "base_model_or_factory must be an nn.Module or a function returning one, "
                f"got {type(base).__name__}"
            )
        base = base()
        if not isinstance(base, nn.Module):
            raise TypeError(f"the factory returned {type(base).__name__}, not an nn.Module")
    if any(isinstance(m, StructuredLinear) for m in base.modules()):
        raise ValueError("the base model already holds structured layers; pass the dense model")
    if architecture_fingerprint(base) != record["base_fingerprint"]:
        raise ValueError(
            f"{str(directory)!r} was saved from a model of another architecture (its fingerprint "
            "differs from the base model's); pass the model it was compressed from"
        )
    modules = dict(base.named_modules())
    kinds: dict[str, str] = {}
    for name, entry in record["layers"].items():
        old = modules.get(name)
        kind = None if old is None else layer_kind(old)
        if kind is None or kind != entry.get("kind", kind):
            raise ValueError(f"layer {name!r} of the saved model has no matching layer in the base")
        if kind == "conv2d":
            cls = GBLRConv2d
        else:
            cls = get_structure(entry["structure"])
        if f"{cls.__module__}.{cls.__qualname__}" != entry["class"]:
            raise ValueError(
                f"layer {name!r} was saved as {entry['class']}, but structure "
                f"{entry['structure']!r} is now {cls.__module__}.{cls.__qualname__}"
            )
        args = dict(entry["args"])
        if kind == "conv2d":
            ref = old.weight
            saved = [args.get("out_channels"), args.get("in_channels"), args.get("kernel_size")]
            have = [old.out_channels, old.in_channels, list(old.kernel_size)]
        else:
            ref = dense_weight(old, kind)
            saved = [args.get("out_features"), args.get("in_features")]
            have = list(ref.shape)
        if saved != have:
            raise ValueError(
                f"layer {name!r}: saved shape {saved} differs from the base layer's {have}"
            )
        new = cls(**args, device=ref.device, dtype=ref.dtype)
        new.train(old.training)
        set_submodule(base, name, new)
        kinds[name] = kind
    try:
        state = load_file(str(weights))
    except SafetensorError as err:
        raise ValueError(f"{weights} is corrupted: {err}") from None
    aliases = record.get("aliases", {})
    if not isinstance(aliases, dict) or any(v not in state for v in aliases.values()):
        raise ValueError(f"{directory / CONFIG_FILE} is corrupted: bad 'aliases'")
    state.update({alias: state[name] for alias, name in aliases.items()})
    try:
        base.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit the rebuilt model: {err}") from None
    setattr(base, COMPRESSION_ATTR, {
        "config": record.get("config"),
        "fingerprint": record["base_fingerprint"],
        "layers": kinds,
    })
    return base
