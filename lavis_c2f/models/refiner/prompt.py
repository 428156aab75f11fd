"""Prompt construction of the refiner (pure Python; no model needed).

Encoder input of one sample (CALCE / Mr. BLIP style, frames interleaved with timestamps)::

    <frame 0> t=12s speech: "so we start here" <frame 1> t=16s <frame 2> t=20s ... duration=150s
    Query: a man cuts vegetables
    Coarse windows: [[10, 24]]
    Search region: [[4, 30]]
    Given the video frames with their timestamps and speech, find the windows relevant to the query.
    Relevant windows:

``<frame i>`` stands for the ``num_query_token`` Q-Former outputs of key frame ``i`` projected
into T5's embedding space; every text piece is T5-tokenised on its own (no special tokens) and
the last one ends with ``</s>``. :class:`RefinerPrompt` keeps the pieces as ``segments``: an
``int`` is a frame index, a ``str`` a text piece; :func:`render_prompt` writes them as one
string with ``<frame>`` placeholders (what the tests compare against).

Times in the prompt and in the answer are seconds written by :func:`format_time` with
``time_decimals`` decimals (0: integers as Mr. BLIP's ``seconds_integers``).

Speech captions are *aligned to frames*: each caption that overlaps the search region is
written right after the timestamp of the key frame nearest to where the caption starts inside
the region (ties: the earlier frame). At most ``max_captions`` captions are kept (those sharing
most words with the query, then the earliest), each cut to ``max_caption_words`` words.

Target (training) and expected generation: :func:`format_windows`, e.g. ``[[12, 30], [40, 52]]``;
``[]`` when no ground-truth window overlaps the search region.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import check_keys

Segment = Union[int, str]
FRAME_PLACEHOLDER = "<frame>"
_WORD = re.compile(r"[a-z0-9']+")
_STOP = frozenset("a an the of to in on at and or is are was were be it this that with for by "
                  "from as his her their its he she they we you i".split())


@dataclass(frozen=True)
class PromptConfig:
    """How the prompt is written (stored in the model config).

    Attributes:
        time_decimals: decimals of every time in the prompt and the answer (0 = integers).
        frame_time_template: text after each frame; ``{t}`` is the formatted time.
        caption_template: text of one caption; ``{text}`` is the caption.
        duration_template: text closing the video part; ``{d}`` the formatted duration ("" = none).
        include_reference: write the stage-2 windows ("Coarse windows: ...").
        include_region: write the search region ("Search region: ...").
        max_captions: captions kept per sample (0 = no speech in the prompt).
        max_caption_words: words kept per caption.
        max_query_words: words kept of the query (the instruction after it is never cut).
        task_prompt: the instruction closing the prompt.
    """

    time_decimals: int = 0
    frame_time_template: str = "t={t}s"
    caption_template: str = 'speech: "{text}"'
    duration_template: str = "duration={d}s"
    include_reference: bool = True
    include_region: bool = True
    max_captions: int = 8
    max_caption_words: int = 24
    max_query_words: int = 48
    task_prompt: str = ("Given the video frames with their timestamps and speech, find the windows "
                        "relevant to the query.\nRelevant windows:")

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]], where: str = "model.prompt") -> "PromptConfig":
        """Build from a mapping; unknown keys and bad types raise :class:`ConfigError`."""
        cfg = check_keys(cfg, {f.name for f in fields(cls)}, where)
        defaults = cls()
        for k, v in cfg.items():
            want = type(getattr(defaults, k))
            if want is int and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"{where}.{k}: expected a non-negative integer, got {v!r}")
            if want is bool and not isinstance(v, bool):
                raise ConfigError(f"{where}.{k}: expected true/false, got {v!r}")
            if want is str and not isinstance(v, str):
                raise ConfigError(f"{where}.{k}: expected a string, got {v!r}")
        out = cls(**cfg)
        if "{t}" not in out.frame_time_template:
            raise ConfigError(f"{where}.frame_time_template must contain '{{t}}'")
        if "{text}" not in out.caption_template:
            raise ConfigError(f"{where}.caption_template must contain '{{text}}'")
        if out.duration_template and "{d}" not in out.duration_template:
            raise ConfigError(f"{where}.duration_template must contain '{{d}}' (or be empty)")
        return out

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class RefinerPrompt:
    """Prompt pieces of one sample: ``segments`` (int = frame index, str = text)."""

    segments: List[Segment]
    n_captions: int = 0

    @property
    def text(self) -> str:
        return render_prompt(self.segments)


def format_time(t: float, decimals: int = 0) -> str:
    """Seconds as prompt text: ``12`` (decimals 0, round half to even) or ``12.5``."""
    if not math.isfinite(t):
        raise ValueError(f"time must be finite, got {t}")
    if decimals == 0:
        return str(int(round(t)))
    return f"{t:.{decimals}f}"


def format_windows(windows: Sequence[Sequence[float]], decimals: int = 0) -> str:
    """``[[st, ed], ...]`` as the answer text, e.g. ``[[12, 30], [40, 52]]``; ``[]`` if none."""
    return "[" + ", ".join(f"[{format_time(w[0], decimals)}, {format_time(w[1], decimals)}]"
                           for w in windows) + "]"


def render_prompt(segments: Sequence[Segment]) -> str:
    """Segments as one string, frames as ``<frame>``, pieces joined by single spaces."""
    return " ".join(FRAME_PLACEHOLDER if isinstance(s, int) else s for s in segments)


def _valid_windows(windows: Optional[Sequence[Sequence[float]]]) -> List[Tuple[float, float, float]]:
    out = []
    for i, w in enumerate(windows or []):
        if len(w) < 2:
            continue
        st, ed = float(w[0]), float(w[1])
        score = float(w[2]) if len(w) > 2 else -float(i)  # no score: keep the given order
        if math.isfinite(st) and math.isfinite(ed) and ed > st:
            out.append((st, ed, score if math.isfinite(score) else -math.inf))
    return out


def refine_region(windows: Optional[Sequence[Sequence[float]]], duration: float,
                  margin_s: float = 0.0, margin_ratio: float = 0.0, n_ref_windows: int = 1
                  ) -> Tuple[float, float]:
    """The span to refine: the hull of the ``n_ref_windows`` best stage-2 windows, widened on
    both sides by ``max(margin_s, margin_ratio * hull length)``, clipped to ``[0, duration]``.

    Args:
        windows: stage-2 windows ``[[st, ed, score], ...]`` in seconds (score optional: without
            it the given order counts). Invalid windows (NaN, ``ed <= st``) are ignored.
        duration: video length in seconds (> 0).
    Returns:
        ``(start, end)`` seconds with ``0 <= start < end <= duration``; the whole video when no
        valid window is given or the clipped hull is empty.
    """
    if not (duration > 0 and math.isfinite(duration)):
        raise ValueError(f"duration must be a positive number, got {duration}")
    if margin_s < 0 or margin_ratio < 0:
        raise ValueError("margins must be non-negative")
    valid = sorted(_valid_windows(windows), key=lambda w: -w[2])[:max(1, n_ref_windows)]
    if not valid:
        return 0.0, float(duration)
    st = min(w[0] for w in valid)
    ed = max(w[1] for w in valid)
    margin = max(margin_s, margin_ratio * (ed - st))
    r0, r1 = max(0.0, st - margin), min(float(duration), ed + margin)
    if r1 <= r0:
        return 0.0, float(duration)
    return r0, r1


def target_windows(gt_windows: Sequence[Sequence[float]], region: Tuple[float, float],
                   max_windows: int = 5) -> List[Tuple[float, float]]:
    """Ground-truth windows clipped to the region (those that overlap it), sorted by start,
    at most ``max_windows``: the training answer of a sample."""
    r0, r1 = region
    out = []
    for w in gt_windows:
        st, ed = max(float(w[0]), r0), min(float(w[1]), r1)
        if ed > st:
            out.append((st, ed))
    out.sort()
    return out[:max_windows]


def _words(text: str) -> set:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def select_captions(captions: Sequence[Any], region: Tuple[float, float], query: str,
                    max_captions: int) -> List[Any]:
    """Captions (objects with ``start``, ``end``, ``text``) overlapping ``region``; when more
    than ``max_captions``, those sharing most words with the query (then the earliest).
    Returned in time order."""
    r0, r1 = region
    inside = [c for c in captions
              if (c.end > r0 and c.start < r1) or (c.start == c.end and r0 <= c.start <= r1)]
    if max_captions <= 0:
        return []
    if len(inside) > max_captions:
        q = _words(query)
        ranked = sorted(range(len(inside)), key=lambda i: (-len(q & _words(inside[i].text)),
                                                           inside[i].start, i))
        keep = sorted(ranked[:max_captions])
        inside = [inside[i] for i in keep]
    return inside


def align_captions(captions: Sequence[Any], frame_times: Sequence[float],
                   region: Tuple[float, float]) -> List[List[Any]]:
    """For each frame, the captions written after it: every caption goes to the frame nearest
    to ``max(caption.start, region start)`` (ties: the earlier frame). (T lists)"""
    out: List[List[Any]] = [[] for _ in frame_times]
    if not frame_times:
        return out
    for c in captions:
        anchor = max(float(c.start), region[0])
        best = min(range(len(frame_times)), key=lambda i: (abs(frame_times[i] - anchor), i))
        out[best].append(c)
    return out


def _cut_words(text: str, n: int) -> str:
    words = text.split()
    return " ".join(words[:n]) if n > 0 else ""


def build_prompt(query: str, frame_times: Sequence[float], duration: float,
                 region: Tuple[float, float], cfg: PromptConfig,
                 captions: Optional[Sequence[Any]] = None,
                 reference_windows: Optional[Sequence[Sequence[float]]] = None) -> RefinerPrompt:
    """The prompt of one sample (layout in the module doc).

    Args:
        query: the query text.
        frame_times: (T,) seconds of the key frames, increasing.
        duration: video length (seconds).
        region: the search region ``(start, end)`` seconds.
        cfg: prompt settings.
        captions: speech captions of the video (``start``, ``end``, ``text``); any order.
        reference_windows: stage-2 windows written as "Coarse windows" (best first).
    """
    d = cfg.time_decimals
    times = [float(t) for t in frame_times]
    if any(b < a for a, b in zip(times, times[1:])):
        raise ValueError("frame_times must be increasing")
    caps = select_captions(sorted(captions or [], key=lambda c: (c.start, c.end)), region, query,
                           cfg.max_captions)
    per_frame = align_captions(caps, times, region)
    segments: List[Segment] = []
    for i, t in enumerate(times):
        segments.append(i)
        segments.append(cfg.frame_time_template.format(t=format_time(t, d)))
        for c in per_frame[i]:
            text = _cut_words(c.text, cfg.max_caption_words)
            if text:
                segments.append(cfg.caption_template.format(text=text))
    if cfg.duration_template:
        segments.append(cfg.duration_template.format(d=format_time(duration, d)))
    lines = [f"Query: {' '.join(query.split()[:max(1, cfg.max_query_words)])}"]
    if cfg.include_reference:
        ref = [(w[0], w[1]) for w in _valid_windows(reference_windows)]
        lines.append(f"Coarse windows: {format_windows(ref, d)}")
    if cfg.include_region:
        lines.append(f"Search region: {format_windows([region], d)}")
    lines.append(cfg.task_prompt)
    segments.append("\n".join(lines))
    return RefinerPrompt(segments=segments, n_captions=sum(len(p) for p in per_frame))
