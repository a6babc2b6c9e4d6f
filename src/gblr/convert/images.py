"""Images for distilling and evaluating image models (ViT): a folder of files as tensors."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["IMAGE_SUFFIXES", "read_images", "image_batches"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_images(directory: str | Path, image_size: int, num_channels: int = 3) -> torch.Tensor:
    """Every image file in ``directory`` (recursively), resized to ``image_size`` squared.

    Returns ``(N, num_channels, image_size, image_size)`` float32 scaled to ``[-1, 1]``
    (mean 0.5, std 0.5, the ViT convention). Raises a ``ValueError`` when the folder is
    missing or holds fewer than 2 images.
    """
    from PIL import Image

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--images {str(directory)!r} is not a directory")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"--images {str(directory)!r} holds fewer than 2 image files")
    mode = {1: "L", 3: "RGB"}.get(num_channels)
    if mode is None:
        raise ValueError(f"images with {num_channels} channels are not supported")
    out = torch.empty(len(files), num_channels, image_size, image_size)
    for i, path in enumerate(files):
        with Image.open(path) as im:
            im = im.convert(mode).resize((image_size, image_size), Image.BILINEAR)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        pixels = data.reshape(image_size, image_size, num_channels).permute(2, 0, 1).float()
        out[i] = (pixels / 255.0 - 0.5) / 0.5
    return out


def image_batches(
    images: torch.Tensor, batch_size: int = 16, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled ``{"pixel_values": ...}`` batches (reshuffled every epoch)."""
    if images.shape[0] == 0:
        raise ValueError("no images to make batches from")
    rng = random.Random(seed)
    order = list(range(images.shape[0]))
    size = min(batch_size, len(order))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield {"pixel_values": images[order[i:i + size]]}
