"""Language-model data: character- or GPT-2-BPE-level windows over local text files."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from gblr.core.validate import check_positive

__all__ = ["TokenWindows", "CharTokenizer", "text_splits", "shakespeare_dir", "bpe_encode"]


class CharTokenizer:
    """Maps the characters seen in a text to ids ``0 .. V-1`` (sorted by code point)."""

    def __init__(self, text: str) -> None:
        if not text:
            raise ValueError("cannot build a character vocabulary from an empty text")
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        try:
            return torch.tensor([self.index[c] for c in text], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class TokenWindows(Dataset):
    """Windows ``(x, y)`` of ``block_size`` tokens with ``y`` shifted by one, every ``stride``."""

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int | None = None) -> None:
        self.tokens = tokens
        self.block_size = check_positive("block_size", block_size)
        self.stride = self.block_size if stride is None else check_positive("stride", stride)
        if len(tokens) < self.block_size + 1:
            raise ValueError(
                f"text of {len(tokens)} tokens is shorter than block_size + 1 = {block_size + 1}"
            )

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride
        chunk = self.tokens[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def bpe_encode(texts: list[str]) -> tuple[list[torch.Tensor], int]:
    """GPT-2 BPE ids of each text (needs the ``gpt2`` tokenizer: network or a local HF cache)."""
    try:
        from transformers import GPT2TokenizerFast
    except ImportError as err:
        raise ImportError("BPE tokenization needs transformers: pip install 'gblr[hf]'") from err
    try:
        tok = GPT2TokenizerFast.from_pretrained("gpt2")
    except OSError as err:
        raise RuntimeError(
            "could not load the GPT-2 BPE tokenizer (no network and no local Hugging Face "
            f"cache?); use tokenizer=char offline. Cause: {err}"
        ) from err
    return [torch.tensor(tok(t)["input_ids"], dtype=torch.long) for t in texts], tok.vocab_size


def _read(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    return path.read_text(encoding="utf-8")


def text_splits(
    root: str | os.PathLike,
    block_size: int = 128,
    tokenizer: str = "char",
    files: tuple[str, str, str] = ("train.txt", "valid.txt", "test.txt"),
    max_chars: int | None = None,
) -> tuple[TokenWindows, TokenWindows, TokenWindows, dict]:
    """``(train, val, test, info)`` windows from ``root/{train,valid,test}.txt``.

    ``root`` may also be a single file, split 90/5/5. ``tokenizer`` is ``"char"`` (the
    characters of all three splits) or ``"bpe"`` (GPT-2). ``max_chars`` truncates each split
    (for quick runs).
    """
    if tokenizer not in ("char", "bpe"):
        raise ValueError(f"tokenizer must be 'char' or 'bpe', got {tokenizer!r}")
    root = Path(root)
    if root.is_file():
        text = _read(root)
        a, b = int(len(text) * 0.9), int(len(text) * 0.95)
        texts = [text[:a], text[a:b], text[b:]]
    elif root.is_dir():
        texts = [_read(root / f) for f in files]
    else:
        raise FileNotFoundError(f"text data path {str(root)!r} does not exist")
    if max_chars is not None:
        texts = [t[: check_positive("max_chars", max_chars)] for t in texts]
    if tokenizer == "char":
        tok = CharTokenizer("".join(texts))  # every split encodes, whatever it contains
        ids = [tok.encode(t) for t in texts]
        vocab = tok.vocab_size
    else:
        ids, vocab = bpe_encode(texts)
    train, val, test = (TokenWindows(t, block_size) for t in ids)
    info = {"task": "lm", "vocab_size": vocab, "block_size": block_size}
    return train, val, test, info


def shakespeare_dir() -> Path:
    """The Shakespeare corpus: ``$GBLR_SHAKESPEARE``, else ``shared/data/shakespeare`` next to
    the repository (``<repo>/../shared``) or next to any folder above it or above the cwd.

    Returns the first candidate that exists, else the ``<repo>/../shared`` path (so that an
    error message names where it was expected).
    """
    env = os.environ.get("GBLR_SHAKESPEARE")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    starts = [p for p in here.parents if (p / "pyproject.toml").exists()] or [here.parents[3]]
    bases = [*starts[0].parents, *Path.cwd().resolve().parents, Path.cwd().resolve()]
    for base in bases:
        candidate = base / "shared" / "data" / "shakespeare"
        if candidate.is_dir():
            return candidate
    return starts[0].parent / "shared" / "data" / "shakespeare"
