"""Image data through torchvision: CIFAR-10/100 and an ImageNet folder."""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset, random_split

__all__ = ["cifar_splits", "imagenet_splits"]


def _torchvision():
    try:
        import torchvision
        from torchvision import transforms
    except ImportError as err:
        raise ImportError(
            "CIFAR and ImageNet data need torchvision: pip install torchvision"
        ) from err
    return torchvision, transforms


def cifar_splits(
    root: str | os.PathLike, name: str = "cifar10", download: bool = True, val_size: int = 5000,
    seed: int = 0,
) -> tuple[Dataset, Dataset, Dataset, dict]:
    """``(train, val, test, info)`` of CIFAR-10 or CIFAR-100 (torchvision format under ``root``).

    Downloads when ``download`` and online; offline with no copy on disk it raises a
    ``RuntimeError`` that says so. ``val_size`` training images are held out for validation.
    """
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    import torch

    torchvision, T = _torchvision()
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(mean, std)])
    test_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    try:
        train_full = cls(str(root), train=True, download=download, transform=train_tf)
        test = cls(str(root), train=False, download=download, transform=test_tf)
    except (RuntimeError, OSError) as err:
        raise RuntimeError(
            f"{name} is not under {str(root)!r} and could not be downloaded "
            f"(offline?): {err}"
        ) from err
    gen = torch.Generator().manual_seed(seed)
    train, val = random_split(train_full, [len(train_full) - val_size, val_size], generator=gen)
    info = {"task": "classify", "num_classes": 10 if name == "cifar10" else 100, "in_chans": 3,
            "img_size": [32, 32]}
    return train, val, test, info


def imagenet_splits(
    root: str | os.PathLike, img_size: int = 224
) -> tuple[Dataset, Dataset, Dataset, dict]:
    """``(train, val, val, info)`` of an ImageNet folder ``root/{train,val}/<class>/*``."""
    root = Path(root)
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(
                f"ImageNet folder {str(root / sub)!r} does not exist (expected root/train and "
                "root/val with one sub-folder per class)"
            )
    torchvision, T = _torchvision()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train_tf = T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(mean, std)])
    val_tf = T.Compose([T.Resize(int(img_size * 256 / 224)), T.CenterCrop(img_size),
                        T.ToTensor(), T.Normalize(mean, std)])
    train = torchvision.datasets.ImageFolder(str(root / "train"), transform=train_tf)
    val = torchvision.datasets.ImageFolder(str(root / "val"), transform=val_tf)
    info = {"task": "classify", "num_classes": len(train.classes), "in_chans": 3,
            "img_size": [img_size, img_size]}
    return train, val, val, info
