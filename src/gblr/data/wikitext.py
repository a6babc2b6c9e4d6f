"""WikiText-103 through Hugging Face ``datasets``, GPT-2 BPE tokenized."""

from __future__ import annotations

from gblr.data.text import TokenWindows, bpe_encode

__all__ = ["wikitext103_splits"]


def wikitext103_splits(
    block_size: int = 1024, name: str = "wikitext-103-raw-v1"
) -> tuple[TokenWindows, TokenWindows, TokenWindows, dict]:
    """``(train, val, test, info)`` of WikiText-103 (downloaded on first use; error offline)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("WikiText-103 needs the 'datasets' package: pip install datasets") \
            from err
    try:
        raw = datasets.load_dataset("wikitext", name)
    except Exception as err:  # datasets raises several types when offline
        raise RuntimeError(
            f"could not load WikiText-103 ({name!r}) through datasets (offline and not "
            f"cached?): {err}"
        ) from err
    texts = ["".join(raw[split]["text"]) for split in ("train", "validation", "test")]
    ids, vocab = bpe_encode(texts)
    train, val, test = (TokenWindows(t, block_size) for t in ids)
    return train, val, test, {"task": "lm", "vocab_size": vocab, "block_size": block_size}
