"""Data sets for the training runner: each builder returns ``(train, val, test, info)``."""

from gblr.data.corpus import default_corpus_path
from gblr.data.mnist1d import mnist1d_splits
from gblr.data.sampler import EpochShuffleSampler
from gblr.data.text import CharTokenizer, TokenWindows, shakespeare_dir, text_splits
from gblr.data.vision import cifar_splits, imagenet_splits
from gblr.data.wikitext import wikitext103_splits

__all__ = [
    "default_corpus_path",
    "mnist1d_splits",
    "EpochShuffleSampler",
    "CharTokenizer",
    "TokenWindows",
    "shakespeare_dir",
    "text_splits",
    "cifar_splits",
    "imagenet_splits",
    "wikitext103_splits",
]
