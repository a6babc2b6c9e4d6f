"""A shuffling sampler whose order depends only on (seed, epoch), so resumed runs replay it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["EpochShuffleSampler"]


class EpochShuffleSampler(Sampler[int]):
    """Random permutation of ``range(n)`` drawn from ``seed + epoch``.

    Lightning calls :meth:`set_epoch` at the start of every epoch (as for
    ``DistributedSampler``), so a run resumed from a checkpoint sees the same order as the
    uninterrupted run, unlike a ``RandomSampler`` fed by the global RNG.

    A checkpoint taken in the middle of an epoch stores :meth:`state_dict` with the number of
    samples already consumed in that epoch; after :meth:`load_state_dict`, the next iteration
    over that same epoch skips them, so the resumed run sees exactly the samples the
    uninterrupted run would have seen next.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        if int(n) <= 0:
            raise ValueError(f"n must be positive, got {n!r}")
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples consumed in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self, consumed: int = 0) -> dict[str, Any]:
        """The order's state: ``seed``, ``epoch`` and the samples ``consumed`` in that epoch."""
        consumed = int(consumed)
        if not 0 <= consumed <= self.n:
            raise ValueError(f"consumed must be in [0, {self.n}], got {consumed}")
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "consumed": consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the next pass over the saved epoch skips what was used."""
        missing = {"n", "seed", "epoch", "consumed"} - set(state)
        if missing:
            raise KeyError(f"sampler state lacks {sorted(missing)}")
        if int(state["n"]) != self.n:
            raise ValueError(
                f"the checkpoint's data set had {int(state['n'])} training samples, this one has "
                f"{self.n}: resume with the same data"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        consumed = int(state["consumed"])
        self._resume = (self.epoch, consumed) if consumed > 0 else None

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=gen)
        if self._resume is not None:
            epoch, consumed = self._resume
            self._resume = None  # only the first pass after a resume is shortened
            if epoch == self.epoch:
                order = order[consumed:]
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n
