"""Save a compressed model and rebuild it exactly from its base architecture.

A saved directory holds ``compression.json`` (the config, a fingerprint of the base
model's architecture, the form saved, and for every structured layer its structure,
constructor arguments and form), ``model.safetensors`` (every tensor of the compressed
model, widths and locations included, with its SHA-256 recorded in the JSON) and
``manifest.json`` (the SHA-256 of both files: configuration and weights are checked
before anything is built; it also marks the directory as one gblr wrote, which
``overwrite=True`` may replace). A model of a ``transformers`` class also gets its
Hugging Face configuration, ``hf_config.json`` (checksummed in the manifest too), from
which ``load_compressed(directory)`` rebuilds the base without it (:mod:`gblr.convert.hub`).

Two forms (:data:`FORMS`). ``"compact"`` (the default) saves what the evaluation-mode
model uses: GBLR layers with sharp masks keep their active components and the factor
entries inside their boxes (:mod:`gblr.convert.compact`); a GBLR layer with smooth masks
(``sigma`` set) is saved whole in both forms. ``"trainable"`` saves every
tensor whole, as needed to resume training (boxes can grow again).

Loading is all-or-nothing: every check runs and every new layer is built and filled
before the caller's model is touched. Tensors holding NaN or Inf are refused when saving
and when loading.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gblr.convert.compact import compact_layer, expand_compact
from gblr.convert.embeddings import EMBEDDING_KIND
from gblr.convert.fingerprint import architecture_fingerprint
from gblr.convert.hub import HF_CONFIG_FILE, base_record, build_base, check_base_entry
from gblr.convert.replace import COMPRESSION_ATTR, dense_weight
from gblr.convert.select import layer_kind, module_paths
from gblr.core.surgery import replace_modules, tie_tensor
from gblr.core.validate import check_finite
from gblr.deploy.packed import PackedGBLRLinear
from gblr.deploy.tiled import TiledGBLRLinear
from gblr.layers.base import StructuredLinear, get_structure
from gblr.layers.conv import GBLRConv2d
from gblr.layers.embedding import LowRankEmbedding
from gblr.layers.gblr import GBLRLinear

__all__ = [
    "save_compressed", "load_compressed", "written_by_gblr", "saved_size",
    "CONFIG_FILE", "WEIGHTS_FILE", "MANIFEST_FILE", "HF_CONFIG_FILE", "FORMAT", "FORMS",
]

CONFIG_FILE = "compression.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
#: Format of the directories written now: v3 records the form saved (and may hold
#: compact layers), v2 added ``manifest.json``.
FORMAT = "gblr-compressed-v3"
#: Format of directories written with a manifest, before the compact form: still read.
FORMAT_V2 = "gblr-compressed-v2"
#: Format of directories written before the manifest (weights checksum only): still read.
FORMAT_V1 = "gblr-compressed-v1"
#: Formats whose directories carry a manifest, which must then be present.
_MANIFEST_FORMATS = (FORMAT, FORMAT_V2)
_READ_FORMATS = (FORMAT, FORMAT_V2, FORMAT_V1)
MANIFEST_FORMAT = "gblr-manifest-v1"
#: Forms of a save: ``"compact"`` (what evaluation uses) or ``"trainable"`` (everything).
FORMS = ("compact", "trainable")
#: A layer's form in the record: ``"compact"`` or ``"full"`` (every tensor whole).
_LAYER_FORMS = ("compact", "full")
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
        if isinstance(module, StructuredLinear | LowRankEmbedding) or (
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


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupted (not valid JSON: {err})") from None
    except OSError as err:
        raise ValueError(f"{path} cannot be read as {what}: {err}") from None


def written_by_gblr(directory: str | Path) -> bool:
    """Whether ``directory`` is a directory :func:`save_compressed` wrote (it holds a gblr
    ``manifest.json``, or, for directories saved before the manifest existed, a gblr
    ``compression.json``). Only such a directory may be replaced with ``overwrite=True``."""
    directory = Path(directory)
    if not directory.is_dir():
        return False
    for name, key, accepted in ((MANIFEST_FILE, "format", (MANIFEST_FORMAT,)),
                                (CONFIG_FILE, "format", _READ_FORMATS)):
        path = directory / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and data.get(key) in accepted:
                return True
    return False


def _finite_names(model: nn.Module, layers: list[str]) -> set[str]:
    """State-dict names that must hold finite values: every parameter, and every tensor of
    the structured layers (widths and locations are buffers in some layers). Other buffers
    (attention masks of -inf, say) are left alone."""
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name in model.state_dict(keep_vars=True):
        if any(name.startswith(f"{layer}.") for layer in layers):
            names.add(name)
    return names


def saved_size(directory: str | Path) -> dict[str, Any]:
    """What a saved directory holds: ``{"file_bytes", "file_mb", "values", "form"}``, the
    size of its ``model.safetensors`` (MB = 10^6 bytes), the number of tensor values in it
    (parameters and saved buffers, shared tensors once) and the form saved (``"trainable"``
    for directories written before the compact form). Reads only the file's header."""
    from safetensors import safe_open

    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    values = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            count = 1
            for s in shape:
                count *= int(s)
            values += count
    record = _read_json(directory / CONFIG_FILE, "a compression record")
    size = weights.stat().st_size
    return {"file_bytes": size, "file_mb": size / 1e6, "values": values,
            "form": record.get("form", "trainable") if isinstance(record, dict) else None}


