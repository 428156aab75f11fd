"""Speech captions for the refiner: a thin layer over :mod:`lavis_c2f.video.captions`.

The ``.srt`` parser and the ``Caption(start, end, text)`` type are the package's shared ones
(:mod:`lavis_c2f.video.captions`: BOM, CRLF, missing blank lines, ``,``/``.`` milliseconds;
``DataFormatError`` naming file and line, or skip-and-count). This module only adds what the
prompt needs: markup-free one-line text (HTML-like tags such as ``<i>`` and ``{\\an8}``
override codes removed, lines joined), no empty captions, time order, and merging of repeated
lines. :func:`load_captions` is the refiner's single entry point.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, List, Sequence

from lavis_c2f.video.captions import Caption, read_srt_result

__all__ = ["Caption", "clean_text", "clean_captions", "load_captions", "merge_repeats"]

_TAG = re.compile(r"<[^>]*>|\{\\[^}]*\}")
_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """One line without markup tags and with single spaces."""
    return _SPACES.sub(" ", _TAG.sub(" ", text)).strip()


def clean_captions(captions: Iterable[Caption]) -> List[Caption]:
    """Captions with :func:`clean_text` applied, empty ones dropped, sorted by (start, end)."""
    out = []
    for c in captions:
        text = clean_text(c.text)
        if text:
            out.append(Caption(float(c.start), float(c.end), text))
    out.sort(key=lambda c: (c.start, c.end))
    return out


def load_captions(path: "str | os.PathLike", strict: bool = False) -> List[Caption]:
    """Clean captions of an ``.srt`` file. ``strict``: a malformed cue raises
    :class:`~lavis_c2f.common.errors.DataFormatError` (file, line); otherwise it is skipped
    (and logged). A missing file always raises."""
    res = read_srt_result(path, errors="raise" if strict else "skip")
    return clean_captions(res.captions)


def merge_repeats(captions: Sequence[Caption], gap: float = 0.0) -> List[Caption]:
    """Merge consecutive captions with the same text whose gap is at most ``gap`` seconds
    (auto-generated subtitles often repeat a line across adjacent cues, as CALCE notes)."""
    out: List[Caption] = []
    for c in captions:
        if out and out[-1].text == c.text and c.start - out[-1].end <= gap:
            out[-1] = Caption(out[-1].start, max(out[-1].end, c.end), c.text)
        else:
            out.append(c)
    return out
