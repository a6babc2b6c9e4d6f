"""Rebuild the base architecture of a saved compressed model from its Hugging Face config,
and :func:`from_pretrained`, the one-call load for inference.

:func:`~gblr.convert.io.save_compressed` writes, beside the weights of a model whose class
is one of ``transformers``' own (``BertModel``, ``GPT2LMHeadModel``, ...), its configuration
as ``hf_config.json`` (every field, ``PretrainedConfig.to_json_string(use_diff=False)``)
and records the class name in ``compression.json`` under ``"base"``; ``manifest.json``
checksums it like the other files. :func:`~gblr.convert.io.load_compressed` called with
the directory alone builds that class from that configuration here: only a class taken
from the ``transformers`` namespace, never code found in the directory or on the Hub
(no ``trust_remote_code``, no ``auto_map``, no download), then fills every tensor from
the saved weights through its usual checked, all-or-nothing path.

Nothing here imports ``transformers`` before it is needed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["HF_CONFIG_FILE", "LIBRARY", "base_record", "build_base", "from_pretrained"]

#: The Hugging Face configuration of the base model, saved beside the weights.
HF_CONFIG_FILE = "hf_config.json"
#: The one library whose classes a base is rebuilt from.
LIBRARY = "transformers"


def _transformers_class(model: nn.Module) -> str | None:
    """The name under which ``transformers`` exports ``model``'s class, or None (a class of
    another library, a subclass of one's own, or a class of code loaded from a repository)."""
    cls = type(model)
    if not cls.__module__.startswith(f"{LIBRARY}."):
        return None
    transformers = sys.modules.get(LIBRARY)  # a transformers model means it is imported
    if transformers is None or getattr(transformers, cls.__name__, None) is not cls:
        return None
    return cls.__name__


def base_record(model: nn.Module) -> tuple[dict[str, Any], str] | None:
    """``(entry, config JSON)`` that let :func:`build_base` rebuild ``model``'s architecture,
    or None when it is not a ``transformers`` model (its base must then be passed to load).

    ``entry`` is ``{"library": "transformers", "class": name, "config": "hf_config.json",
    "dtype": dtype}``, the dtype of its floating-point parameters.
    """
    name = _transformers_class(model)
    config = getattr(model, "config", None)
    if name is None or not callable(getattr(config, "to_json_string", None)):
        return None
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    entry = {"library": LIBRARY, "class": name, "config": HF_CONFIG_FILE,
             "dtype": str(dtype).removeprefix("torch.")}
    return entry, config.to_json_string(use_diff=False)


def check_base_entry(entry: Any, where: str) -> dict[str, Any] | None:
    """The record's ``"base"`` entry, checked (None when the save has none)."""
    if entry is None:
        return None
    if (not isinstance(entry, dict) or entry.get("library") != LIBRARY
            or not isinstance(entry.get("class"), str) or not entry["class"].isidentifier()
            or entry.get("config") != HF_CONFIG_FILE
            or not isinstance(getattr(torch, str(entry.get("dtype")), None), torch.dtype)):
        raise ValueError(f"{where} is corrupted: its 'base' entry is not a {LIBRARY} class "
                         f"name with its {HF_CONFIG_FILE} and dtype")
    return entry


def build_base(entry: dict[str, Any], config: Any, where: str) -> nn.Module:
    """The base model of a save, built from ``transformers`` alone: the class
    ``entry["class"]`` of the ``transformers`` namespace, from the configuration ``config``
    (the parsed ``hf_config.json``), in evaluation mode and in the recorded dtype.

    Its weights are those a freshly built model gets (the caller replaces every saved one);
    the caller's random number generator is left as it was.

    Raises:
        ValueError: the class is not a model class of the installed ``transformers``, or
            the configuration does not belong to it.
    """
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{where} was saved from a {LIBRARY} model: loading it without its "
                         f"base model needs {LIBRARY} installed") from None
    name = entry["class"]
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"{where}: the base class {name!r} is not a model class of {LIBRARY} "
            f"{transformers.__version__}; pass the base model: "
            "gblr.load_compressed(base_model, directory)")
    config_cls = cls.config_class
    if not isinstance(config, dict) or config.get("model_type") != config_cls.model_type:
        kind = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{where}: {HF_CONFIG_FILE} describes a {kind!r} model, not the "
                         f"{config_cls.model_type!r} model that {name} builds")
    try:
        hf_config = config_cls.from_dict(config)
        with torch.random.fork_rng(devices=[]):
            model = cls(hf_config)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{where}: {HF_CONFIG_FILE} does not build a {name}: {err}") from None
    return model.to(getattr(torch, entry["dtype"])).eval()


def from_pretrained(directory: str | Path, *, trainable: bool = False,
                    base: nn.Module | None = None) -> nn.Module:
    """A compressed model from its directory, ready for inference (PEFT-style name).

    The architecture is rebuilt from the Hugging Face configuration saved beside the weights
    (a model compressed from a ``transformers`` model), or ``base`` is used (then required
    for other models; it is changed in place). The model is then deployed
    (:func:`gblr.deploy`: packed GBLR layers, fast and exact in evaluation mode) unless
    ``trainable=True``, which keeps the trainable structured layers. Either way it is
    returned in evaluation mode.

    Args:
        directory: a directory written by :func:`gblr.save_compressed` (or ``gblr compress``).
        trainable: keep the structured layers (to fine-tune or save again) instead of packing.
        base: the dense model it was compressed from, needed when the save holds no
            ``transformers`` configuration.

    Returns:
        The model, in evaluation mode.

    Raises:
        ValueError: not a gblr directory, a model not from ``transformers`` without
            ``base``, a class not in ``transformers``, a missing or edited file.

    Example::

        model = gblr.from_pretrained("minilm-compressed")      # deployed, eval mode
        hidden = model(**tokenizer("hello", return_tensors="pt")).last_hidden_state
    """
    from gblr.convert.io import load_compressed
    from gblr.deploy import deploy

    model = load_compressed(directory) if base is None else load_compressed(base, directory)
    model.eval()
    if not trainable:
        deploy(model)
    return model