def save_compressed(model: nn.Module, directory: str | Path, overwrite: bool = False, *,
                    trainable: bool = False,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (the output of ``gblr.compress``) to ``directory``.

    By default the compact form is saved: what the evaluation-mode model uses (see the
    module's docstring; GBLR layers with smooth masks, ``sigma`` set, are saved whole).
    The model loaded from it computes the same evaluation-mode outputs with the same
    ``macs()``, but has lost the factor entries outside its boxes, so training it can no
    longer grow them back; ``trainable=True`` saves every tensor whole, to resume training.

    An existing ``directory`` is an error unless ``overwrite=True``, and even then only a
    directory gblr wrote (see :func:`written_by_gblr`) is replaced: anything else is
    refused, never deleted. The files are written to a temporary directory next to the
    target and moved into place once complete, so a failure never leaves a half-written
    save or destroys the previous one. A tensor holding NaN or Inf (a factor, a width, a
    location, any parameter) is refused, naming it.

    A model whose class is one of ``transformers``' own also gets its configuration saved
    (``hf_config.json``, checksummed in the manifest), so that ``load_compressed(directory)``
    rebuilds it without the base model (see :mod:`gblr.convert.hub`).

    ``extra``, if given, is called with the temporary directory once gblr's files are in
    it, to add files of its own that move into place with them (the files of a
    sentence-transformers model, say: :func:`gblr.save_sentence_transformer`).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() or directory.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"{str(directory)!r} already exists; pass overwrite=True to replace it"
            )
        if directory.is_symlink() or not directory.is_dir():
            raise FileExistsError(f"{str(directory)!r} exists and is not a directory")
        if not written_by_gblr(directory):
            raise FileExistsError(
                f"{str(directory)!r} exists and was not written by gblr (it has no gblr "
                f"{MANIFEST_FILE} or {CONFIG_FILE}); refusing to replace it even with "
                "overwrite=True: choose another directory or remove it yourself"
            )
    deployed = [n for n, m in model.named_modules()
                if isinstance(m, PackedGBLRLinear | TiledGBLRLinear)]
    if deployed:
        raise ValueError(
            f"the model is deployed (packed layers such as {deployed[0]!r}): save_compressed "
            "keeps the trainable structure, so call it before gblr.deploy, or save the "
            "deployed layers with gblr.save_packed"
        )
    info = getattr(model, COMPRESSION_ATTR, None)
    if not isinstance(info, dict):
        raise ValueError(
            "model carries no compression record; save a model returned by gblr.compress "
            "or gblr.load_compressed"
        )
    form = "trainable" if trainable else "compact"
    layers = {}
    compact: dict[str, dict[str, torch.Tensor]] = {}
    _, shared = _tensors_and_aliases(model)
    shared_layers = {n.rsplit(".", 1)[0] for pair in shared.items() for n in pair}
    for name, module in _replaced_layers(model).items():
        args = constructor_args(module, f"layer {name!r}")
        # a layer sharing its tensors with another (tied linears) is saved whole, once
        tensors = None if trainable or name in shared_layers else compact_layer(module)
        if tensors is not None:
            compact[name] = tensors
            if isinstance(module, GBLRLinear):
                args["num_components"] = int(tensors["widths"].shape[1])
        layers[name] = {
            "structure": module.structure_name,
            "class": f"{type(module).__module__}.{type(module).__qualname__}",
            "kind": info["layers"].get(name),
            "args": args,
            "form": "compact" if tensors is not None else "full",
        }
    missing = sorted(set(info["layers"]) - set(layers))
    if missing or not layers:
        raise ValueError(
            f"compressed layers {missing[:4]} are no longer structured layers in the model"
            if missing else "model has no structured layers to save"
        )
    must_be_finite = _finite_names(model, list(layers))
    for name, tensor in model.state_dict().items():
        if name in must_be_finite:
            check_finite(name, tensor.detach())
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tensors, aliases = _tensors_and_aliases(model)
        for layer, parts in compact.items():
            for name, tensor in parts.items():
                key = f"{layer}.{name}"
                if key not in tensors or key in aliases:
                    raise ValueError(f"layer {layer!r}: its tensor {key} is not saved on its own")
                tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
        save_file(tensors, str(tmp / WEIGHTS_FILE),
                  metadata={"format": FORMAT, "form": form, "fingerprint": info["fingerprint"]})
        base = base_record(model)
        if base is not None:
            (tmp / HF_CONFIG_FILE).write_text(base[1], encoding="utf-8")
        record = {
            "format": FORMAT,
            "form": form,
            "config": info["config"],
            "base_fingerprint": info["fingerprint"],
            "base_name": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
            "base": None if base is None else base[0],
            "layers": layers,
            "aliases": aliases,
            "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        manifest = {
            "format": MANIFEST_FORMAT,
            "form": form,
            "files": {name: _sha256(tmp / name) for name in (CONFIG_FILE, WEIGHTS_FILE)
                      + ((HF_CONFIG_FILE,) if base is not None else ())},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n",
                                         encoding="utf-8")
        if extra is not None:
            extra(tmp)
        if directory.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, backup / "old")
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(backup / "old", directory)  # put the previous save back
                shutil.rmtree(backup, ignore_errors=True)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _check_manifest(directory: Path) -> dict[str, str] | None:
    """Check the files of ``directory`` against its manifest (every file it lists, the
    configuration and weights at least); return ``{file: SHA-256}``, None where it has none."""
    path = directory / MANIFEST_FILE
    if not path.exists():
        return None
    manifest = _read_json(path, "a manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(files, dict)
            or any(not isinstance(v, str) for v in files.values())):
        raise ValueError(f"{path} is corrupted: not a {MANIFEST_FORMAT} manifest")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in files:
            raise ValueError(f"{path} is corrupted: it records no checksum for {name}")
    for name in files:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{path} is corrupted: {name!r} is not a file name")
        target = directory / name
        if not target.is_file():
            raise ValueError(f"{str(directory)!r} has no {name}")
        if _sha256(target) != files[name]:
            raise ValueError(
                f"{target} is corrupted or was edited: its SHA-256 checksum differs from "
                f"the one recorded in {MANIFEST_FILE}"
            )
    return files


