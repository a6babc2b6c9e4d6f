"""MLP-Mixer (Tolstikhin et al. 2021) with structured token and channel MLPs, 1-D or 2-D input."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gblr.core.validate import check_positive
from gblr.models.factory import make_linear
from gblr.models.patch import PatchEmbed

__all__ = ["MlpMixer", "Mlp"]


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``; ``fc1`` and ``fc2`` are built by :func:`make_linear`."""

    def __init__(self, dim: int, hidden: int, linear: str, budget: float,
                 gblr: dict[str, Any] | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = make_linear(linear, dim, hidden, budget, gblr=gblr)
        self.act = nn.GELU()
        self.fc2 = make_linear(linear, hidden, dim, budget, gblr=gblr)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int,
                 linear: str, budget: float, gblr: dict[str, Any] | None, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = Mlp(tokens, token_hidden, linear, budget, gblr, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, channel_hidden, linear, budget, gblr, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MlpMixer(nn.Module):
    """MLP-Mixer classifier; the token and channel MLPs use the ``linear`` structure.

    ``img_size`` is an int for 1-D signals of that length (input ``(B, C, L)`` or ``(B, L)``)
    or a pair for images (``(B, C, H, W)``); ``patch_size`` likewise. The patch embedding and
    the head stay dense, as in the paper.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        dim: int = 512,
        depth: int = 8,
        token_hidden: int = 256,
        channel_hidden: int = 2048,
        linear: str = "dense",
        budget: float = 1.0,
        gblr: dict[str, Any] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.linear = linear
        self.patch = PatchEmbed(img_size, patch_size, in_chans, check_positive("dim", dim))
        tokens = self.patch.num_patches
        self.blocks = nn.Sequential(*[
            MixerBlock(tokens, dim, check_positive("token_hidden", token_hidden),
                       check_positive("channel_hidden", channel_hidden), linear, budget, gblr,
                       dropout)
            for _ in range(check_positive("depth", depth))
        ])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, check_positive("num_classes", num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.patch(x))
        return self.head(self.norm(x).mean(dim=1))
