"""Text for distillation and evaluation: a file cut into passages, passages into token batches."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["read_passages", "split_passages", "token_batches", "encode"]


def read_passages(path: str | Path, words_per_passage: int = 48) -> list[str]:
    """Cut a UTF-8 text file into passages of about ``words_per_passage`` words.

    Consecutive non-empty lines are joined; a blank line or the word limit ends a passage.
    Raises a ``ValueError`` for a missing, unreadable or empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"text file {str(path)!r} is not UTF-8 text") from None
    passages: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if len(current) >= 4:
            passages.append(" ".join(current))
        current.clear()

    for line in text.splitlines():
        words = line.split()
        if not words:
            flush()
            continue
        current.extend(words)
        if len(current) >= words_per_passage:
            flush()
    flush()
    if len(passages) < 2:
        raise ValueError(f"text file {str(path)!r} holds fewer than 2 passages of text")
    return passages


def split_passages(
    passages: Sequence[str], held_out: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split into (training, held-out) passages: a contiguous held-out block at a seeded spot."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out!r}")
    n = len(passages)
    n_out = max(1, int(round(n * held_out)))
    if n_out >= n:
        raise ValueError(f"too few passages ({n}) to hold out {held_out:.0%}")
    start = random.Random(seed).randrange(0, n - n_out + 1)
    held = list(passages[start:start + n_out])
    train = list(passages[:start]) + list(passages[start + n_out:])
    return train, held


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` into a padded batch of ``input_ids`` and ``attention_mask``."""
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = getattr(tokenizer, "eos_token", None) or tokenizer.unk_token
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def token_batches(
    tokenizer: Any, passages: Sequence[str], batch_size: int = 16, max_length: int = 128,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of tokenized passages (reshuffled every epoch)."""
    if not passages:
        raise ValueError("no passages to make batches from")
    rng = random.Random(seed)
    order = list(range(len(passages)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1,
                       batch_size):
            yield encode(tokenizer, [passages[j] for j in order[i:i + batch_size]], max_length)
