"""Progress for long work: a bar on a terminal, plain periodic lines when output is redirected.

``tqdm`` redraws its bar with carriage returns, which fills a redirected log with hundreds
of kilobytes of updates; :func:`progress` gives a tqdm bar only when stderr is a terminal and
otherwise prints one line every ``every`` seconds (and a last one when done):
``desc: 120/500 (24%) | loss=0.42 | 1m05s elapsed, eta 3m26s``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

__all__ = ["progress", "LineProgress", "LINE_EVERY"]

#: Seconds between two progress lines when the output is not a terminal.
LINE_EVERY = 30.0


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class LineProgress:
    """The part of tqdm's interface gblr uses, printing plain lines (no carriage returns)."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None,
                 desc: str = "", unit: str = "it", every: float = LINE_EVERY,
                 file: TextIO | None = None) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.every = total, desc, unit, float(every)
        self.n = 0
        self.postfix = ""
        self.file = file or sys.stderr
        self._start = self._last = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _line(self) -> str:
        elapsed = time.monotonic() - self._start
        if self.total:
            done = f"{self.n}/{self.total} {self.unit} ({self.n / self.total:.0%})"
            eta = (f", eta {_clock(elapsed / self.n * (self.total - self.n))}"
                   if 0 < self.n < self.total else "")
        else:
            done, eta = f"{self.n} {self.unit}", ""
        post = f" | {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done}{post} | {_clock(elapsed)} elapsed{eta}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            print(self._line(), file=self.file, flush=True)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """Nothing to redraw: lines are printed as they come."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            print(self._line(), file=self.file, flush=True)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", disable: bool = False, leave: bool = True, **kwargs: Any):
    """A progress bar (``tqdm``) on a terminal, :class:`LineProgress` otherwise, or a silent
    pass-through with ``disable``. ``kwargs`` go to tqdm (ignored by the line printer)."""
    if disable:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True)
    if getattr(sys.stderr, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, **kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit)
