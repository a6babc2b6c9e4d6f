"""A shuffling sampler whose order depends only on (seed, epoch), so resumed runs replay it."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochShuffleSampler"]


class EpochShuffleSampler(Sampler[int]):
    """Random permutation of ``range(n)`` drawn from ``seed + epoch``.

    Lightning calls :meth:`set_epoch` at the start of every epoch (as for
    ``DistributedSampler``), so a run resumed from a checkpoint sees the same order as the
    uninterrupted run, unlike a ``RandomSampler`` fed by the global RNG.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        if int(n) <= 0:
            raise ValueError(f"n must be positive, got {n!r}")
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n
