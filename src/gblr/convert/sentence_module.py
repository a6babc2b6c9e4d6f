"""The sentence-transformers module of a compressed model (needs sentence-transformers >= 6).

``modules.json`` of a directory written by :func:`gblr.save_sentence_transformer` names
:class:`CompressedTransformer` as its first module; sentence-transformers imports it from
here (it asks for ``trust_remote_code=True`` to import any class outside its package) and
calls its ``load``. See :mod:`gblr.convert.sentence`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sentence_transformers
from sentence_transformers.base.modules.transformer import Transformer
from torch import nn

from gblr.convert.hub import from_pretrained

__all__ = ["CompressedTransformer"]

if int(sentence_transformers.__version__.split(".")[0]) < 6:  # pragma: no cover
    raise ImportError(f"gblr's CompressedTransformer needs sentence-transformers >= 6, found "
                      f"{sentence_transformers.__version__}")

_KWARGS = ("model_kwargs", "processor_kwargs", "config_kwargs")


class CompressedTransformer(Transformer):
    """A sentence-transformers ``Transformer`` whose model is a gblr compressed model.

    It loads like the ``Transformer`` it replaces (tokenizer, ``sentence_bert_config.json``,
    maximum sequence length), but builds the model with :func:`gblr.from_pretrained`: the
    architecture from the checksummed ``hf_config.json``, the weights from gblr's
    ``model.safetensors``, then deployed (packed GBLR layers), in evaluation mode. Only a
    local directory and the ``"torch"`` backend are supported; ``trust_remote_code`` is
    never passed on to ``transformers``. It cannot be saved again (its layers are packed):
    save the trainable model with :func:`gblr.save_sentence_transformer` instead.

    Example::

        model = SentenceTransformer("minilm-compressed", trust_remote_code=True)
        model.encode(["A sentence."])
    """

    @classmethod
    def _load_init_kwargs(cls, model_name_or_path: str, **kwargs: Any) -> dict[str, Any]:
        init_kwargs = super()._load_init_kwargs(model_name_or_path, **kwargs)
        for key in _KWARGS:  # nothing from the directory or the caller runs remote code
            init_kwargs[key]["trust_remote_code"] = False
        return init_kwargs

    def _load_config(self, model_name_or_path: str, backend: str,
                     config_kwargs: dict[str, Any]) -> tuple[Any, bool]:
        if backend != "torch":
            raise ValueError("a gblr compressed model runs on the 'torch' backend, "
                             f"not {backend!r}")
        if config_kwargs.get("subfolder"):
            raise ValueError("gblr's CompressedTransformer is stored at the root of the model "
                             f"directory, not in {config_kwargs['subfolder']!r}")
        if not Path(model_name_or_path).is_dir():
            raise ValueError(f"{model_name_or_path!r} is not a local directory: gblr loads "
                             "compressed models from disk only (download the repository first)")
        model = from_pretrained(model_name_or_path)
        self.__dict__["_gblr_model"] = model  # kept off the module tree until _load_model
        return model.config, False

    def _load_model(self, model_name_or_path: str, transformer_task: str, config: Any,
                    backend: str, is_peft_model: bool, **model_kwargs: Any) -> nn.Module:
        model = self.__dict__.pop("_gblr_model")
        if transformer_task != "feature-extraction":
            raise ValueError(f"a gblr compressed model computes features, not {transformer_task!r}")
        return model

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "a CompressedTransformer holds deployed (packed) layers and cannot be saved again; "
            "save the compressed model with gblr.save_sentence_transformer(model, source, "
            "directory), or load it with gblr.from_pretrained(directory, trainable=True) first")
