"""Progress bars that suit both a terminal and a log file.

:func:`progress_bar` is tqdm on a terminal. When the stream is not a terminal (a file, a pipe, a
CI log) a redrawn bar would leave a carriage-return line per update; there the bar prints whole
lines instead, at most one every :func:`log_interval` seconds (``C2F_PROGRESS_INTERVAL``,
default 30), and nothing for work that ends sooner: a short training epoch leaves only the
runner's one log line per epoch, a long extraction a line every interval and a final one.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Optional, TextIO

from tqdm.auto import tqdm

ENV_INTERVAL = "C2F_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def log_interval() -> float:
    """Seconds between two lines of a bar written to a non-terminal (``C2F_PROGRESS_INTERVAL``)."""
    try:
        return max(0.0, float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def is_terminal(stream: Optional[TextIO]) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return False


class _Lines:
    """A text stream for tqdm that turns each redraw (``"\\r" + bar``) into one line, and
    drops a redraw whose count did not change (a postfix update, the final redraw of close)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._last = None

    def write(self, s: str) -> None:
        text = s.replace("\r", "").rstrip()
        key = text.split("[", 1)[0]
        if text and key != self._last:
            self._last = key
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Optional[Iterable[Any]] = None, *, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", enabled: bool = True, leave: bool = False, file: Optional[TextIO] = None,
                 interval: Optional[float] = None):
    """A tqdm bar over ``iterable`` (or a manual one with ``total``).

    Args:
        enabled: False gives a bar that prints nothing (tqdm's ``disable``).
        leave: keep the finished bar on a terminal (on a non-terminal the last line stays).
        file: the stream (default ``sys.stderr``).
        interval: seconds between lines on a non-terminal (default :func:`log_interval`).
    """
    stream = file if file is not None else sys.stderr
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=stream)
    every = log_interval() if interval is None else float(interval)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=True, file=_Lines(stream), ncols=100,
                ascii=True, mininterval=every, maxinterval=max(every, 1.0), delay=every, miniters=1)


__all__ = ["progress_bar", "log_interval", "is_terminal"]
