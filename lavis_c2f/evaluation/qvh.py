"""QVHighlights moment retrieval (MR) and highlight detection (HL) evaluation.

Numerically the official QVHighlights evaluation (``standalone_eval/eval.py`` of
jayleicn/moment_detr), re-implemented with vectorised numpy (no scikit-learn, no process
pool), plus the Charades-STA / TACoS "R@k, mIoU" convention.

Row formats (one JSON object per line)
--------------------------------------
Submission (``PRED.jsonl``)::

    {"qid": 2579, "query": "...", "vid": "NUsG9BgSes0_210.0_360.0",
     "pred_relevant_windows": [[st, ed, score], ...],   # seconds; MR
     "pred_saliency_scores": [s_0, s_1, ...]}           # one score per 2 s clip; HL

As in the official code, MR is evaluated when the first row has ``pred_relevant_windows``
and HL when it has ``pred_saliency_scores``; every row must then have the field.

Ground truth (``GT.jsonl``, the ``highlight_*_release.jsonl`` format)::

    {"qid": 2579, "query": "...", "vid": "...", "duration": 150,
     "relevant_windows": [[st, ed], ...],               # seconds
     "relevant_clip_ids": [13, 14, ...],                # 2 s clip indices
     "saliency_scores": [[4, 4, 2], [3, 4, 2], ...]}    # per relevant clip, one 0-4 score per annotator

The official maths (see the function docstrings for details)
-----------------------------------------------------------
* **MR-mAP** at IoU 0.5:0.05:0.95: per query, the first 10 predicted windows are sorted by
  score and greedily matched to GT windows (ActivityNet / VOC style, each GT matched once);
  AP is the all-point interpolated area under the precision/recall curve; queries are
  averaged per threshold, ``average`` is the mean over thresholds.
* **MR-R1@t**: the *first listed* predicted window against the GT window it overlaps most;
  hit when IoU >= t.
* **short / middle / long** buckets keep GT windows of length in (0, 10], (10, 30],
  (30, 150] seconds (queries with none are dropped); ``full`` keeps everything.
* **HL**: GT clip scores are binarised at >= 2 (Fair), >= 3 (Good), >= 4 (VeryGood) for each
  annotator. ``HL-mAP`` is the mean over (query, annotator) of the interpolated AP of the
  predicted clip scores; ``HL-Hit1`` is 1 when the highest-scored clip is positive for at
  least one annotator.
* Every value is ``100 * x`` rounded to 2 decimals.

Deviations where the official code has no defined behaviour (it would crash):
* GT rows without windows (e.g. the test split) are left out of MR and counted in
  ``extra``; GT rows without ``relevant_clip_ids`` are left out of HL; a GT file with no
  labels at all raises :class:`DataFormatError`.
* A submission row with an empty ``pred_relevant_windows`` counts as a miss (AP 0, IoU 0).
* Duplicate qids, windows with end < start and non-finite numbers raise
  :class:`DataFormatError` naming the file and line.
* When several GT windows tie on IoU with a prediction in the mAP matching, the official
  code matches them in the order of numpy's default (unstable) ``argsort()[::-1]``; its pinned
  NumPy sorts with the scalar introsort, whose order is reproduced here on every CPU
  (:func:`lavis_c2f.ops.argsort.introsort_argsort_rows`; NumPy >= 1.25's own ``argsort``
  orders ties differently on CPUs with AVX-512).

Extras (with ``extras=True``; every official key and value is unchanged):
``brief["MR-full-R1@0.3"]``, ``brief["MR-full-mIoU"]`` (mean over queries of the IoU of the
first window with its best-matching GT window, the IoU the official R1 uses) and a top-level
``extra`` block with R1@0.3, mIoU and the number of queries of every bucket.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.common.io import write_json
from lavis_c2f.evaluation._rows import (QidMismatchError, RowChecker, _has_bool, iou_cross, iou_max_over_gt, iou_paired,
                                        load_rows, match_qids, pct, row_origin, thr_key)
from lavis_c2f.evaluation.vcmr import evaluate_files as vcmr_files
from lavis_c2f.ops.argsort import introsort_argsort_rows

logger = logging.getLogger(__name__)

__all__ = [
    "OFFICIAL_IOU_THRESHOLDS", "LENGTH_RANGES", "SALIENCY_LEVELS", "QidMismatchError",
    "eval_submission", "eval_moment_retrieval", "eval_highlight", "eval_r1_miou",
    "evaluate_files", "format_brief_table", "main",
]

#: IoU thresholds of MR-mAP and MR-R1: 0.5, 0.55, ..., 0.95.
OFFICIAL_IOU_THRESHOLDS: Tuple[float, ...] = tuple(float(f"{e:.2f}") for e in np.linspace(0.5, 0.95, 10))
#: (name, min_len, max_len): GT windows with min_len < length <= max_len (seconds).
LENGTH_RANGES: Tuple[Tuple[str, float, float], ...] = (
    ("short", 0, 10), ("middle", 10, 30), ("long", 30, 150), ("full", 0, 150))
#: (name, minimum annotator score of a positive clip).
SALIENCY_LEVELS: Tuple[Tuple[str, int], ...] = (("Fair", 2), ("Good", 3), ("VeryGood", 4))
EXTRA_R1_THRESHOLD = 0.3


# --------------------------------------------------------------------------- parsing
class _Pred:
    __slots__ = ("qid", "windows", "saliency")

    def __init__(self, qid, windows, saliency):
        self.qid, self.windows, self.saliency = qid, windows, saliency


class _Gt:
    __slots__ = ("qid", "windows", "duration", "clip_ids", "clip_scores", "source", "line")

    def __init__(self, qid, windows, duration, clip_ids, clip_scores, source, line):
        self.qid, self.windows, self.duration = qid, windows, duration
        self.clip_ids, self.clip_scores = clip_ids, clip_scores
        self.source, self.line = source, line


def _parse_submission(rows: Sequence[dict], name: str, window_width: int = 3,
                      need_mr: Optional[bool] = None, need_hl: Optional[bool] = None):
    """-> (list of _Pred, has_mr, has_hl, source, lines)."""
    source, lines = row_origin(rows, name)
    if not rows:
        raise DataFormatError("the submission is empty", path=source)
    first = rows[0] if isinstance(rows[0], dict) else {}
    has_mr = "pred_relevant_windows" in first if need_mr is None else need_mr
    has_hl = "pred_saliency_scores" in first if need_hl is None else need_hl
    if not has_mr and not has_hl:
        raise DataFormatError("the first row has neither 'pred_relevant_windows' nor "
                              "'pred_saliency_scores'", path=source, line=lines[0])
    out = []
    for row, line in zip(rows, lines):
        c = RowChecker(row, source, line)
        qid = c.qid()
        windows = c.windows("pred_relevant_windows", window_width) if has_mr else None
        saliency = c.number_list("pred_saliency_scores") if has_hl else None
        out.append(_Pred(qid, windows, saliency))
    return out, has_mr, has_hl, source, lines


def _parse_ground_truth(rows: Sequence[dict], name: str, clip_length: float, with_hl: bool = True):
    """-> (list of _Gt, source, lines). Missing labels become None (see module docstring)."""
    source, lines = row_origin(rows, name)
    if not rows:
        raise DataFormatError("the ground truth is empty", path=source)
    out = []
    for row, line in zip(rows, lines):
        c = RowChecker(row, source, line)
        qid = c.qid()
        windows = c.windows("relevant_windows", 2, required=False)
        if windows is not None and len(windows) == 0:
            windows = None
        duration = clip_ids = clip_scores = None
        if with_hl and row.get("relevant_clip_ids"):
            duration = c.number("duration", positive=True)
            num_clips = int(duration / clip_length)
            if num_clips < 1:
                raise c.error(f"duration {duration} is shorter than one {clip_length} s clip",
                              field="duration")
            ids = row["relevant_clip_ids"]
            try:
                ids_arr = np.asarray(ids)
            except (TypeError, ValueError):
                ids_arr = None
            if (not isinstance(ids, list) or ids_arr is None or ids_arr.ndim != 1
                    or ids_arr.dtype.kind not in "iu" or _has_bool(ids)
                    or ids_arr.min() < 0 or ids_arr.max() >= num_clips):
                raise c.error(f"must be a list of clip indices in [0, {num_clips}) "
                              f"(duration {duration:g} s / {clip_length:g} s clips)",
                              field="relevant_clip_ids")
            scores = c.require("saliency_scores")
            try:
                clip_scores = np.asarray(scores, dtype=np.float64)
            except (TypeError, ValueError):
                clip_scores = None
            if (not isinstance(scores, list) or clip_scores is None or clip_scores.ndim != 2
                    or clip_scores.shape[0] != len(ids) or clip_scores.shape[1] == 0
                    or not np.isfinite(clip_scores).all() or _has_bool(scores)):
                raise c.error("must hold, per relevant clip id, one equally long list of finite "
                              "annotator scores", field="saliency_scores")
            clip_ids = ids_arr.astype(np.int64)
        out.append(_Gt(qid, windows, duration, clip_ids, clip_scores, source, line))
    return out, source, lines


# --------------------------------------------------------------------------- MR maths
def _pad_windows(windows: Sequence[np.ndarray], width: int) -> Tuple[np.ndarray, np.ndarray]:
    """list of (N_i, width) -> ((Q, N, width) zero-padded, (Q, N) valid mask), N >= 1."""
    n = max([len(w) for w in windows] + [1])
    out = np.zeros((len(windows), n, width), dtype=np.float64)
    valid = np.zeros((len(windows), n), dtype=bool)
    for i, w in enumerate(windows):
        out[i, :len(w)] = w[:, :width]
        valid[i, :len(w)] = True
    return out, valid


def detection_ap(pred_windows: Sequence[np.ndarray], gt_windows: Sequence[np.ndarray],
                 iou_thresholds: Sequence[float] = OFFICIAL_IOU_THRESHOLDS) -> np.ndarray:
    """Per-query detection AP at several IoU thresholds (the official
    ``compute_average_precision_detection``), vectorised over queries and thresholds.

    Args:
        pred_windows: Q arrays (N_q, 3) ``[st, ed, score]`` (already cut to the windows to
            use); they are sorted by descending score (stable).
        gt_windows: Q arrays (M_q, 2) ``[st, ed]``, M_q >= 1.
        iou_thresholds: T thresholds.
    Returns:
        (Q, T) AP in [0, 1]; a query with no prediction has AP 0.

    Each prediction, in score order, is matched to the unmatched GT window with the highest
    IoU if that IoU >= threshold (true positive), else it is a false positive. AP is the
    area under the interpolated precision/recall curve (VOC 2011 all-point).
    """
    q_count, thr = len(pred_windows), np.asarray(iou_thresholds, dtype=np.float64)
    n_gt = np.array([len(g) for g in gt_windows], dtype=np.float64)
    if q_count == 0:
        return np.zeros((0, len(thr)))
    if (n_gt == 0).any():
        raise ValueError("detection_ap needs at least one GT window per query")
    sorted_preds = [p[np.argsort(-p[:, 2], kind="stable")] if len(p) else p for p in pred_windows]
    pw, pvalid = _pad_windows(sorted_preds, 2)                  # (Q, P, 2)
    gw, gvalid = _pad_windows(list(gt_windows), 2)              # (Q, G, 2)
    iou = iou_cross(pw, gw)                                     # (Q, P, G)
    iou = np.where(gvalid[:, None, :], iou, -np.inf)            # padding never matches
    num_p, num_g, num_t = pw.shape[1], gw.shape[1], len(thr)
    # GT windows by descending IoU. The official code orders them with numpy's default
    # ``argsort()[::-1]`` on the query's own M windows, under its pinned NumPy (scalar
    # introsort); NumPy >= 1.25 orders ties by CPU (AVX-512 or not), so the scalar order is
    # computed here on every CPU (ops/argsort.py), on rows of the query's own length M
    # (grouping queries by M), never on padded rows.
    order = np.broadcast_to(np.arange(num_g), iou.shape).copy()
    for m in np.unique(n_gt).astype(int):
        rows = np.nonzero(n_gt == m)[0]
        order[rows, :, :m] = introsort_argsort_rows(iou[rows, :, :m])[..., ::-1]
    iou_sorted = np.take_along_axis(iou, order, axis=-1)
    locked = np.zeros((q_count, num_t, num_g), dtype=bool)      # GT already matched
    tp = np.zeros((q_count, num_t, num_p), dtype=bool)
    for p in range(num_p):
        o = np.broadcast_to(order[:, None, p, :], (q_count, num_t, num_g))
        # a GT is a candidate unless its IoU is below the threshold (NaN stays a candidate,
        # as in the official comparison) or it is matched already
        cand = ~(iou_sorted[:, None, p, :] < thr[None, :, None]) & ~np.take_along_axis(locked, o, -1)
        hit = cand.any(-1) & pvalid[:, p, None]                 # (Q, T)
        g_idx = np.take_along_axis(o, cand.argmax(-1)[..., None], -1)
        np.put_along_axis(locked, g_idx, np.take_along_axis(locked, g_idx, -1) | hit[..., None], -1)
        tp[:, :, p] = hit
    fp = pvalid[:, None, :] & ~tp
    tp_cum = np.cumsum(tp, axis=-1).astype(np.float64)
    fp_cum = np.cumsum(fp, axis=-1).astype(np.float64)
    recall = tp_cum / n_gt[:, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = tp_cum / (tp_cum + fp_cum)
    zeros = np.zeros((q_count, num_t, 1))
    m_prec = np.concatenate([zeros, precision, zeros], axis=-1)
    m_rec = np.concatenate([zeros, recall, zeros + 1.0], axis=-1)
    m_prec = np.maximum.accumulate(m_prec[..., ::-1], axis=-1)[..., ::-1]
    d_rec = np.diff(m_rec, axis=-1)
    ap = np.where(d_rec != 0, d_rec * m_prec[..., 1:], 0.0).sum(-1)
    ap[~pvalid.any(1)] = 0.0
    return ap


def _first_window_iou(pred_windows: Sequence[np.ndarray], gt_windows: Sequence[np.ndarray]) -> np.ndarray:
    """(Q,) IoU of each query's first listed window with the GT window it overlaps most
    (official ``compute_mr_r1``); a query with no prediction gets 0."""
    has_pred = np.array([len(p) > 0 for p in pred_windows], dtype=bool)
    first = np.array([p[0, :2] if len(p) else (0.0, 0.0) for p in pred_windows],
                     dtype=np.float64).reshape(-1, 2)
    gw, gvalid = _pad_windows(list(gt_windows), 2)
    cross = iou_cross(first[:, None, :], gw)[:, 0, :]           # (Q, G)
    cross = np.where(gvalid, cross, -np.inf)
    best = gw[np.arange(len(gw)), np.argmax(cross, axis=1)]
    iou = iou_paired(first, best)
    iou[~has_pred] = 0.0
    return iou


def _filter_by_length(gt_windows: np.ndarray, min_len: float, max_len: float) -> np.ndarray:
    if min_len == 0 and max_len == 150:          # the official "full" range keeps everything
        return gt_windows
    length = gt_windows[:, 1] - gt_windows[:, 0]
    return gt_windows[(min_len < length) & (length <= max_len)]


def eval_moment_retrieval(pred_windows: Dict[Hashable, np.ndarray], gt_windows: Dict[Hashable, np.ndarray],
                          max_pred_windows: Optional[int] = 10, extras: bool = True
                          ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Official MR metrics of every length bucket.

    Args:
        pred_windows: qid -> (N, 3) ``[st, ed, score]`` in submission order.
        gt_windows: qid -> (M, 2), M >= 1 (same qids).
        max_pred_windows: windows per query used by mAP (official: 10).
    Returns:
        ``({bucket: {"MR-mAP": {thr: v, ..., "average": v}, "MR-R1": {thr: v}}},
        {bucket: {"MR-R1@0.3", "MR-mIoU", "num_queries"}})``; a bucket with no query has
        None values.
    """
    official: Dict[str, Any] = {}
    extra: Dict[str, Any] = {}
    qids = list(gt_windows)
    for name, min_len, max_len in LENGTH_RANGES:
        kept = [(q, _filter_by_length(gt_windows[q], min_len, max_len)) for q in qids]
        kept = [(q, g) for q, g in kept if len(g)]
        preds = [pred_windows[q] for q, _ in kept]
        gts = [g for _, g in kept]
        logger.debug("MR bucket %s (%g, %g]: %d/%d queries", name, min_len, max_len, len(kept), len(qids))
        if kept:
            cut = [p[:max_pred_windows] if max_pred_windows is not None else p for p in preds]
            ap = detection_ap(cut, gts, OFFICIAL_IOU_THRESHOLDS).mean(0)
            r1_iou = _first_window_iou(preds, gts)
        else:
            ap = np.full(len(OFFICIAL_IOU_THRESHOLDS), np.nan)
            r1_iou = np.zeros(0)
        with np.errstate(invalid="ignore"):
            mr_map = {thr_key(t): ap[i] for i, t in enumerate(OFFICIAL_IOU_THRESHOLDS)}
            mr_map["average"] = np.mean(ap)
            mr_map = {k: pct(v) for k, v in mr_map.items()}
            mr_r1 = {thr_key(t): pct(np.mean(r1_iou >= t)) if kept else None
                     for t in OFFICIAL_IOU_THRESHOLDS}
        official[name] = {"MR-mAP": mr_map, "MR-R1": mr_r1}
        if extras:
            extra[name] = {
                f"MR-R1@{thr_key(EXTRA_R1_THRESHOLD)}": pct(np.mean(r1_iou >= EXTRA_R1_THRESHOLD)) if kept else None,
                "MR-mIoU": pct(np.mean(r1_iou)) if kept else None,
                "num_queries": len(kept),
            }
    return official, extra


