"""Parsing generated windows, with fallback accounting. Never raises on model output.

Output format (what the refiner is trained to generate)::

    [[st, ed], [st, ed], ...]        seconds, e.g. "[[12, 30]]" or "[[12.5, 30.0], [40, 52]]"
    []                               no relevant window inside the search region

:func:`parse_windows` scans the text for ``[number, number]`` pairs (numbers: optional sign,
digits, optional fraction; whitespace around commas is free; one outer bracket level may be
missing or unterminated, so a generation cut by ``max_new_tokens`` still yields its complete
pairs). Each pair is checked:

* both numbers finite (``nan``/``inf`` never match the number pattern);
* ``st < ed`` (a reversed pair is dropped, or swapped when ``swap_reversed``);
* inside ``[0, duration]``; values outside by at most ``tolerance_s`` are clamped;
* at least ``min_length_s`` long after clamping.

Invalid pairs are dropped (counted in ``n_dropped``), duplicates removed, order kept (the
model writes the best window first), at most ``max_windows`` kept. Only the first
``max_chars`` characters are read (a runaway generation cannot cost time).

A generation with no valid pair falls back to the stage-2 windows: :class:`ParseResult` has
``ok = False`` and a ``reason``: ``empty`` (blank text or ``[]``), ``no_windows`` (no pair
found: garbage or partial numbers), ``invalid`` (pairs found, none valid).
:class:`RefineStats` counts refined samples, fallbacks by reason and dropped pairs.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.ops.spans import interval_iou

_NUM = r"[-+]?[0-9]+(?:\.[0-9]+)?"  # ASCII digits only (\d also matches other scripts)
_PAIR = re.compile(r"\[\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\]")
_EMPTY = re.compile(r"^\s*\[?\s*\]?\s*$")


@dataclass(frozen=True)
class ParseConfig:
    """Parsing settings (stored in the model config under ``output``)."""

    max_windows: int = 5
    max_chars: int = 2000
    tolerance_s: float = 1.0
    min_length_s: float = 0.0
    swap_reversed: bool = False

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]], where: str = "model.output") -> "ParseConfig":
        cfg = check_keys(cfg, {f.name for f in fields(cls)}, where)
        for k in ("max_windows", "max_chars"):
            if k in cfg and (isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 1):
                raise ConfigError(f"{where}.{k}: expected a positive integer, got {cfg[k]!r}")
        for k in ("tolerance_s", "min_length_s"):
            if k in cfg and (isinstance(cfg[k], bool) or not isinstance(cfg[k], (int, float)) or cfg[k] < 0):
                raise ConfigError(f"{where}.{k}: expected a non-negative number, got {cfg[k]!r}")
            if k in cfg:
                cfg[k] = float(cfg[k])
        if "swap_reversed" in cfg and not isinstance(cfg["swap_reversed"], bool):
            raise ConfigError(f"{where}.swap_reversed: expected true/false, got {cfg['swap_reversed']!r}")
        return cls(**cfg)


@dataclass
class ParseResult:
    """Parsed windows ``[(st, ed), ...]`` seconds; ``ok`` False means: fall back."""

    windows: List[Tuple[float, float]]
    ok: bool
    reason: Optional[str] = None
    n_dropped: int = 0


def parse_windows(text: Any, duration: float, cfg: ParseConfig = ParseConfig()) -> ParseResult:
    """Windows of a generated ``text`` (see module doc). Never raises on any ``text``."""
    if not isinstance(text, str):
        return ParseResult([], False, "no_windows")
    if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0):
        return ParseResult([], False, "invalid")
    text = text[:cfg.max_chars]
    if _EMPTY.match(text):
        return ParseResult([], False, "empty")
    pairs = _PAIR.findall(text)
    if not pairs:
        return ParseResult([], False, "no_windows")
    out: List[Tuple[float, float]] = []
    dropped = 0
    for a, b in pairs:
        try:
            st, ed = float(a), float(b)
        except ValueError:  # pragma: no cover - the pattern only matches numbers
            dropped += 1
            continue
        if not (math.isfinite(st) and math.isfinite(ed)):
            dropped += 1
            continue
        if st > ed and cfg.swap_reversed:
            st, ed = ed, st
        if st < -cfg.tolerance_s or ed > duration + cfg.tolerance_s or st >= ed:
            dropped += 1
            continue
        st, ed = max(0.0, st), min(float(duration), ed)
        if ed - st <= 0 or ed - st < cfg.min_length_s:
            dropped += 1
            continue
        if (st, ed) in out:
            continue
        out.append((st, ed))
    if not out:
        return ParseResult([], False, "invalid", n_dropped=dropped)
    kept = out[:cfg.max_windows]
    return ParseResult(kept, True, None, n_dropped=dropped)


@dataclass
class RefineStats:
    """Counters of the refiner (printable by the pipeline)."""

    n_refined: int = 0
    n_fallback: int = 0
    n_dropped_windows: int = 0
    fallback_reasons: Counter = field(default_factory=Counter)

    def record(self, result: ParseResult) -> None:
        self.n_dropped_windows += result.n_dropped
        if result.ok:
            self.n_refined += 1
        else:
            self.n_fallback += 1
            self.fallback_reasons[result.reason or "unknown"] += 1

    def record_fallback(self, reason: str) -> None:
        """A sample that fell back before any generation (e.g. no frame could be read)."""
        self.n_fallback += 1
        self.fallback_reasons[reason] += 1

    @property
    def n_total(self) -> int:
        return self.n_refined + self.n_fallback

    def merge(self, other: "RefineStats") -> None:
        self.n_refined += other.n_refined
        self.n_fallback += other.n_fallback
        self.n_dropped_windows += other.n_dropped_windows
        self.fallback_reasons.update(other.fallback_reasons)

    def reset(self) -> None:
        self.n_refined = self.n_fallback = self.n_dropped_windows = 0
        self.fallback_reasons.clear()

    def as_dict(self) -> Dict[str, Any]:
        return {"n_refined": self.n_refined, "n_fallback": self.n_fallback,
                "n_dropped_windows": self.n_dropped_windows,
                "fallback_reasons": dict(sorted(self.fallback_reasons.items()))}

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.fallback_reasons.items()))
        return (f"refiner: {self.n_refined}/{self.n_total} refined, {self.n_fallback} fell back to "
                f"stage 2" + (f" ({reasons})" if reasons else "")
                + f", {self.n_dropped_windows} invalid windows dropped")


def windows_with_scores(refined: Sequence[Tuple[float, float]], top_score: float,
                        stage2: Sequence[Sequence[float]], keep_stage2_tail: bool,
                        iou_threshold: float = 0.7, max_windows: int = 10) -> List[List[float]]:
    """Scored windows of a refined sample: refined windows first, scored
    ``top_score * (1 - i / (n + 1))`` (rank ``i`` of ``n``), then, with ``keep_stage2_tail``,
    the stage-2 windows that overlap no kept window with IoU >= ``iou_threshold``, scored
    below the last refined window (their order kept). ``[[st, ed, score], ...]`` seconds.
    A non-finite or non-positive ``top_score`` counts as 1e-6."""
    conf = float(top_score) if math.isfinite(top_score) and top_score > 0 else 1e-6
    n = len(refined)
    out = [[float(st), float(ed), conf * (1.0 - i / (n + 1))] for i, (st, ed) in enumerate(refined)]
    if keep_stage2_tail and stage2:
        floor = out[-1][2] if out else 1.0
        tail = []
        for w in stage2:
            st, ed = float(w[0]), float(w[1])
            if not (math.isfinite(st) and math.isfinite(ed) and ed > st):
                continue
            if any(interval_iou((st, ed), k) >= iou_threshold for k in out + tail):
                continue
            tail.append([st, ed, 0.0])
        for j, w in enumerate(tail):
            w[2] = floor * (1.0 - (j + 1) / (len(tail) + 1))
        out.extend(tail)
    return out[:max_windows]

