"""Temporal span conventions, written once.

* At API boundaries windows are ``(start, end)`` in **seconds**.
* Inside models windows are normalised by the video duration, as ``(cx, w)``
  (centre, width) in [0, 1], or ``(st, ed)`` ("xx") in [0, 1].

The tensor functions take tensors whose last dimension is 2 and broadcast over leading dims;
:func:`nms_rows` is the same greedy NMS on plain ``[st, ed, score]`` rows (python floats, as
predictions are written), with the same IoU ``inter / union`` (0 when the union is empty).
The numpy-only evaluation (:mod:`lavis_c2f.evaluation`) keeps its own vectorised IoU
(``evaluation/_rows.py``), written to reproduce the official scripts' numbers without torch.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def span_xx_to_cxw(xx: torch.Tensor) -> torch.Tensor:
    """(..., 2) (st, ed) -> (..., 2) (centre, width)."""
    centre = (xx[..., 0] + xx[..., 1]) * 0.5
    width = xx[..., 1] - xx[..., 0]
    return torch.stack([centre, width], dim=-1)


def span_cxw_to_xx(cxw: torch.Tensor) -> torch.Tensor:
    """(..., 2) (centre, width) -> (..., 2) (st, ed)."""
    st = cxw[..., 0] - 0.5 * cxw[..., 1]
    ed = cxw[..., 0] + 0.5 * cxw[..., 1]
    return torch.stack([st, ed], dim=-1)


def seconds_to_normalized_cxw(windows_s: torch.Tensor, duration: float) -> torch.Tensor:
    """(N, 2) windows in seconds -> (N, 2) normalised (cx, w)."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    return span_xx_to_cxw(windows_s / float(duration))


def normalized_cxw_to_seconds(cxw: torch.Tensor, duration: float) -> torch.Tensor:
    """(N, 2) normalised (cx, w) -> (N, 2) windows in seconds."""
    return span_cxw_to_xx(cxw) * float(duration)


def temporal_iou(spans1: torch.Tensor, spans2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of (N, 2) and (M, 2) (st, ed) spans -> (iou (N, M), union (N, M)).

    A zero union (two empty spans at one point) gives IoU 0, not NaN.
    """
    areas1 = spans1[:, 1] - spans1[:, 0]
    areas2 = spans2[:, 1] - spans2[:, 0]
    left = torch.max(spans1[:, None, 0], spans2[None, :, 0])
    right = torch.min(spans1[:, None, 1], spans2[None, :, 1])
    inter = (right - left).clamp(min=0)
    union = areas1[:, None] + areas2[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))
    return iou, union


def generalized_temporal_iou(spans1: torch.Tensor, spans2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al.) of (N, 2) and (M, 2) (st, ed) spans.

    Returns (N, M) in [-1, 1]. Ill-formed spans (ed < st) raise ``ValueError``.
    """
    if not (spans1[:, 1] >= spans1[:, 0]).all() or not (spans2[:, 1] >= spans2[:, 0]).all():
        raise ValueError("generalized_temporal_iou needs spans with end >= start")
    iou, union = temporal_iou(spans1, spans2)
    left = torch.min(spans1[:, None, 0], spans2[None, :, 0])
    right = torch.max(spans1[:, None, 1], spans2[None, :, 1])
    enclosing = (right - left).clamp(min=0)
    return iou - torch.where(enclosing > 0, (enclosing - union) / enclosing.clamp(min=1e-12),
                             torch.zeros_like(enclosing))


def temporal_nms(windows: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                 max_keep: int | None = None) -> torch.Tensor:
    """Greedy 1-D non-maximum suppression.

    Args:
        windows: (N, 2) (st, ed), any unit.
        scores: (N,).
        iou_threshold: a window is dropped when its IoU with a kept, higher-scored
            window is >= this value.
        max_keep: stop after this many kept windows (None: no limit).
    Returns:
        LongTensor of kept indices, highest score first.
    """
    if windows.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=windows.device)
    order = torch.argsort(scores, descending=True, stable=True)
    iou, _ = temporal_iou(windows, windows)
    keep = []
    suppressed = torch.zeros(len(windows), dtype=torch.bool, device=windows.device)
    for idx in order.tolist():
        if suppressed[idx]:
            continue
        keep.append(idx)
        if max_keep is not None and len(keep) >= max_keep:
            break
        suppressed |= iou[idx] >= iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=windows.device)


def interval_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``(st, ed, ...)`` intervals (0 when the union is empty)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def nms_rows(rows: Sequence[Sequence[float]], iou_threshold: float, max_keep: Optional[int] = None
             ) -> List[List[float]]:
    """Greedy NMS of ``[st, ed, score]`` rows already sorted best first: a row is dropped when
    its IoU with a kept row is >= ``iou_threshold``; at most ``max_keep`` rows are kept."""
    kept: List[List[float]] = []
    for r in rows:
        if all(interval_iou(r, k) < iou_threshold for k in kept):
            kept.append(list(r))
            if max_keep is not None and len(kept) >= max_keep:
                break
    return kept
