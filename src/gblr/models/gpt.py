"""GPT-2 (Hugging Face ``GPT2LMHeadModel``) with structured ``c_attn``, ``c_fc``, ``c_proj``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gblr.core.surgery import replace_modules
from gblr.layers.base import get_structure
from gblr.models.factory import PROJECTION_KEYS, make_linear

__all__ = ["fuse_gelu", "GPT", "GPT2_TARGETS", "structure_gpt2"]

#: Sub-module paths inside each ``transformer.h[i]`` block that the paper replaces.
GPT2_TARGETS = ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")


def _dense_from_conv1d(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    # HF Conv1D computes x @ weight + bias with weight stored (in, out): transpose to (out, in)
    return conv.weight.detach().t().contiguous(), (
        None if conv.bias is None else conv.bias.detach().clone()
    )


def structure_gpt2(
    model: nn.Module,
    linear: str,
    budget: float = 1.0,
    gblr: dict[str, Any] | None = None,
    project: bool = False,
) -> nn.Module:
    """Replace ``attn.c_attn``, ``mlp.c_fc`` and ``mlp.c_proj`` of every GPT-2 block in place.

    With ``project=True`` (fine-tuning) each new layer is the projection of the pretrained
    weight onto the structure (``cls.from_dense``); otherwise it is freshly initialised.
    ``linear="dense"`` leaves the model unchanged.
    """
    if linear == "dense":
        return model
    blocks = model.transformer.h if hasattr(model, "transformer") else model.h
    kwargs = ({k: v for k, v in dict(gblr or {}).items() if k in PROJECTION_KEYS}
              if linear == "gblr" else {})

    def create(_: str, conv: nn.Module) -> nn.Module:
        if project:
            weight, bias = _dense_from_conv1d(conv)
            new = get_structure(linear).from_dense(weight, budget, bias=bias, **kwargs)
        else:
            n_in, n_out = conv.weight.shape  # Conv1D: (in, out)
            new = make_linear(linear, n_in, n_out, budget, bias=conv.bias is not None,
                              gblr=gblr)
        return new.to(conv.weight.device, conv.weight.dtype)

    targets = [(f"{i}.{path}", block.get_submodule(path))
               for i, block in enumerate(blocks) for path in GPT2_TARGETS]
    replace_modules(blocks, targets, create)
    return model


def fuse_gelu(model: nn.Module) -> int:
    """Replace GPT-2's tanh GELU written as separate element-wise operations
    (``NewGELUActivation``, ``gelu_new``) by PyTorch's fused ``nn.GELU(approximate="tanh")``:
    the same function (to float rounding), in one kernel. It took 0.44 of a small GPT's
    forward pass on CPU (200 ms -> 112 ms, batch 32 x 64, 4 layers of 128, one thread), a
    cost every structure paid alike. Returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m).__name__ == "NewGELUActivation"]
    replace_modules(model, targets, lambda *_: nn.GELU(approximate="tanh"))
    return len(targets)


class GPT(nn.Module):
    """Causal language model: ``GPT2LMHeadModel(GPT2Config(**config))`` with structured layers.

    ``forward(idx)`` returns logits ``(B, T, vocab)``. ``pretrained`` names a Hugging Face
    checkpoint (e.g. ``"gpt2"``; downloads when online) whose layers are projected onto the
    structure instead of initialised afresh.
    """

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        dropout: float = 0.0,
        linear: str = "dense",
        budget: float = 1.0,
        gblr: dict[str, Any] | None = None,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.linear = linear
        if pretrained:
            try:
                lm = GPT2LMHeadModel.from_pretrained(pretrained)
            except OSError as err:
                raise RuntimeError(
                    f"could not load pretrained GPT-2 {pretrained!r} (offline, or no such "
                    f"checkpoint): {err}"
                ) from err
        else:
            config = GPT2Config(
                vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                bos_token_id=min(50256, vocab_size - 1), eos_token_id=min(50256, vocab_size - 1),
            )
            lm = GPT2LMHeadModel(config)
        fuse_gelu(lm)
        self.lm = structure_gpt2(lm, linear, budget, gblr, project=bool(pretrained))
        self.n_positions = self.lm.config.n_positions

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or idx.shape[1] > self.n_positions:
            raise ValueError(
                f"expected token ids (B, T) with T <= {self.n_positions}, got {tuple(idx.shape)}"
            )
        return self.lm(input_ids=idx, use_cache=False).logits
