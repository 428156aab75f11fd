"""Zero-shot retrieval and grounding from a feature backbone alone (no trained checkpoint).

The zero-shot stages of the coarse-to-fine engine (:mod:`lavis_c2f.pipeline.stages`), used
when no trained retriever / grounder is configured (the usual first run on one's own videos).
It relies only on the backbone's joint text-image space (CLIP, or the offline encoder's MiniLM space): the query's pooled text
embedding ``t`` (D,) and the per-clip features ``f_1..f_L`` (L, D) of a video.

Stage 1 (video score). The similarity curve ``s_c = cos(t, f_c)``; a video scores
``max_c s_c`` (``video_score: max``) or the mean of its ``video_topk`` best clips
(``topk_mean``, default with k = 3: one stray clip does not decide).

Stage 2 (windows). The curve is smoothed with a centred moving average of ``smooth_clips``
clips (at the ends the average runs over the clips that exist) and min-max normalised within
the video, ``u = (s~ - min) / (max - min)`` in [0, 1]. Windows are the maximal runs of clips with
``u >= level`` for each threshold of ``levels`` (multi-scale proposals, as temporal actionness
grouping), at least ``min_window_clips`` long. A window ``[a, b)`` of clips scores its contrast
``mean(u[a:b]) - mean(u outside)``, clamped to [0, 1] (a window covering the whole video has no
outside and scores 0). Windows are turned into seconds (``a * clip_length``,
``min(b * clip_length, duration)``), de-duplicated by temporal NMS (IoU >= ``nms_threshold``)
and the ``max_windows`` best are returned, best first. The per-clip saliency is the smoothed
curve ``s~`` (cosines).

Scores are therefore **not** probabilities: stage-1 scores are cosines (their scale depends on
the backbone) and stage-2 scores are in-video contrasts. The fusion of the pipeline normalises
stage-1 scores per query (z-score by default), so the two combine as in trained mode.

Numpy, with the package's one L2 normalisation and NMS (:mod:`lavis_c2f.ops`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.ops.spans import nms_rows
from lavis_c2f.ops.vectors import l2_normalize

VIDEO_SCORES = ("max", "topk_mean")


@dataclass(frozen=True)
class ZeroShotConfig:
    """Settings of the zero-shot mode (module docstring).

    Args:
        video_score: ``max`` | ``topk_mean``.
        video_topk: clips averaged by ``topk_mean``.
        smooth_clips: width of the moving average (1 = no smoothing).
        levels: thresholds on the normalised curve, each in (0, 1].
        min_window_clips: shortest proposed window, in clips.
        nms_threshold: IoU at or above which a lower-scored window is dropped.
        max_windows: windows returned per video.
    """

    video_score: str = "topk_mean"
    video_topk: int = 3
    smooth_clips: int = 3
    levels: Tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    min_window_clips: int = 1
    nms_threshold: float = 0.5
    max_windows: int = 10

    def __post_init__(self) -> None:
        if self.video_score not in VIDEO_SCORES:
            raise ConfigError(f"zero_shot.video_score: expected one of {VIDEO_SCORES}, got {self.video_score!r}")
        for name in ("video_topk", "smooth_clips", "min_window_clips", "max_windows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"zero_shot.{name}: expected an integer >= 1, got {v!r}")
        levels = tuple(self.levels)
        if not levels or any(not (0.0 < float(x) <= 1.0) for x in levels):
            raise ConfigError(f"zero_shot.levels: expected thresholds in (0, 1], got {self.levels!r}")
        object.__setattr__(self, "levels", tuple(sorted(float(x) for x in levels)))
        if not 0.0 < float(self.nms_threshold) <= 1.0:
            raise ConfigError(f"zero_shot.nms_threshold: expected a value in (0, 1], got {self.nms_threshold!r}")

    @classmethod
    def from_mapping(cls, d: Optional[Mapping[str, Any]], where: str = "zero_shot") -> "ZeroShotConfig":
        """From a config mapping (unknown keys raise :class:`ConfigError` naming them)."""
        d = check_keys(d, cls.__dataclass_fields__, where)
        if "levels" in d:
            d["levels"] = tuple(d["levels"])
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["levels"] = list(self.levels)
        return out


def similarity_curve(text_pooled: np.ndarray, clip_features: np.ndarray) -> np.ndarray:
    """Cosine of the pooled text embedding (D,) with every clip feature (L, D) -> (L,) float32."""
    t = np.asarray(text_pooled, dtype=np.float32).reshape(-1)
    f = np.asarray(clip_features, dtype=np.float32)
    if f.ndim != 2:
        raise ValueError(f"clip_features must be (L, D), got shape {f.shape}")
    if f.shape[1] != t.shape[0]:
        raise ValueError(f"text embedding width {t.shape[0]} != clip feature width {f.shape[1]}")
    return (l2_normalize(f) @ l2_normalize(t)).astype(np.float32)


def video_score(curve: np.ndarray, config: ZeroShotConfig = ZeroShotConfig()) -> float:
    """Stage-1 score of one video from its similarity curve (L,) (``-inf`` for an empty curve)."""
    c = np.asarray(curve, dtype=np.float64).reshape(-1)
    if c.size == 0:
        return -math.inf
    if config.video_score == "max":
        return float(c.max())
    k = min(config.video_topk, c.size)
    return float(np.sort(c)[-k:].mean())


def smooth(curve: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average of ``width`` clips; at the ends, the mean of the clips that exist."""
    c = np.asarray(curve, dtype=np.float64).reshape(-1)
    w = int(width)
    if w <= 1 or c.size <= 1:
        return c.astype(np.float32)
    half_lo, half_hi = (w - 1) // 2, w // 2
    cs = np.concatenate([[0.0], np.cumsum(c)])
    idx = np.arange(c.size)
    lo = np.maximum(0, idx - half_lo)
    hi = np.minimum(c.size, idx + half_hi + 1)
    return ((cs[hi] - cs[lo]) / (hi - lo)).astype(np.float32)