def _read_record(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ValueError(f"{str(directory)!r} is not a directory written by gblr.save_compressed")
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} has no {CONFIG_FILE}; not a gblr compressed model")
    checked = _check_manifest(directory)
    has_manifest = checked is not None
    record = _read_json(path, "a compression record")
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a JSON object")
    if record.get("format") not in _READ_FORMATS:
        raise ValueError(f"{path} is not a {FORMAT} record (format={record.get('format')!r}); "
                         f"this gblr reads {', '.join(_READ_FORMATS)}")
    for key in ("base_fingerprint", "layers", "weights_sha256"):
        if key not in record:
            raise ValueError(f"{path} is corrupted: key {key!r} is missing")
    if record.get("form", "trainable") not in FORMS:
        raise ValueError(f"{path} is corrupted: 'form' is {record.get('form')!r}, not one of "
                         f"{FORMS}")
    if record["format"] in _MANIFEST_FORMATS and not has_manifest:
        raise ValueError(
            f"{str(directory)!r} lacks its {MANIFEST_FILE} (written by {record['format']}, "
            "whose configuration and weights it checksums); refusing to load it unchecked"
        )
    if not has_manifest:
        warnings.warn(
            f"{str(directory)!r} was saved in the older format {FORMAT_V1}: its weights are "
            f"checksummed but its {CONFIG_FILE} is not; save it again with "
            "gblr.save_compressed to add the checksum",
            UserWarning, stacklevel=3,
        )
    layers = record["layers"]
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path} is corrupted: 'layers' is not a non-empty object")
    for name, entry in layers.items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("structure"), str)
                or not isinstance(entry.get("class"), str)
                or not isinstance(entry.get("args"), dict)
                or not isinstance(entry.get("kind", ""), str | None)):
            raise ValueError(
                f"{path} is corrupted: layer {name!r} lacks a 'structure', 'class' or "
                "'args' of the right type"
            )
        if entry.get("form", "full") not in _LAYER_FORMS:
            raise ValueError(f"{path} is corrupted: layer {name!r} has form "
                             f"{entry.get('form')!r}, not one of {_LAYER_FORMS}")
    aliases = record.get("aliases", {})
    if not isinstance(aliases, dict) or any(
        not isinstance(k, str) or not isinstance(v, str) for k, v in aliases.items()
    ):
        raise ValueError(f"{path} is corrupted: bad 'aliases'")
    base = check_base_entry(record.get("base"), str(path))
    if base is not None and base["config"] not in (checked or {}):
        raise ValueError(f"{path} is corrupted: its {base['config']} is not checksummed in "
                         f"{MANIFEST_FILE}")
    return record


