"""Speech captions from ``.srt`` files (SubRip), for the stage-3 refiner.

NOTE: ``lavis_c2f.video.captions`` (another part of the package) is meant to own ``.srt``
parsing; it did not exist when the refiner was written, so this module holds the refiner's own
parser. :func:`load_captions` is the single entry point the refiner uses, so switching to the
shared parser later is a one-function change.

SubRip blocks look like::

    12
    00:01:02,500 --> 00:01:04,000
    first line of text
    second line

A block is an optional numeric index line, a time line ``HH:MM:SS,mmm --> HH:MM:SS,mmm``
(``.`` accepted for ``,``; hours may have any number of digits; missing milliseconds are 0;
trailing position hints such as ``X1:...`` are ignored) and one or more text lines, separated
by blank lines. A UTF-8 byte-order mark and ``\\r\\n`` line ends are accepted. Simple HTML-like
tags (``<i>``, ``<font ...>``) and ``{\\an8}``-style override codes are removed from the text.

Strict mode (``strict=True``) raises :class:`~lavis_c2f.common.errors.DataFormatError` naming
the file, the 1-based line and the field (``time``, ``text``) for the first malformed block.
Lenient mode (default) skips malformed blocks (bad time line, ``end < start``, empty text) and
counts them in :attr:`CaptionFile.n_skipped`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

from lavis_c2f.common.errors import DataFormatError

_TIME = r"(\d+):(\d{1,2}):(\d{1,2})(?:[,.](\d{1,3}))?"
_TIME_LINE = re.compile(r"^\s*" + _TIME + r"\s*-->\s*" + _TIME + r"(?:\s+.*)?$")
_TAG = re.compile(r"<[^>]*>|\{\\[^}]*\}")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Caption:
    """One speech caption: ``start`` and ``end`` in seconds, ``text`` one line."""

    start: float
    end: float
    text: str


@dataclass
class CaptionFile:
    """Parsed captions of one file, sorted by start time, plus what was skipped."""

    captions: List[Caption] = field(default_factory=list)
    n_skipped: int = 0
    problems: List[str] = field(default_factory=list)


def _seconds(h: str, m: str, s: str, ms: Optional[str]) -> float:
    frac = 0.0
    if ms:
        frac = int(ms) / (10 ** len(ms))
    return int(h) * 3600 + int(m) * 60 + int(s) + frac


def parse_time_line(line: str) -> Optional[Tuple[float, float]]:
    """``(start, end)`` seconds of an SRT time line, or None when it is not one."""
    m = _TIME_LINE.match(line)
    if not m:
        return None
    g = m.groups()
    if int(g[1]) > 59 or int(g[2]) > 59 or int(g[5]) > 59 or int(g[6]) > 59:
        return None
    return _seconds(*g[0:4]), _seconds(*g[4:8])


def clean_text(lines: Iterable[str]) -> str:
    """Join text lines into one line without markup tags and with single spaces."""
    return _SPACES.sub(" ", _TAG.sub(" ", " ".join(lines))).strip()


def parse_srt(text: str, source: str = "<string>", strict: bool = False) -> CaptionFile:
    """Parse SRT ``text`` (see module doc). ``source`` names the file in errors."""
    out = CaptionFile()
    lines = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")

    def problem(msg: str, line: int, fld: str) -> None:
        if strict:
            raise DataFormatError(msg, path=source, line=line, field=fld)
        out.n_skipped += 1
        out.problems.append(f"{source}:{line}: {msg}")

    i, n = 0, len(lines)
    while i < n:
        if not lines[i].strip():
            i += 1
            continue
        block_start = i
        block: List[Tuple[int, str]] = []
        while i < n and lines[i].strip():
            block.append((i + 1, lines[i].strip()))
            i += 1
        # optional index line, then the time line
        k = 0
        if block[0][1].isdigit() and len(block) > 1:
            k = 1
        lineno, time_line = block[k]
        times = parse_time_line(time_line)
        if times is None:
            problem(f"expected 'HH:MM:SS,mmm --> HH:MM:SS,mmm', got {time_line[:60]!r}", lineno, "time")
            continue
        start, end = times
        if end < start:
            problem(f"caption ends ({end:.3f} s) before it starts ({start:.3f} s)", lineno, "time")
            continue
        body = clean_text(t for _, t in block[k + 1:])
        if not body:
            problem("caption has no text", block_start + 1, "text")
            continue
        out.captions.append(Caption(float(start), float(end), body))
    out.captions.sort(key=lambda c: (c.start, c.end))
    return out


def read_srt(path: "str | os.PathLike", strict: bool = False) -> CaptionFile:
    """Parse an ``.srt`` file (UTF-8; undecodable bytes are replaced). A missing file raises
    :class:`DataFormatError` naming it."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataFormatError("caption file not found", path=path)
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        return parse_srt(f.read(), source=path, strict=strict)


def load_captions(path: "str | os.PathLike", strict: bool = False) -> List[Caption]:
    """Captions of an ``.srt`` file sorted by start (the refiner's single entry point)."""
    return read_srt(path, strict=strict).captions


def merge_repeats(captions: Sequence[Caption], gap: float = 0.0) -> List[Caption]:
    """Merge consecutive captions with the same text whose gap is at most ``gap`` seconds
    (auto-generated subtitles often repeat a line across adjacent blocks, as CALCE notes)."""
    out: List[Caption] = []
    for c in captions:
        if out and out[-1].text == c.text and c.start - out[-1].end <= gap:
            out[-1] = Caption(out[-1].start, max(out[-1].end, c.end), c.text)
        else:
            out.append(c)
    return out
