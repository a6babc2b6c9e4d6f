"""The default text corpus shipped with gblr.

``shakespeare_sample.txt`` is a 200 KB slice of public-domain Project Gutenberg
text (all of *Julius Caesar* and the first half of *King Lear*, by William
Shakespeare), the default corpus of ``gblr compress``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_corpus_path"]


def default_corpus_path() -> Path:
    """Path of the text file ``gblr compress`` distils on when no ``--text`` is given."""
    return Path(__file__).with_name("shakespeare_sample.txt")