def _rebuild_base(directory: Path, record: dict[str, Any]) -> nn.Module:
    """The base model of a save that recorded its ``transformers`` class and config."""
    base = record.get("base")
    if base is None:
        raise ValueError(
            f"{str(directory)!r} does not record the Hugging Face configuration of its base "
            "model (saved from a model that is not a transformers model, or by an older gblr): "
            "pass the base model: gblr.load_compressed(base_model, directory)")
    config = _read_json(directory / base["config"], "a Hugging Face configuration")
    return build_base(base, config, str(directory))


def _resolve_base(base: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    if isinstance(base, nn.Module):
        return base
    if not callable(base):
        raise TypeError(
            "base_model_or_factory must be an nn.Module or a function returning one, "
            f"got {type(base).__name__}"
        )
    base = base()
    if not isinstance(base, nn.Module):
        raise TypeError(f"the factory returned {type(base).__name__}, not an nn.Module")
    return base


def _build_layer(name: str, entry: dict[str, Any], old: nn.Module | None) -> tuple[nn.Module, str]:
    """A new, unattached layer for the record's ``entry`` at ``name`` (``old`` is the base's)."""
    kind = None if old is None else layer_kind(old)
    if isinstance(old, nn.Embedding):
        kind = EMBEDDING_KIND
    if kind is None or kind != entry.get("kind", kind):
        raise ValueError(f"layer {name!r} of the saved model has no matching layer in the base")
    if kind == "conv2d":
        cls = GBLRConv2d
    elif kind == EMBEDDING_KIND:
        cls = LowRankEmbedding
    else:
        try:
            cls = get_structure(entry["structure"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"layer {name!r}: unknown structure {entry['structure']!r} "
                             f"({err})") from None
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
    elif kind == EMBEDDING_KIND:
        ref = old.weight
        saved = [args.get("num_embeddings"), args.get("embedding_dim")]
        have = list(ref.shape)
    else:
        ref = dense_weight(old, kind)
        saved = [args.get("out_features"), args.get("in_features")]
        have = list(ref.shape)
    if saved != have:
        raise ValueError(
            f"layer {name!r}: saved shape {saved} differs from the base layer's {have}"
        )
    if any(arg in _SKIP_ARGS for arg in args):
        raise ValueError(f"layer {name!r}: the record sets a reserved argument "
                         f"({sorted(set(args) & set(_SKIP_ARGS))})")
    try:
        new = cls(**args, device=ref.device, dtype=ref.dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"layer {name!r}: its recorded arguments do not build a "
                         f"{cls.__name__}: {err}") from None
    new.train(old.training)
    return new, kind


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make every saved alias one tensor again: the parameter ``alias`` becomes the very
    parameter ``name`` (tied linears share their compressed factors after a load too)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, name in aliases.items():
        if alias in params and name in params and params[alias] is not params[name]:
            tie_tensor(model, alias, params[name])


def load_compressed(
    base_model_or_factory: nn.Module | Callable[[], nn.Module] | str | os.PathLike[str],
    directory: str | Path | None = None,
) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed` on top of its base architecture.

    ``load_compressed(directory)`` rebuilds the base from the Hugging Face configuration
    saved beside the weights (a model compressed from a ``transformers`` model; only a class
    of the ``transformers`` namespace is built, never code from the directory or the Hub,
    nothing is downloaded: see :mod:`gblr.convert.hub`) and returns it in evaluation mode.
    A save without that configuration (another kind of model, or an older gblr) needs
    its base: ``load_compressed(base_model_or_factory, directory)``, where
    ``base_model_or_factory`` is the dense model it was compressed from (or a model of the
    same architecture, or a function returning one); it is changed in place and returned.
    Its outputs equal the saved model's bit for bit on CPU (in evaluation mode for a
    compact save, whose GBLR layers come back with their active components only, zeros
    outside their boxes; a trainable save or a directory of format v1/v2 gives back every
    tensor as it was). A file from another model, a
    corrupted, truncated or edited file (configuration or weights), a changed layer, or a
    tensor holding NaN or Inf raise a ``ValueError``.

    Loading is all-or-nothing: the files are checked, every new layer is built and filled
    and every tensor is checked before the first change to the base model, so a refused
    load leaves it exactly as it was (same modules, same tensors).

    Example::

        model = gblr.load_compressed("minilm-compressed")               # base rebuilt
        model = gblr.load_compressed(AutoModel.from_pretrained(src), "minilm-compressed")
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if directory is None:
        if not isinstance(base_model_or_factory, str | os.PathLike):
            raise TypeError("load_compressed(directory) takes the saved directory (a str or "
                            f"path), got {type(base_model_or_factory).__name__}")
        base_model_or_factory, directory = None, base_model_or_factory
    elif isinstance(base_model_or_factory, str | os.PathLike):
        raise TypeError("load_compressed(base_model_or_factory, directory): the first argument "
                        "is the base model; to rebuild it from the save, pass the directory "
                        "alone: load_compressed(directory)")
    directory = Path(directory)
    record = _read_record(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{str(directory)!r} has no {WEIGHTS_FILE}")
    if _sha256(weights) != record["weights_sha256"]:
        raise ValueError(f"{weights} is corrupted: its SHA-256 differs from the one recorded")
    try:
        with safe_open(str(weights), framework="pt") as f:
            file_format = (f.metadata() or {}).get("format")
        state = load_file(str(weights))
    except SafetensorError as err:
        raise ValueError(f"{weights} is corrupted: {err}") from None
    if file_format not in (None, *_READ_FORMATS) or (
        file_format in _MANIFEST_FORMATS and record["format"] != file_format
    ):
        raise ValueError(f"{weights} (format {file_format!r}) does not belong to a "
                         f"{record['format']} {CONFIG_FILE}")

    if base_model_or_factory is None:
        base = _rebuild_base(directory, record)
    else:
        base = _resolve_base(base_model_or_factory)
    if any(isinstance(m, StructuredLinear | LowRankEmbedding) for m in base.modules()):
        raise ValueError("the base model already holds structured layers; pass the dense model")
    if architecture_fingerprint(base) != record["base_fingerprint"]:
        raise ValueError(
            f"{str(directory)!r} was saved from a model of another architecture (its fingerprint "
            "differs from the base model's); pass the model it was compressed from"
        )

    # create: every new layer, unattached
    modules = dict(base.named_modules())
    created: dict[str, nn.Module] = {}
    kinds: dict[str, str] = {}
    for name, entry in record["layers"].items():
        created[name], kinds[name] = _build_layer(name, entry, modules.get(name))
    # a base module registered under several names is replaced under all of them
    paths = module_paths(base)
    every_name = {name: paths.get(name, [name]) for name in created}

    # check: the file's tensors against the rebuilt model's, name by name
    aliases = record.get("aliases", {})
    if any(v not in state or k in state for k, v in aliases.items()):
        raise ValueError(f"{directory / CONFIG_FILE} is corrupted: bad 'aliases'")
    state.update({alias: state[name] for alias, name in aliases.items()})
    expected: dict[str, torch.Tensor] = {}
    finite: set[str] = set()
    replaced = [alias for names in every_name.values() for alias in names]
    for name, tensor in base.state_dict(keep_vars=True).items():
        if not any(name.startswith(f"{layer}.") for layer in replaced):
            expected[name] = tensor
    finite |= {n for n, _ in base.named_parameters(remove_duplicate=False)
               if not any(n.startswith(f"{layer}.") for layer in replaced)}
    for layer, new in created.items():
        for name, tensor in new.state_dict(keep_vars=True).items():
            for alias in every_name[layer]:
                expected[f"{alias}.{name}"] = tensor
                finite.add(f"{alias}.{name}")
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not fit the rebuilt model: "
            + "; ".join(f"{what} {names[:4]}" for what, names in
                        (("missing tensors", missing), ("unexpected tensors", unexpected))
                        if names)
        )
    for layer, new in created.items():  # compact factors back in place, zeros outside
        if record["layers"][layer].get("form", "full") == "compact":
            expand_compact(weights, layer, new, state)
    for name, ref in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ValueError(f"{weights} does not fit the rebuilt model: tensor {name} has "
                             f"shape {tuple(tensor.shape)}, the model's is {tuple(ref.shape)}")
        if tensor.is_floating_point() != ref.is_floating_point():
            raise ValueError(f"{weights}: tensor {name} is {tensor.dtype}, the model's is "
                             f"{ref.dtype}")
        if name in finite:
            try:
                check_finite(name, tensor)
            except ValueError as err:
                raise ValueError(f"{weights}: {err}") from None

    # fill the new layers (still unattached)
    for layer, new in created.items():
        prefix = f"{layer}."
        sub = {n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)}
        try:
            new.load_state_dict(sub, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{weights} does not fit layer {layer!r}: {err}") from None

    # replace: nothing below can fail on a checked file
    old_modules = {alias: modules[name] for name in created for alias in every_name[name]}
    owner = {alias: name for name in created for alias in every_name[name]}
    replace_modules(base, list(old_modules.items()), lambda alias, _: created[owner[alias]])
    try:
        base.load_state_dict(state, strict=True)
    except RuntimeError as err:  # not expected after the checks above: undo the replacement
        replace_modules(base, [(a, created[owner[a]]) for a in old_modules],
                        lambda alias, _: old_modules[alias])
        raise ValueError(f"{weights} does not fit the rebuilt model: {err}") from None
    _retie(base, aliases)
    setattr(base, COMPRESSION_ATTR, {
        "config": record.get("config"),
        "fingerprint": record["base_fingerprint"],
        "layers": kinds,
    })
    return base
