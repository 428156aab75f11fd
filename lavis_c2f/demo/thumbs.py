"""Thumbnails of the demo's result rows (numpy + Pillow; no Streamlit).

* Video files: the frame shown at the window start, decoded with :mod:`lavis_c2f.video.decode`
  (:func:`frame_at`), scaled to a fixed height.
* The demo corpus has no video files (its "videos" are feature files): :func:`saliency_thumbnail`
  draws the video's per-clip saliency as a sparkline over the whole video with the moment's
  window shaded, so the rows still show *where* in the video each moment lies.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from lavis_c2f.video.decode import iter_clip_batches
from lavis_c2f.video.probe import probe, require_video

CURVE = (31, 78, 121)       # the saliency line (the colour of lavis_c2f.search.plot)
WINDOW = (250, 198, 150)    # the shaded moment (light orange, as the plot's windows)
BACKGROUND = (248, 249, 251)
AXIS = (200, 204, 210)


def saliency_thumbnail(saliency: Sequence[float], clip_length: float, duration: float,
                       window: Optional[Sequence[float]] = None, size: Tuple[int, int] = (192, 72)) -> np.ndarray:
    """A sparkline of one video's saliency with a window shaded.

    Args:
        saliency: (L,) per-clip values (clip ``i`` centred at ``(i + 0.5) * clip_length`` s).
        clip_length, duration: seconds (> 0).
        window: ``[start, end, ...]`` seconds to shade, or None.
        size: ``(width, height)`` pixels.
    Returns: (height, width, 3) uint8 RGB.
    """
    s = np.asarray(saliency, dtype=np.float64).reshape(-1)
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("saliency must be a non-empty sequence of finite numbers")
    if not (clip_length > 0 and duration > 0):
        raise ValueError(f"clip_length and duration must be positive, got {clip_length}, {duration}")
    w, h = int(size[0]), int(size[1])
    if w < 8 or h < 8:
        raise ValueError(f"thumbnail size must be at least 8x8, got {size}")
    span = max(float(duration), s.size * float(clip_length))
    pad = 3

    def x_of(t: float) -> float:
        return pad + (w - 2 * pad - 1) * min(max(t / span, 0.0), 1.0)

    img = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if window is not None:
        x0, x1 = x_of(float(window[0])), x_of(float(window[1]))
        draw.rectangle([math.floor(x0), 0, max(math.ceil(x1), math.floor(x0) + 1), h - 1], fill=WINDOW)
    lo, hi = float(s.min()), float(s.max())
    rng = hi - lo if hi > lo else 1.0
    ys = (h - 1 - pad) - (h - 1 - 2 * pad) * ((s - lo) / rng if hi > lo else np.full_like(s, 0.5))
    xs = [x_of((i + 0.5) * clip_length) for i in range(s.size)]
    draw.line([(pad, h - 1 - pad), (w - 1 - pad, h - 1 - pad)], fill=AXIS, width=1)
    if s.size == 1:
        draw.ellipse([xs[0] - 2, ys[0] - 2, xs[0] + 2, ys[0] + 2], fill=CURVE)
    else:
        draw.line(list(zip(xs, ys.tolist())), fill=CURVE, width=2)
    return np.asarray(img, dtype=np.uint8)


def frame_at(path: "str | os.PathLike[str]", t: float, height: int = 90) -> np.ndarray:
    """The frame shown at ``t`` seconds (the last frame strictly before ``t``, as everywhere in
    :mod:`lavis_c2f.video.decode`), ``height`` pixels high, display orientation.

    Uses the decoder's clip sampling with one clip of ``2 t`` seconds, whose centre sample is
    ``t``; PyAV decodes lazily, so only the frames up to ``t`` (or from the keyframe before it,
    when seeking pays off) are decoded. Returns (H, W, 3) uint8; raises
    :class:`~lavis_c2f.video.decode.VideoDecodeError` for unreadable files.
    """
    if not math.isfinite(float(t)) or float(t) < 0:
        raise ValueError(f"time must be a finite number of seconds >= 0, got {t!r}")
    if int(height) < 1:
        raise ValueError(f"height must be >= 1, got {height}")
    info = probe(os.fspath(path))
    require_video(info)
    # clip k samples (k + 0.5) * L: with L = 2 t the first sample is t (half a frame for t ~ 0)
    half_frame = 0.5 / info.fps if info.fps > 0 else 0.02
    t = min(max(float(t), half_frame), max(info.duration - half_frame, half_frame))
    hw = (int(height), max(1, int(round(info.width * int(height) / max(1, info.height)))))
    batches = iter_clip_batches(info, clip_length=2.0 * t, frames_per_clip=1, size=hw, batch_clips=1,
                                backend="pyav")
    try:
        first = next(batches)
    finally:
        batches.close()
    return np.ascontiguousarray(first.frames[0, 0])


__all__ = ["frame_at", "saliency_thumbnail"]
