"""Video-corpus moment retrieval (VCMR) metrics in the TVR style (numpy only).

Row formats (one JSON object per line)
--------------------------------------
Submission (corpus moment rows, see docs/ARCHITECTURE.md)::

    {"qid": 2579, "query": "...", "pred_moments": [[vid, st, ed, score], ...]}

``pred_moments`` is **ranked**: the list order is the ranking (the score is not re-sorted;
it may be left out, ``[vid, st, ed]``). Only the first ``max(ks)`` entries are read.

Ground truth (the QVHighlights / :class:`MomentRecord` format)::

    {"qid": 2579, "vid": "NUsG9BgSes0_210.0_360.0", "relevant_windows": [[st, ed], ...]}

Metric: ``VCMR-R@K-IoU@t`` is the percentage of queries for which one of the top-K moments
is in the GT video and has IoU >= t with some GT window of that query (max over GT windows);
``VR-R@K`` (video recall) only asks for the GT video among the top-K moments. Percent,
2 decimals. Video ids are compared as strings. GT rows without windows are skipped and
counted in ``num_skipped_no_gt``.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Dict, Hashable, List, Sequence, Tuple

import numpy as np

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.evaluation._rows import (RowChecker, is_number, iou_max_over_gt, load_rows,
                                        match_qids, pct, row_origin, thr_key)

__all__ = ["DEFAULT_KS", "DEFAULT_IOU_THRESHOLDS", "eval_vcmr", "evaluate_files"]

DEFAULT_KS: Tuple[int, ...] = (1, 5, 10, 100)
DEFAULT_IOU_THRESHOLDS: Tuple[float, ...] = (0.5, 0.7)


def _vid(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _parse_moments(c: RowChecker, max_k: int) -> Tuple[List[str], np.ndarray]:
    value = c.require("pred_moments")
    if not isinstance(value, list):
        raise c.error("must be a list of [vid, start, end, score] lists", field="pred_moments")
    vids: List[str] = []
    spans = np.zeros((min(len(value), max_k), 2), dtype=np.float64)
    for i, m in enumerate(value[:max_k]):
        if (not isinstance(m, (list, tuple)) or len(m) < 3
                or not isinstance(m[0], (str, int)) or isinstance(m[0], bool)
                or not is_number(m[1]) or not is_number(m[2])
                or (len(m) > 3 and not is_number(m[3]))):
            raise c.error(f"entry {i} must be [vid, start, end, score] (vid a string, finite "
                          f"numbers), got {m!r}", field="pred_moments")
        if m[2] < m[1]:
            raise c.error(f"entry {i} has end < start: {m!r}", field="pred_moments")
        vids.append(_vid(m[0]))
        spans[i] = m[1], m[2]
    return vids, spans


def eval_vcmr(submission: Sequence[dict], ground_truth: Sequence[dict],
              ks: Sequence[int] = DEFAULT_KS, iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
              *, match_number: bool = True) -> "OrderedDict[str, Any]":
    """VCMR recall at K and IoU thresholds.

    Args:
        submission: corpus moment rows (module docstring); a :class:`JsonlRows` from
            :func:`lavis_c2f.evaluation._rows.load_rows` makes errors name file and line.
        ground_truth: GT rows with ``qid``, ``vid``, ``relevant_windows`` (seconds).
        ks: cut-offs K (positive).
        iou_thresholds: IoU thresholds.
        match_number: require equal qid sets (else evaluate the intersection).
    Returns:
        ``{"brief": {"VCMR-R@K-IoU@t" for each t then K, "VR-R@K" for each K},
        "num_queries": n, "num_skipped_no_gt": k}``.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    max_k = ks[-1]
    p_src, p_lines = row_origin(submission, "<submission>")
    g_src, g_lines = row_origin(ground_truth, "<ground_truth>")
    if not len(submission):
        raise DataFormatError("the submission is empty", path=p_src)
    if not len(ground_truth):
        raise DataFormatError("the ground truth is empty", path=g_src)

    preds: Dict[Hashable, Tuple[List[str], np.ndarray]] = {}
    p_qids = []
    for row, line in zip(submission, p_lines):
        c = RowChecker(row, p_src, line)
        q = c.qid()
        p_qids.append(q)
        preds[q] = _parse_moments(c, max_k)
    gts: Dict[Hashable, Tuple[str, np.ndarray]] = {}
    g_qids = []
    for row, line in zip(ground_truth, g_lines):
        c = RowChecker(row, g_src, line)
        q = c.qid()
        g_qids.append(q)
        windows = c.windows("relevant_windows", 2, required=False)
        if windows is not None and len(windows):
            vid = c.require("vid")
            if not isinstance(vid, (str, int)) or isinstance(vid, bool):
                raise c.error(f"must be a video id string, got {vid!r}", field="vid")
            gts[q] = (_vid(vid), windows)
    qids = match_qids(p_qids, p_src, p_lines, g_qids, g_src, g_lines, match_number)
    labelled = [q for q in qids if q in gts]
    if not labelled:
        raise DataFormatError("the ground truth has no relevant_windows for the evaluated "
                              "queries (test split?)", path=g_src)

    thr = np.asarray(iou_thresholds, dtype=np.float64)
    never = max_k + 1
    first_hit = np.full((len(labelled), len(thr)), never, dtype=np.int64)   # 0-based rank
    first_video = np.full(len(labelled), never, dtype=np.int64)
    for i, q in enumerate(labelled):
        vids, spans = preds[q]
        gt_vid, gt_windows = gts[q]
        in_video = np.array([v == gt_vid for v in vids], dtype=bool)
        if not in_video.any():
            continue
        first_video[i] = int(np.argmax(in_video))
        iou = np.where(in_video, iou_max_over_gt(spans, gt_windows), -1.0)
        hit = iou[:, None] >= thr[None, :]                                  # (K, T)
        any_hit = hit.any(0)
        first_hit[i, any_hit] = hit.argmax(0)[any_hit]
    brief: "OrderedDict[str, Any]" = OrderedDict()
    for j, t in enumerate(thr):
        for k in ks:
            brief[f"VCMR-R@{k}-IoU@{thr_key(t)}"] = pct(np.mean(first_hit[:, j] < k))
    for k in ks:
        brief[f"VR-R@{k}"] = pct(np.mean(first_video < k))
    return OrderedDict([("brief", brief), ("num_queries", len(labelled)),
                        ("num_skipped_no_gt", len(qids) - len(labelled))])


def evaluate_files(submission_path: "os.PathLike | str", gt_path: "os.PathLike | str",
                   ks: Sequence[int] = DEFAULT_KS,
                   iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                   match_number: bool = True) -> "OrderedDict[str, Any]":
    """:func:`eval_vcmr` on two JSON-lines files (errors name file and line)."""
    return eval_vcmr(load_rows(submission_path), load_rows(gt_path), ks, iou_thresholds,
                     match_number=match_number)
