"""Lightning's advertisements and the warnings a user cannot act on, kept out of the output.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

#: Lightning messages that are advertisements or say nothing about this run
_NOISE_LOGS = ("💡 Tip", "litlogger", "litmodels", "was configured so 100% of the batches",
               "`weights_only` was not set")


#: warnings that Lightning or torch raise on every run and that the user cannot act on
_NOISE_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",
    r".*is smaller than the logging interval",
    r".*does not have many workers which may be a bottleneck",
    r".*The dirpath has changed from",
    r".*`training_step` returned `None`",
)


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _NOISE_LOGS)


#: Lightning's warning that a mid-epoch resume restarts the epoch: not so in one process, where
#: :class:`~gblr.train.callback.ResumableSampling` continues the epoch where it stopped
_RESUMABLE_WARNING = r".*resuming from a checkpoint that ended before the epoch ended"


@contextlib.contextmanager
def quiet_lightning(one_process: bool = True) -> Iterator[None]:
    """Drop Lightning's tips and known deprecation noise for the duration of a run."""
    loggers = [logging.getLogger(name) for name in (
        "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.checkpoint_connector")]
    noise = _NoiseFilter()
    for lg in loggers:
        lg.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for pattern in _NOISE_WARNINGS + ((_RESUMABLE_WARNING,) if one_process else ()):
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(noise)
