"""Patch embedding for 1-D signals and 2-D images."""

from __future__ import annotations

import torch
from torch import nn

from gblr.core.validate import check_positive

__all__ = ["PatchEmbed"]


def _pair(value: int | tuple[int, ...] | list[int], name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (check_positive(name, value),)
    values = tuple(check_positive(name, v) for v in value)
    if len(values) not in (1, 2):
        raise ValueError(f"{name} must be an int (1-D) or a pair (2-D), got {value!r}")
    return values


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected to ``dim``: a strided Conv1d (1-D) or Conv2d (2-D).

    Output ``(B, num_patches, dim)``. A 1-D input may be ``(B, L)`` (one channel) or
    ``(B, C, L)``.
    """

    def __init__(self, img_size: int | tuple[int, ...], patch_size: int | tuple[int, ...],
                 in_chans: int, dim: int) -> None:
        super().__init__()
        size = _pair(img_size, "img_size")
        patch = _pair(patch_size, "patch_size")
        if len(patch) == 1 and len(size) == 2:
            patch = patch * 2
        if len(patch) != len(size):
            raise ValueError(f"patch_size {patch_size!r} does not match img_size {img_size!r}")
        for s, p in zip(size, patch, strict=True):
            if s % p:
                raise ValueError(f"patch_size {patch} must divide img_size {size}")
        self.img_size, self.patch_size = size, patch
        self.in_chans = check_positive("in_chans", in_chans)
        self.num_patches = 1
        for s, p in zip(size, patch, strict=True):
            self.num_patches *= s // p
        conv = nn.Conv1d if len(size) == 1 else nn.Conv2d
        self.proj = conv(self.in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.img_size) == 1 and x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 2 + len(self.img_size) or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"expected input (B, {self.in_chans}, *{self.img_size}), got {tuple(x.shape)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)
