"""Clock times of seconds, as results show them (``mm:ss``; pure python)."""
from __future__ import annotations

import math


def format_time(seconds: float) -> str:
    """Seconds -> ``mm:ss`` (``h:mm:ss`` from one hour on), rounded to the nearest second.

    >>> format_time(65.4), format_time(3725)
    ('01:05', '1:02:05')
    """
    if seconds is None or not math.isfinite(float(seconds)) or float(seconds) < 0:
        raise ValueError(f"time must be a finite number of seconds >= 0, got {seconds!r}")
    total = int(math.floor(float(seconds) + 0.5))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


__all__ = ["format_time"]
