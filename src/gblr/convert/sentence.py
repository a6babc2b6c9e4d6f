"""Save a compressed sentence-transformers model as a directory ``SentenceTransformer`` opens.

The directory holds gblr's files (``compression.json``, ``manifest.json``,
``model.safetensors``, ``hf_config.json``: see :mod:`gblr.convert.io`) and, beside them,
the sentence-transformers files of the model it was compressed from: ``modules.json``,
``config_sentence_transformers.json``, ``sentence_bert_config.json``, the tokenizer files
and the folders of the other modules (pooling, normalisation, dense heads). Its first
module's ``type`` in ``modules.json`` becomes :data:`MODULE_TYPE`,
:class:`gblr.convert.sentence_module.CompressedTransformer`, which rebuilds the model with
:func:`gblr.from_pretrained` (deployed, evaluation mode) instead of reading dense weights.
The dense model's own ``config.json`` and weights are not copied: no other loader can
mistake gblr's weights for a dense checkpoint.

Open it with sentence-transformers (6 or later), which imports a module class outside its
own package only with ``trust_remote_code=True``, for local directories too; here that
flag imports the installed ``gblr`` class named in ``modules.json`` (the directory holds no
Python code, and gblr never passes the flag on to ``transformers``)::

    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer("minilm-compressed", trust_remote_code=True)
    embeddings = model.encode(["A first sentence.", "A second one."])

This module imports neither ``transformers`` nor ``sentence_transformers``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from gblr.convert.io import (
    CONFIG_FILE,
    HF_CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    _read_json,
    save_compressed,
)

__all__ = ["MODULE_TYPE", "MODULES_FILE", "is_sentence_transformer", "save_sentence_transformer"]

#: The ``modules.json`` type of the compressed first module.
MODULE_TYPE = "gblr.convert.sentence_module.CompressedTransformer"
#: The file that makes a directory a sentence-transformers model.
MODULES_FILE = "modules.json"
#: Files of the dense model (or of gblr) that are never copied from the source.
_NOT_COPIED = {"config.json", "README.md", "summary.json", CONFIG_FILE, HF_CONFIG_FILE,
               MANIFEST_FILE, WEIGHTS_FILE}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ot", ".onnx",
                    ".py", ".pyc")


def is_sentence_transformer(directory: str | Path) -> bool:
    """Whether ``directory`` is a sentence-transformers model (it has a ``modules.json``)."""
    return (Path(directory) / MODULES_FILE).is_file()


def _source_modules(source: Path) -> list[dict[str, Any]]:
    """The ``modules.json`` entries of ``source``, checked: sentence-transformers modules
    only, the first a ``Transformer`` stored at the root, every path inside ``source``."""
    where = source / MODULES_FILE
    if not where.is_file():
        raise ValueError(f"{str(source)!r} is not a sentence-transformers model directory "
                         f"(no {MODULES_FILE})")
    modules = _read_json(where, "a sentence-transformers module list")
    if (not isinstance(modules, list) or not modules
            or any(not isinstance(m, dict) or not isinstance(m.get("type"), str)
                   or not isinstance(m.get("path"), str) for m in modules)):
        raise ValueError(f"{where} is not a list of modules with a 'type' and a 'path'")
    first = modules[0]
    if not (first["type"].startswith("sentence_transformers.")
            and first["type"].endswith(".Transformer")):
        raise ValueError(f"{where}: the first module is a {first['type']}, not the "
                         "sentence-transformers Transformer that gblr can replace")
    if first["path"] != "":
        raise ValueError(f"{where}: the Transformer module is stored in {first['path']!r}; "
                         "gblr replaces one stored at the root of the directory")
    for m in modules[1:]:
        if not m["type"].startswith("sentence_transformers."):
            raise ValueError(f"{where}: module {m['type']} is not part of sentence-transformers "
                             "(custom code is not carried over)")
        path = Path(m["path"])
        if path.is_absolute() or ".." in path.parts or len(path.parts) != 1:
            raise ValueError(f"{where}: module path {m['path']!r} is not a folder of the model")
    return modules


def _copy_sentence_files(source: Path, modules: list[dict[str, Any]], target: Path) -> None:
    """Copy into ``target`` the sentence-transformers files of ``source`` (not its dense
    weights, config or code) and write its ``modules.json`` with the first module gblr's."""
    for item in sorted(source.iterdir()):
        if (item.is_file() and not item.name.startswith(".") and item.name not in _NOT_COPIED
                and item.name != MODULES_FILE and not item.name.endswith(_WEIGHT_SUFFIXES)):
            shutil.copyfile(item, target / item.name)
    for m in modules[1:]:
        folder = source / m["path"]
        if folder.is_dir():
            shutil.copytree(folder, target / m["path"],
                            ignore=shutil.ignore_patterns(".*", "*.py", "*.pyc"))
    entries = [dict(m) for m in modules]
    entries[0]["type"] = MODULE_TYPE
    (target / MODULES_FILE).write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")


def save_sentence_transformer(model: nn.Module, source: str | Path, directory: str | Path,
                              overwrite: bool = False, *, trainable: bool = False) -> Path:
    """Save ``model`` (compressed from the Transformer of the sentence-transformers model in
    ``source``) as a sentence-transformers model directory.

    The directory is a gblr save (:func:`gblr.save_compressed`, same ``overwrite`` and
    ``trainable`` rules, written atomically) plus the sentence-transformers files of
    ``source`` (see the module's docstring): ``SentenceTransformer(directory,
    trust_remote_code=True)`` encodes with the deployed compressed layers, its pooling and
    normalisation kept, and ``gblr.from_pretrained(directory)`` loads the model alone.

    Args:
        model: the compressed ``transformers`` model (``gblr.compress`` of the source's
            ``AutoModel``, or a loaded save), not deployed.
        source: the sentence-transformers model directory it was compressed from.
        directory: where to write.
        overwrite: replace ``directory`` if gblr wrote it.
        trainable: save every tensor whole (see :func:`gblr.save_compressed`).

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        ValueError: ``source`` is not a sentence-transformers model whose first module is a
            Transformer stored at its root, or ``model`` is not a ``transformers`` model of
            the same kind.

    Example::

        model = AutoModel.from_pretrained(src)
        gblr.compress(model, gblr.CompressionConfig(budget=0.5))
        gblr.save_sentence_transformer(model, src, "minilm-compressed")
    """
    from gblr.convert.hub import base_record

    source = Path(source)
    modules = _source_modules(source)
    if base_record(model) is None:
        raise ValueError("a sentence-transformers save needs a model whose class is one of "
                         f"transformers' own, not {type(model).__name__}")
    config = source / "config.json"
    kind = _read_json(config, "a Hugging Face configuration") if config.is_file() else {}
    kind = kind.get("model_type") if isinstance(kind, dict) else None
    if kind != getattr(model.config, "model_type", None):
        raise ValueError(f"{str(source)!r} holds a {kind!r} model, not the "
                         f"{model.config.model_type!r} model given")
    return save_compressed(model, directory, overwrite, trainable=trainable,
                           extra=lambda tmp: _copy_sentence_files(source, modules, tmp))
