"""MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package and cached."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

from gblr.core.files import atomic_path
from gblr.core.validate import check_positive

__all__ = ["mnist1d_splits"]


def mnist1d_splits(
    root: str | os.PathLike,
    num_samples: int = 10000,
    seed: int = 42,
    val_fraction: float = 0.1,
) -> tuple[TensorDataset, TensorDataset, TensorDataset, dict]:
    """``(train, val, test, info)`` of MNIST-1D: inputs ``(N, 40)`` float, labels ``(N,)``.

    The data set is generated with ``mnist1d.data.make_dataset`` (80/20 train/test split,
    ``seed``), cached as ``root/mnist1d_{num_samples}_{seed}.safetensors``; ``val_fraction`` of the
    training part is held out for validation. Needs no network.
    """
    num_samples = check_positive("num_samples", num_samples)
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    root = Path(root)
    path = root / f"mnist1d_{num_samples}_{seed}.safetensors"
    if path.exists():
        data = load_file(str(path))
    else:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as err:
            raise ImportError(
                "MNIST-1D needs the 'mnist1d' package: pip install 'gblr[train]'"
            ) from err
        args = get_dataset_args()
        args.num_samples = num_samples
        args.seed = seed
        raw = make_dataset(args)
        data = {
            "x": torch.as_tensor(raw["x"], dtype=torch.float32),
            "y": torch.as_tensor(raw["y"], dtype=torch.long),
            "x_test": torch.as_tensor(raw["x_test"], dtype=torch.float32),
            "y_test": torch.as_tensor(raw["y_test"], dtype=torch.long),
        }
        root.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(data, str(tmp))
    n_val = max(1, int(round(len(data["y"]) * float(val_fraction))))
    x, y = data["x"], data["y"]
    train = TensorDataset(x[:-n_val], y[:-n_val])
    val = TensorDataset(x[-n_val:], y[-n_val:])
    test = TensorDataset(data["x_test"], data["y_test"])
    info = {"task": "classify", "num_classes": 10, "in_chans": 1, "img_size": x.shape[1]}
    return train, val, test, info