def _runs(mask: np.ndarray) -> List[Tuple[int, int]]:
    """Maximal runs [a, b) of True."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    d = np.diff(m.astype(np.int8))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def propose_windows(saliency: np.ndarray, clip_length: float, duration: float,
                    config: ZeroShotConfig = ZeroShotConfig()) -> List[List[float]]:
    """Windows ``[[st, ed, score], ...]`` (seconds, best first) from a smoothed curve (L,).

    See the module docstring; ties keep the shorter window first, then the earlier one.
    """
    s = np.asarray(saliency, dtype=np.float64).reshape(-1)
    n = s.size
    if n == 0:
        return []
    if not (clip_length > 0 and duration > 0):
        raise ValueError(f"clip_length and duration must be positive, got {clip_length}, {duration}")
    span = s.max() - s.min()
    if not np.isfinite(span):
        raise ValueError("the saliency curve holds NaN or infinite values")
    end_of = lambda b: float(min(b * clip_length, duration))  # noqa: E731
    if span <= 1e-12:  # flat curve: nothing stands out
        return [[0.0, end_of(n), 0.0]]
    u = (s - s.min()) / span
    total = u.sum()
    seen = set()
    rows: List[List[float]] = []
    for level in config.levels:
        for a, b in _runs(u >= level - 1e-12):
            if b - a < config.min_window_clips or (a, b) in seen:
                continue
            seen.add((a, b))
            inside = u[a:b].mean()
            n_out = n - (b - a)
            contrast = inside - (total - u[a:b].sum()) / n_out if n_out else 0.0
            rows.append([float(a * clip_length), end_of(b), float(min(1.0, max(0.0, contrast))), b - a])
    rows.sort(key=lambda r: (-r[2], r[3], r[0]))
    return [r[:3] for r in nms_rows([r[:3] for r in rows], float(config.nms_threshold), config.max_windows)]


def ground(text_pooled: np.ndarray, clip_features: np.ndarray, clip_length: float, duration: float,
           config: ZeroShotConfig = ZeroShotConfig()) -> Dict[str, Any]:
    """Zero-shot stage 2 of one (query, video) pair: ``{"windows", "saliency", "curve"}``
    (windows in seconds best first, saliency = smoothed curve (L,), curve = raw cosines (L,))."""
    curve = similarity_curve(text_pooled, clip_features)
    sal = smooth(curve, config.smooth_clips)
    return {"windows": propose_windows(sal, clip_length, duration, config), "saliency": sal, "curve": curve}


def video_scores(text_pooled: np.ndarray, features: Sequence[np.ndarray],
                 config: ZeroShotConfig = ZeroShotConfig()) -> np.ndarray:
    """Stage-1 scores (V,) of several videos' clip features for one query (one matrix product)."""
    if len(features) == 0:
        return np.zeros(0, np.float64)
    t = l2_normalize(np.asarray(text_pooled, dtype=np.float32).reshape(-1))
    lens = [int(np.asarray(f).shape[0]) for f in features]
    flat = np.concatenate([np.asarray(f, dtype=np.float32).reshape(-1, t.shape[0]) for f in features], axis=0)
    sims = l2_normalize(flat) @ t
    out = np.empty(len(features), np.float64)
    o = 0
    for i, n in enumerate(lens):
        out[i] = video_score(sims[o:o + n], config)
        o += n
    return out


__all__ = ["VIDEO_SCORES", "ZeroShotConfig", "ground", "propose_windows", "similarity_curve", "smooth", "video_score",
           "video_scores"]