# --------------------------------------------------------------------------- HL maths
def highlight_ap(pred_scores: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Interpolated AP of clip scores against binary labels (the official ``get_ap`` with
    ``interpolate=True, point_11=False``), vectorised.

    Args:
        pred_scores: (Q, L) clip scores; entries where ``valid`` is False are ignored.
        labels: (Q, L, A) binary labels {0, 1} (A annotators).
        valid: (Q, L) bool, each row a prefix of True.
    Returns:
        (Q, A): 0 when a row has no positive, 1 when every clip is positive, else the mean,
        over the distinct recall levels reached at the distinct score thresholds, of the
        best precision at that recall or higher.
    """
    scores = np.where(valid, pred_scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    s_sorted = np.take_along_axis(scores, order, axis=1)
    v_sorted = np.take_along_axis(valid, order, axis=1)
    y = np.take_along_axis(labels, order[..., None], axis=1).astype(np.float64)  # (Q, L, A)
    # a threshold sits at the last clip of every group of equal scores
    group_end = v_sorted.copy()
    group_end[:, :-1] &= s_sorted[:, :-1] != s_sorted[:, 1:]
    ge = group_end[..., None]
    tps = np.cumsum(y, axis=1)
    precision = tps / np.arange(1, y.shape[1] + 1, dtype=np.float64)[None, :, None]
    best_prec = np.maximum.accumulate(np.where(ge, precision, 0.0)[:, ::-1], axis=1)[:, ::-1]
    tps_at_ge = np.maximum.accumulate(np.where(ge, tps, 0.0), axis=1)
    prev = np.concatenate([np.zeros_like(tps_at_ge[:, :1]), tps_at_ge[:, :-1]], axis=1)
    new_recall = ge & (tps > prev)                              # first threshold of a new recall
    n_sel = new_recall.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ap = (best_prec * new_recall).sum(1) / n_sel
    n_pos = tps[:, -1, :]
    n_valid = valid.sum(1)[:, None]
    return np.where(n_pos == 0, 0.0, np.where(n_pos == n_valid, 1.0, ap))


def eval_highlight(pred_saliency: Dict[Hashable, np.ndarray], gt: Dict[Hashable, "_Gt"],
                   clip_length: float = 2.0) -> Dict[str, Dict[str, Optional[float]]]:
    """Official HL metrics: ``{"HL-min-Fair": {"HL-mAP", "HL-Hit1"}, "HL-min-Good": ...,
    "HL-min-VeryGood": ...}``.

    The GT of a query is a (num_clips, A) score matrix, ``num_clips = int(duration /
    clip_length)``, zero outside ``relevant_clip_ids``; predictions are cut or zero-padded
    to ``num_clips`` for mAP, while Hit@1 uses the argmax of the full prediction (a clip
    beyond the video counts as a miss).
    """
    qids = list(gt)
    num_clips = np.array([int(gt[q].duration / clip_length) for q in qids])
    n_ann = max(g.clip_scores.shape[1] for g in gt.values())
    length = int(num_clips.max())
    full = np.zeros((len(qids), length, n_ann))
    ann_valid = np.zeros((len(qids), n_ann), dtype=bool)
    scores = np.zeros((len(qids), length))
    valid = np.arange(length)[None, :] < num_clips[:, None]
    top_clip = np.zeros(len(qids), dtype=np.int64)
    for i, q in enumerate(qids):
        g = gt[q]
        full[i, g.clip_ids, :g.clip_scores.shape[1]] = g.clip_scores
        ann_valid[i, :g.clip_scores.shape[1]] = True
        pred = pred_saliency[q]
        n = min(len(pred), num_clips[i])
        scores[i, :n] = pred[:n]
        top_clip[i] = int(np.argmax(pred))
    in_video = top_clip < num_clips
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for name, min_score in SALIENCY_LEVELS:
        labels = (full >= min_score) & valid[..., None]
        ap = highlight_ap(scores, labels, valid)
        hit = np.zeros(len(qids))
        rows = np.nonzero(in_video)[0]
        hit[rows] = (labels[rows, top_clip[rows], :] & ann_valid[rows]).max(1)
        out[f"HL-min-{name}"] = {"HL-mAP": pct(ap[ann_valid].mean()), "HL-Hit1": pct(hit.mean())}
    return out


# --------------------------------------------------------------------------- public API
def eval_submission(submission: Sequence[dict], ground_truth: Sequence[dict], *,
                    match_number: bool = True, extras: bool = True,
                    max_pred_windows: Optional[int] = 10, clip_length: float = 2.0
                    ) -> "OrderedDict[str, Any]":
    """Evaluate QVHighlights predictions like the official ``eval_submission``.

    Args:
        submission: prediction rows (module docstring); a :class:`JsonlRows` from
            :func:`load_rows` makes errors name file and line.
        ground_truth: GT rows (module docstring).
        match_number: require the same qid set in both (official); False evaluates the
            intersection.
        extras: add ``MR-full-R1@0.3``, ``MR-full-mIoU`` to ``brief`` and the ``extra``
            block. With False the result equals the official output exactly.
        max_pred_windows: predicted windows per query used by mAP (official 10).
        clip_length: seconds per saliency clip (official 2).
    Returns:
        ``OrderedDict``: ``brief`` (flat official keys such as ``MR-full-mAP``,
        ``MR-full-R1@0.5``, ``HL-min-VeryGood-Hit1``), then ``HL-min-Fair``, ``HL-min-Good``,
        ``HL-min-VeryGood``, ``full``, ``long``, ``middle``, ``short`` (those present), then
        ``extra`` when requested.
    Raises:
        DataFormatError: bad rows (file, line, field), or no labels in the ground truth.
        QidMismatchError: qid sets differ while ``match_number``.
    """
    preds, has_mr, has_hl, p_src, p_lines = _parse_submission(submission, "<submission>")
    gts, g_src, g_lines = _parse_ground_truth(ground_truth, "<ground_truth>", clip_length,
                                              with_hl=has_hl)
    qids = match_qids([p.qid for p in preds], p_src, p_lines, [g.qid for g in gts], g_src,
                      g_lines, match_number)
    pred_by_qid = {p.qid: p for p in preds}
    gt_by_qid = {g.qid: g for g in gts}
    mr_qids = [q for q in qids if gt_by_qid[q].windows is not None] if has_mr else []
    hl_qids = [q for q in qids if gt_by_qid[q].clip_ids is not None] if has_hl else []
    if not mr_qids and not hl_qids:
        raise DataFormatError(
            "the ground truth has no labels for the evaluated queries (no relevant_windows"
            + (" / relevant_clip_ids" if has_hl else "") + "); is this the test split? "
            "QVHighlights test predictions are scored by the official server", path=g_src)

    metrics: Dict[str, Any] = {}
    brief: "OrderedDict[str, Any]" = OrderedDict()
    extra_block: Dict[str, Any] = {"num_queries": len(qids)}
    if mr_qids:
        official, extra = eval_moment_retrieval(
            {q: pred_by_qid[q].windows for q in mr_qids},
            {q: gt_by_qid[q].windows for q in mr_qids},
            max_pred_windows=max_pred_windows, extras=extras)
        metrics.update(official)
        mr_brief = {
            "MR-full-mAP": official["full"]["MR-mAP"]["average"],
            "MR-full-mAP@0.5": official["full"]["MR-mAP"]["0.5"],
            "MR-full-mAP@0.75": official["full"]["MR-mAP"]["0.75"],
            "MR-short-mAP": official["short"]["MR-mAP"]["average"],
            "MR-middle-mAP": official["middle"]["MR-mAP"]["average"],
            "MR-long-mAP": official["long"]["MR-mAP"]["average"],
            "MR-full-R1@0.5": official["full"]["MR-R1"]["0.5"],
            "MR-full-R1@0.7": official["full"]["MR-R1"]["0.7"],
        }
        if extras:
            mr_brief["MR-full-R1@0.3"] = extra["full"]["MR-R1@0.3"]
            mr_brief["MR-full-mIoU"] = extra["full"]["MR-mIoU"]
            extra_block.update(extra)
            extra_block["num_skipped_no_windows"] = len(qids) - len(mr_qids)
        brief.update(sorted(mr_brief.items()))
    elif has_mr and extras:
        extra_block["num_skipped_no_windows"] = len(qids)
    if has_hl and hl_qids:
        hl = eval_highlight({q: pred_by_qid[q].saliency for q in hl_qids},
                            {q: gt_by_qid[q] for q in hl_qids}, clip_length=clip_length)
        metrics.update(hl)
        brief.update((f"{k}-{sub.split('-')[1]}", v[sub]) for k, v in hl.items() for sub in v)
        if extras:
            extra_block["HL-num_queries"] = len(hl_qids)
    if has_hl and extras:
        extra_block["num_skipped_no_saliency"] = len(qids) - len(hl_qids)

    result: "OrderedDict[str, Any]" = OrderedDict()
    result["brief"] = brief
    result.update(sorted(metrics.items()))
    if extras:
        result["extra"] = extra_block
    return result


def eval_r1_miou(submission: Sequence[dict], ground_truth: Sequence[dict],
                 thresholds: Sequence[float] = (0.3, 0.5, 0.7), topk: Sequence[int] = (1, 5), *,
                 match_number: bool = True) -> "OrderedDict[str, Any]":
    """Charades-STA / TACoS convention: ``R{k}@{t}`` and ``mIoU``.

    ``R{k}@{t}`` is the percentage of queries where one of the first k listed predicted
    windows (the rows are expected ranked, as written by the predictor) has IoU >= t with
    some GT window (max over GT windows). ``mIoU`` is the mean over queries of that best IoU
    of the first window. Percent, 2 decimals. Prediction windows are ``[st, ed]`` or
    ``[st, ed, score]``; GT rows need ``relevant_windows`` (rows without are skipped and
    counted).

    Returns:
        ``{"brief": {"R1@0.3", ..., "R5@0.7", "mIoU"}, "num_queries", "num_skipped_no_gt"}``.
    """
    topk = sorted({int(k) for k in topk})
    if not topk or topk[0] < 1:
        raise ValueError(f"topk must be positive integers, got {topk}")
    preds, _, _, p_src, p_lines = _parse_submission(submission, "<submission>", window_width=2,
                                                    need_mr=True, need_hl=False)
    gts, g_src, g_lines = _parse_ground_truth(ground_truth, "<ground_truth>", 1.0, with_hl=False)
    qids = match_qids([p.qid for p in preds], p_src, p_lines, [g.qid for g in gts], g_src,
                      g_lines, match_number)
    pred_by_qid = {p.qid: p for p in preds}
    gt_by_qid = {g.qid: g for g in gts}
    labelled = [q for q in qids if gt_by_qid[q].windows is not None]
    if not labelled:
        raise DataFormatError("the ground truth has no relevant_windows for the evaluated "
                              "queries (test split?)", path=g_src)
    max_k = topk[-1]
    best = np.zeros((len(labelled), max_k))          # best IoU of the rank-k window, 0 if none
    for i, q in enumerate(labelled):
        ious = iou_max_over_gt(pred_by_qid[q].windows[:max_k, :2], gt_by_qid[q].windows)
        best[i, :len(ious)] = ious
    brief: "OrderedDict[str, Any]" = OrderedDict()
    for k in topk:
        top = best[:, :k].max(1)
        for t in thresholds:
            brief[f"R{k}@{thr_key(t)}"] = pct(np.mean(top >= t))
    brief["mIoU"] = pct(best[:, 0].mean())
    return OrderedDict([("brief", brief), ("num_queries", len(labelled)),
                        ("num_skipped_no_gt", len(qids) - len(labelled))])


def evaluate_files(submission_path: str, gt_path: str, protocol: str = "qvh",
                   match_number: bool = True, extras: bool = True,
                   iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7),
                   topk: Sequence[int] = (1, 5)) -> "OrderedDict[str, Any]":
    """Read both JSON-lines files (errors name file and line) and evaluate.

    ``protocol``: ``qvh`` (:func:`eval_submission`; ``extras`` applies) or ``r1miou``
    (:func:`eval_r1_miou`; ``iou_thresholds`` and ``topk`` apply).
    """
    if protocol not in ("qvh", "r1miou"):
        raise ValueError(f"unknown protocol {protocol!r} (qvh, r1miou)")
    submission, ground_truth = load_rows(submission_path), load_rows(gt_path)
    if protocol == "qvh":
        return eval_submission(submission, ground_truth, match_number=match_number, extras=extras)
    return eval_r1_miou(submission, ground_truth, iou_thresholds, topk, match_number=match_number)


def format_brief_table(brief: Dict[str, Any]) -> str:
    """The ``brief`` metrics as an aligned two-column text table."""
    if not brief:
        return "(no metrics)"
    width = max(len("metric"), *(len(k) for k in brief))
    lines = [f"{'metric':<{width}}  {'value':>8}", f"{'-' * width}  {'-' * 8}"]
    for k, v in brief.items():
        value = "n/a" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append(f"{k:<{width}}  {value:>8}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, protocols: Sequence[str] = ("qvh", "r1miou")) -> None:
    """The options shared by ``python -m lavis_c2f.evaluation.qvh`` and ``lavis-c2f eval``."""
    parser.add_argument("--submission", required=True, help="prediction JSON-lines file")
    parser.add_argument("--gt", required=True, help="ground-truth JSON-lines file")
    parser.add_argument("--out", default=None, help="metrics JSON to write (atomically)")
    parser.add_argument("--protocol", choices=list(protocols), default="qvh",
                        help="qvh: official QVHighlights MR+HL; r1miou: Charades-STA/TACoS R@k "
                             "and mIoU" + ("; vcmr: corpus moment retrieval" if "vcmr" in protocols else ""))
    parser.add_argument("--no-match-number", dest="match_number", action="store_false",
                        help="evaluate the qids common to both files instead of requiring equal sets")
    parser.add_argument("--iou-thresholds", type=float, nargs="+", default=None, metavar="T",
                        help="IoU thresholds (r1miou: 0.3 0.5 0.7; vcmr: 0.5 0.7); the qvh "
                             "protocol has fixed official thresholds")
    parser.add_argument("--topk", type=int, nargs="+", default=None, metavar="K",
                        help="cut-offs K (r1miou: 1 5; vcmr: 1 5 10 100)")


def run_from_args(args: argparse.Namespace) -> int:
    """Evaluate, write ``--out``, print the brief table. Returns 0."""
    start = time.perf_counter()
    options = {}
    if getattr(args, "iou_thresholds", None):
        options["iou_thresholds"] = tuple(args.iou_thresholds)
    if getattr(args, "topk", None):
        if min(args.topk) < 1:
            raise ConfigError(f"--topk values must be positive, got {args.topk}")
        options["topk"] = tuple(args.topk)
    if args.protocol == "vcmr":
        if "topk" in options:
            options["ks"] = options.pop("topk")
        result = vcmr_files(args.submission, args.gt, match_number=args.match_number, **options)
    else:
        if args.protocol == "qvh" and options:
            raise ConfigError("--iou-thresholds/--topk do not apply to the official qvh protocol")
        result = evaluate_files(args.submission, args.gt, protocol=args.protocol,
                                match_number=args.match_number, **options)
    elapsed = time.perf_counter() - start
    if args.out:
        write_json(result, args.out, indent=4)
    print(format_brief_table(result["brief"]))
    print(f"({args.protocol} evaluation of {args.submission} in {elapsed:.2f} s"
          + (f"; written to {args.out})" if args.out else ")"))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lavis_c2f.evaluation.qvh",
                                     description="QVHighlights (official) and R@k/mIoU evaluation.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (DataFormatError, ConfigError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
