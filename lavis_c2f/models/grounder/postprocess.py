"""Inference post-processing of the grounder: model outputs -> official prediction rows.

Reproduces the official QD-DETR inference (``compute_mr_results`` + ``PostProcessorDETR``)
step by step, including its float32/rounding path, so that an official checkpoint gives
identical windows and scores:

1. ``score = softmax(pred_logits)[..., 0]`` (index 0 = foreground);
2. windows in seconds ``(cx -/+ w/2) * duration`` in float32;
3. rows ``[st, ed, score]`` stably sorted by the unrounded score (highest first), each value
   rounded to 4 decimals (``float(f"{v:.4f}")``);
4. (``PostProcessorDETR`` with ``clip_ts`` and ``round_multiple``) rows back to a float32
   tensor, starts/ends clamped to ``[min_ts_val, max_ts_val]``, snapped to multiples of
   ``clip_length`` with ``torch.round`` (half to even), scores rounded to 4 decimals again;
5. optional temporal NMS (:func:`lavis_c2f.ops.spans.temporal_nms`, true IoU, a window is
   dropped at IoU >= threshold; the official NMS divides by the hull instead of the union and
   drops at > threshold) on the first ``max_before_nms`` rows, keeping ``max_after_nms``;
6. optional top-k;
7. ``pred_saliency_scores`` = the valid clips' saliency cast to float16, as Python floats.

The clamp bound: the official code clamps to a fixed 150 s (``max_ts_val=150``, the
QVHighlights maximum). Here ``max_ts_val=None`` (the default) clamps each sample to its own
``duration`` (and, after snapping, the end is clamped to the duration again); pass 150 to
reproduce the official numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.ops.spans import normalized_cxw_to_seconds, temporal_nms


@dataclass
class PostProcessConfig:
    """Settings of :func:`postprocess_sample` (defaults: official behaviour except the clamp
    bound, which defaults to the sample's duration).

    Attributes:
        min_ts_val: lower clamp bound in seconds (0).
        max_ts_val: upper clamp bound in seconds; None = the sample's duration; 150 = official.
        round_to_clip: snap starts/ends to multiples of the clip length (True).
        sort: sort windows by score (True; official ``no_sort_results`` False).
        decimals: rounding of windows/scores (4).
        nms_threshold: IoU threshold of temporal NMS; None = no NMS (official ``nms_thd -1``).
        max_before_nms: rows entering NMS (10).
        max_after_nms: rows kept by NMS (10).
        top_k: keep at most this many windows at the end (None = all).
    """

    min_ts_val: float = 0.0
    max_ts_val: Optional[float] = None
    round_to_clip: bool = True
    sort: bool = True
    decimals: int = 4
    nms_threshold: Optional[float] = None
    max_before_nms: int = 10
    max_after_nms: int = 10
    top_k: Optional[int] = None

    @classmethod
    def official(cls) -> "PostProcessConfig":
        """The exact settings of official QD-DETR inference on QVHighlights."""
        return cls(max_ts_val=150.0)

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]], where: str = "postprocess"
                     ) -> "PostProcessConfig":
        """Build from a config mapping; unknown keys raise :class:`ConfigError` naming them."""
        if cfg is None:
            return cls()
        out = cls(**check_keys(cfg, {f.name for f in fields(cls)}, where))
        out.validate(where)
        return out

    def validate(self, where: str = "postprocess") -> None:
        if self.nms_threshold is not None and not 0.0 <= float(self.nms_threshold) <= 1.0:
            raise ConfigError(f"'{where}.nms_threshold' must be in [0, 1] or null, got "
                              f"{self.nms_threshold}")
        if self.top_k is not None and int(self.top_k) < 1:
            raise ConfigError(f"'{where}.top_k' must be >= 1 or null, got {self.top_k}")
        if self.max_ts_val is not None and float(self.max_ts_val) <= float(self.min_ts_val):
            raise ConfigError(f"'{where}.max_ts_val' must exceed min_ts_val")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _round(value: float, decimals: int) -> float:
    return float(f"{value:.{decimals}f}")


def rank_windows(pred_logits: torch.Tensor, pred_spans: torch.Tensor, duration: float,
                 sort: bool = True, decimals: int = 4) -> List[List[float]]:
    """Rows ``[st, ed, score]`` in seconds (official step 1-3).

    Args:
        pred_logits: (Q, 2); pred_spans: (Q, 2) normalised (cx, w); duration: seconds.
    Returns:
        Q rows, sorted by score (highest first) when ``sort``, rounded to ``decimals``.
    """
    scores = torch.softmax(pred_logits.float(), dim=-1)[:, 0]
    windows = normalized_cxw_to_seconds(pred_spans.float(), duration)
    rows = torch.cat([windows, scores[:, None]], dim=1).tolist()
    if sort:
        rows = sorted(rows, key=lambda r: r[2], reverse=True)
    return [[_round(v, decimals) for v in row] for row in rows]


def snap_windows(rows: Sequence[Sequence[float]], clip_length: float, min_ts_val: float,
                 max_ts_val: float, round_to_clip: bool = True, decimals: int = 4
                 ) -> List[List[float]]:
    """Official ``PostProcessorDETR`` (clip_ts + round_multiple) on ``[st, ed, score]`` rows."""
    if len(rows) == 0:
        return []
    table = torch.tensor([list(r) for r in rows], dtype=torch.float32)
    windows = torch.clamp(table[:, :2], min=min_ts_val, max=max_ts_val)
    if round_to_clip:
        if clip_length <= 0:
            raise ValueError(f"clip_length must be positive, got {clip_length}")
        windows = torch.round(windows / clip_length) * clip_length
    out = torch.cat([windows, table[:, 2:3]], dim=1).tolist()
    return [[r[0], r[1], _round(r[2], decimals)] for r in out]


def postprocess_sample(pred_logits: torch.Tensor, pred_spans: torch.Tensor,
                       saliency: Optional[torch.Tensor], duration: float, clip_length: float,
                       config: PostProcessConfig) -> Dict[str, List]:
    """Windows and saliency of one (query, video) pair.

    Args:
        pred_logits: (Q, 2); pred_spans: (Q, 2) (cx, w); saliency: (Lv_valid,) or None.
        duration: seconds used to normalise the windows; clip_length: seconds per clip.
    Returns:
        ``{"windows": [[st, ed, score], ...], "saliency": [...]}`` (seconds).
    """
    duration = float(duration)
    if not duration > 0:
        raise ValueError(f"duration must be positive, got {duration}")
    rows = rank_windows(pred_logits, pred_spans, duration, config.sort, config.decimals)
    upper = duration if config.max_ts_val is None else float(config.max_ts_val)
    rows = snap_windows(rows, clip_length, config.min_ts_val, upper, config.round_to_clip,
                        config.decimals)
    if config.max_ts_val is None:
        rows = [[min(st, duration), min(ed, duration), s] for st, ed, s in rows]
    if config.nms_threshold is not None and rows:
        head = rows[:config.max_before_nms]
        table = torch.tensor([r[:2] for r in head], dtype=torch.float64)
        keep = temporal_nms(table, torch.tensor([r[2] for r in head], dtype=torch.float64),
                            float(config.nms_threshold), max_keep=config.max_after_nms)
        rows = [head[i] for i in keep.tolist()]
    if config.top_k is not None:
        rows = rows[:int(config.top_k)]
    sal = [] if saliency is None else saliency.detach().half().tolist()
    return {"windows": rows, "saliency": sal}


def postprocess_batch(outputs: Mapping[str, torch.Tensor], *, qids: Sequence[Any],
                      queries: Sequence[str], vids: Sequence[Any], durations: Sequence[float],
                      clip_lengths: Sequence[float], config: PostProcessConfig
                      ) -> List[Dict[str, Any]]:
    """Official prediction rows for a batch.

    Args:
        outputs: ``pred_logits`` (B, Q, 2), ``pred_spans`` (B, Q, 2), ``saliency_scores``
            (B, Lv), ``video_mask`` (B, Lv) (1 = valid).
        qids, queries, vids, durations, clip_lengths: per-sample metadata (length B).
    Returns:
        B dicts ``{qid, query, vid, pred_relevant_windows, pred_saliency_scores}``.
    """
    logits, spans = outputs["pred_logits"].detach().cpu(), outputs["pred_spans"].detach().cpu()
    sal, mask = outputs["saliency_scores"].detach().cpu(), outputs["video_mask"].detach().cpu()
    bsz = logits.shape[0]
    for name, seq in (("qids", qids), ("queries", queries), ("vids", vids),
                      ("durations", durations), ("clip_lengths", clip_lengths)):
        if len(seq) != bsz:
            raise ValueError(f"{name} has {len(seq)} entries for a batch of {bsz}")
    rows = []
    for i in range(bsz):
        n_valid = int(mask[i].sum().item())
        res = postprocess_sample(logits[i], spans[i], sal[i, :n_valid], float(durations[i]),
                                 float(clip_lengths[i]), config)
        rows.append({"qid": qids[i], "query": queries[i], "vid": vids[i],
                     "pred_relevant_windows": res["windows"],
                     "pred_saliency_scores": res["saliency"]})
    return rows
