"""Vision Transformer (timm layout) with structured q, k, v and MLP layers, 1-D or 2-D input."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gblr.core.validate import check_positive
from gblr.models.factory import make_linear
from gblr.models.mixer import Mlp
from gblr.models.patch import PatchEmbed

__all__ = ["VisionTransformer", "Attention", "VIT_SIZES"]

#: timm sizes: name -> (dim, depth, heads)
VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


class Attention(nn.Module):
    """Self-attention with separate (structured) ``q``, ``k``, ``v`` and a dense ``proj``."""

    def __init__(self, dim: int, heads: int, linear: str, budget: float,
                 gblr: dict[str, Any] | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.q = make_linear(linear, dim, dim, budget, bias=qkv_bias, gblr=gblr)
        self.k = make_linear(linear, dim, dim, budget, bias=qkv_bias, gblr=gblr)
        self.v = make_linear(linear, dim, dim, budget, bias=qkv_bias, gblr=gblr)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, linear: str, budget: float,
                 gblr: dict[str, Any] | None, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, linear, budget, gblr)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), linear, budget, gblr, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier (class token, learned position embedding, pre-norm blocks).

    ``size`` picks a timm size (``tiny``, ``small``, ``base``, ``large``) and overrides
    ``dim``/``depth``/``heads``; any other size is given by those three. The ``linear``
    structure is used for q, k, v and both MLP layers; patch embedding, attention output
    projection and head stay dense. ``img_size``/``patch_size`` as in
    :class:`~gblr.models.mixer.MlpMixer` (an int means a 1-D signal).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        size: str | None = None,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        linear: str = "dense",
        budget: float = 1.0,
        gblr: dict[str, Any] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if size is not None:
            if size not in VIT_SIZES:
                raise ValueError(f"size must be one of {sorted(VIT_SIZES)}, got {size!r}")
            dim, depth, heads = VIT_SIZES[size]
        dim = check_positive("dim", dim)
        self.linear = linear
        self.patch = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch.num_patches + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(*[
            Block(dim, check_positive("heads", heads), mlp_ratio, linear, budget, gblr, dropout)
            for _ in range(check_positive("depth", depth))
        ])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, check_positive("num_classes", num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])
