"""Score fusion of the coarse-to-fine pipeline and its evaluation (pure python + numpy).

Stage 1 gives, for a query, K candidate videos with retrieval scores ``s1_c`` (any scale:
T-MASS cosines, Sinkhorn logits ...). Stage 2 gives, in each candidate, windows with
confidences ``s2_cj`` in [0, 1] (the grounder's foreground probability). Fusion turns them
into one ranked list of moments ``[vid, st, ed, score]`` for the query.

Normalising stage 1 (within the query's K candidates; ``s1_norm``):

* ``zscore`` (default): ``z_c = (s1_c - mean) / std`` (0 for all when std = 0 or K = 1);
  scale-free, so one weight transfers across retrievers and corpora.
* ``minmax``: ``(s1_c - min) / (max - min)`` in [0, 1] (0 for all when max = min).
* ``rank``: ``1 - (r_c - 1) / K`` for the 1-based stage-1 rank ``r_c`` (1 for the first).

Forms (``form``, ``weight`` w):

* ``product`` (default): ``score = s2 * exp(w * s1n)``, i.e. ``log score = log s2 + w s1n``:
  a log-linear combination. w = 0 ranks moments by the grounder alone; large w orders
  videos by stage 1 and moments by stage 2 within a video.
* ``sum``: ``score = (1 - w) * s2 + w * s1n`` with w in [0, 1] (a weighted sum of normalised
  scores; use ``s1_norm: minmax`` to keep both terms in [0, 1]).
* ``stage1``: order videos by stage 1 and windows by stage 2 within each video (the limit of
  ``product`` for w -> infinity). ``weight`` is ignored.

Ties are broken by stage-1 order, then by the grounder's window order (a stable sort).

Candidate rows (what the corpus task writes to ``<split>_<epoch>_candidates.jsonl``, and what
``lavis-c2f tune-fusion`` reads)::

    {"qid", "query",
     "gt_vid": str or null, "relevant_windows": [[st, ed], ...],     # ground truth (may be empty)
     "stage1": [[vid, s1], ...],                                    # stage-1 list as read
     "candidates": [[vid, s1, [[st, ed, s2], ...]], ...],            # grounded top-K, stage-1 order
     "gt_windows": [[st, ed, s2], ...] or null,                      # grounder in the GT video
     "gt_saliency": [...] or null}

:func:`evaluate_candidates` reports, from these rows:

* ``VCMR-R@K-IoU@t`` (K in 1, 5, 10, 100; t in 0.5, 0.7) and ``VR-R@K`` of the fused list
  (:func:`lavis_c2f.evaluation.eval_vcmr`);
* ``stage1-R@K``: the GT video's rank in the stage-1 list (absent = miss);
* the single-video moment retrieval metrics of the grounder in the GT video (official
  QVHighlights ``eval_submission`` brief keys, or ``MR-R1@t`` / ``MR-mIoU`` for the
  Charades-STA / TACoS convention);
* ``oracle-VCMR-R@K-IoU@t``: the upper bound when stage 1 is perfect: the GT video's
  windows come first (by s2), then the rest of the fused list. The gap between it and
  ``VCMR`` is what stage 1 costs; the gap between it and 100 is what stage 2 costs.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.common.io import read_json
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.evaluation._rows import pct
from lavis_c2f.evaluation.qvh import eval_r1_miou, eval_submission
from lavis_c2f.evaluation.vcmr import eval_vcmr

FORMS = ("product", "sum", "stage1")
S1_NORMS = ("zscore", "minmax", "rank")
DEFAULT_GRIDS = {"product": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
                 "sum": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                 "stage1": (0.0,)}
VCMR_KS = (1, 5, 10, 100)
IOU_THRESHOLDS = (0.5, 0.7)
TUNE_METRIC = "VCMR-R@1-IoU@0.5"
TUNE_KS = (1, 5, 10)


@dataclass(frozen=True)
class FusionConfig:
    """How stage-1 and stage-2 scores are fused (module docstring).

    Args:
        form: ``product`` | ``sum`` | ``stage1``.
        weight: w (>= 0; <= 1 for ``sum``).
        s1_norm: ``zscore`` | ``minmax`` | ``rank``.
        max_moments: moments kept per query in the fused list.
    """

    form: str = "product"
    weight: float = 1.0
    s1_norm: str = "zscore"
    max_moments: int = 100

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ConfigError(f"fusion.form: expected one of {FORMS}, got {self.form!r}")
        if self.s1_norm not in S1_NORMS:
            raise ConfigError(f"fusion.s1_norm: expected one of {S1_NORMS}, got {self.s1_norm!r}")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"fusion.weight: expected a finite number >= 0, got {w!r}")
        if self.form == "sum" and w > 1:
            raise ConfigError(f"fusion.weight: the 'sum' form needs a weight in [0, 1], got {w!r}")
        if isinstance(self.max_moments, bool) or not isinstance(self.max_moments, int) or self.max_moments < 1:
            raise ConfigError(f"fusion.max_moments: expected a positive integer, got {self.max_moments!r}")

    @classmethod
    def from_mapping(cls, d: Optional[Mapping[str, Any]], where: str = "fusion") -> "FusionConfig":
        """From a YAML mapping (unknown keys raise :class:`ConfigError` naming them)."""
        d = check_keys(d, {f.name for f in fields(cls)}, where)
        if "weight" in d and isinstance(d["weight"], (int, float)) and not isinstance(d["weight"], bool):
            d["weight"] = float(d["weight"])
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(str(e).replace("fusion.", f"{where}.", 1)) from None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def normalise_s1(scores: Sequence[float], method: str = "zscore") -> np.ndarray:
    """Stage-1 scores of one query's candidates (in stage-1 order) -> normalised (K,)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) == 0:
        return s
    if method == "zscore":
        std = s.std()
        return (s - s.mean()) / std if std > 1e-12 else np.zeros_like(s)
    if method == "minmax":
        span = s.max() - s.min()
        return (s - s.min()) / span if span > 1e-12 else np.zeros_like(s)
    if method == "rank":
        return 1.0 - np.arange(len(s), dtype=np.float64) / len(s)
    raise ConfigError(f"fusion.s1_norm: expected one of {S1_NORMS}, got {method!r}")


def fuse_candidates(candidates: Sequence[Sequence[Any]], config: FusionConfig) -> List[List[Any]]:
    """One query's candidates ``[[vid, s1, [[st, ed, s2], ...]], ...]`` (stage-1 order) ->
    fused moments ``[[vid, st, ed, score], ...]``, best first, at most ``max_moments``."""
    if not candidates:
        return []
    s1n = normalise_s1([c[1] for c in candidates], config.s1_norm)
    entries: List[Tuple[float, int, int, List[Any]]] = []
    k = len(candidates)
    for ci, (vid, _s1, windows) in enumerate(candidates):
        for wi, w in enumerate(windows):
            st, ed, s2 = float(w[0]), float(w[1]), float(w[2])
            if config.form == "product":
                score = s2 * math.exp(config.weight * s1n[ci])
            elif config.form == "sum":
                score = (1.0 - config.weight) * s2 + config.weight * s1n[ci]
            else:  # stage1: video order first, then s2
                score = (k - ci) + s2
            entries.append((score, ci, wi, [vid, st, ed, score]))
    entries.sort(key=lambda e: (-e[0], e[1], e[2]))
    return [e[3] for e in entries[: config.max_moments]]


def oracle_moments(row: Mapping[str, Any], fused: Sequence[Sequence[Any]], max_moments: int) -> List[List[Any]]:
    """Upper bound of a perfect stage 1: the GT video's windows first (by s2, best first),
    then the fused list without the GT video's moments."""
    gt_vid = row.get("gt_vid")
    gt_windows = row.get("gt_windows") or []
    first = sorted(([gt_vid, float(w[0]), float(w[1]), float(w[2])] for w in gt_windows),
                   key=lambda m: -m[3])  # stable: grounder order among equal scores
    rest = [list(m) for m in fused if m[0] != gt_vid]
    return (first + rest)[:max_moments]


def fuse_rows(rows: Sequence[Mapping[str, Any]], config: FusionConfig) -> List[Dict[str, Any]]:
    """Candidate rows -> corpus moment rows ``{qid, query, pred_moments}``."""
    return [{"qid": r["qid"], "query": r.get("query", ""), "pred_moments": fuse_candidates(r["candidates"], config)}
            for r in rows]


def _stage1_ranks(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    ranks = []
    for r in rows:
        rank = math.inf
        for i, (vid, _s) in enumerate(r.get("stage1") or []):
            if vid == r.get("gt_vid"):
                rank = i + 1
                break
        ranks.append(rank)
    return np.asarray(ranks, dtype=np.float64)


def single_video_metrics(rows: Sequence[Mapping[str, Any]], protocol: str = "qvh", clip_length: float = 2.0,
                         max_pred_windows: int = 10) -> Dict[str, Any]:
    """Official single-video moment retrieval metrics of the grounder in the GT video.

    Returns the evaluation's full output (``brief`` included); r1miou keys get an ``MR-``
    prefix in ``brief`` so they cannot be confused with the retrieval recalls."""
    preds, gts = [], []
    for r in rows:
        if not r.get("relevant_windows") or r.get("gt_windows") is None:
            continue
        preds.append({"qid": r["qid"], "query": r.get("query", ""), "vid": r["gt_vid"],
                      "pred_relevant_windows": [[float(w[0]), float(w[1]), float(w[2])] for w in r["gt_windows"]],
                      "pred_saliency_scores": list(r.get("gt_saliency") or [])})
        g = {"qid": r["qid"], "query": r.get("query", ""), "vid": r["gt_vid"],
             "relevant_windows": r["relevant_windows"], "duration": r.get("duration")}
        for key in ("relevant_clip_ids", "saliency_scores"):
            if r.get(key) is not None:
                g[key] = r[key]
        gts.append(g)
    if not preds:
        return {"brief": {}, "note": "no query with ground truth"}
    if protocol == "qvh":
        has_hl = all(p["pred_saliency_scores"] for p in preds)
        if not has_hl:  # no saliency predicted for some query: evaluate MR only
            for p in preds:
                p.pop("pred_saliency_scores", None)
        return eval_submission(preds, gts, match_number=False, max_pred_windows=max_pred_windows,
                               clip_length=clip_length)
    if protocol == "r1miou":
        out = eval_r1_miou(preds, gts, match_number=False)
        out = dict(out)
        out["brief"] = OrderedDict((f"MR-{k}", v) for k, v in out["brief"].items())
        return out
    raise ConfigError(f"run.eval_protocol: unknown protocol '{protocol}' (qvh or r1miou)")


def evaluate_candidates(rows: Sequence[Mapping[str, Any]], config: FusionConfig, protocol: str = "qvh",
                        clip_length: float = 2.0, max_pred_windows: int = 10,
                        single_video: bool = True) -> Tuple[Dict[str, Any], Dict[str, Any], List[Dict[str, Any]]]:
    """Every metric of the module docstring from candidate rows.

    Returns:
        ``(flat, report, vcmr_rows)``: flat metrics (numbers), the full report (nested), and
        the fused corpus moment rows of every query.
    """
    vcmr_rows = fuse_rows(rows, config)
    labelled = [i for i, r in enumerate(rows) if r.get("relevant_windows") and r.get("gt_vid") is not None]
    report: Dict[str, Any] = {"fusion": config.to_dict(), "num_queries": len(rows),
                              "num_labelled": len(labelled)}
    flat: Dict[str, Any] = {}
    if not labelled:
        report["note"] = "no ground truth: predictions only"
        return flat, report, vcmr_rows
    gt = [{"qid": rows[i]["qid"], "vid": rows[i]["gt_vid"], "relevant_windows": rows[i]["relevant_windows"]}
          for i in labelled]
    sub = [vcmr_rows[i] for i in labelled]
    vcmr = eval_vcmr(sub, gt, VCMR_KS, IOU_THRESHOLDS)
    oracle_rows = [{"qid": rows[i]["qid"], "pred_moments": oracle_moments(rows[i], vcmr_rows[i]["pred_moments"],
                                                                          config.max_moments)}
                   for i in labelled]
    oracle = eval_vcmr(oracle_rows, gt, VCMR_KS, IOU_THRESHOLDS)
    ranks = _stage1_ranks([rows[i] for i in labelled])
    stage1 = OrderedDict((f"stage1-R@{k}", pct(float(np.mean(ranks <= k)))) for k in VCMR_KS)
    finite = ranks[np.isfinite(ranks)]
    stage1["stage1-found"] = pct(len(finite) / len(ranks))
    report.update({"vcmr": vcmr, "oracle_vcmr": oracle, "stage1": stage1})
    flat.update(vcmr["brief"])
    flat.update({f"oracle-{k}": v for k, v in oracle["brief"].items() if k.startswith("VCMR")})
    flat.update(stage1)
    if single_video:
        sv = single_video_metrics([rows[i] for i in labelled], protocol, clip_length, max_pred_windows)
        report["single_video"] = sv
        flat.update({k: v for k, v in sv.get("brief", {}).items() if isinstance(v, (int, float))})
    return flat, report, vcmr_rows


def tune_fusion(rows: Sequence[Mapping[str, Any]], form: str = "product", weights: Optional[Iterable[float]] = None,
                s1_norm: str = "zscore", max_moments: int = 100, metric: str = TUNE_METRIC,
                smooth: int = 1, recall_ks: Sequence[int] = TUNE_KS) -> Dict[str, Any]:
    """Grid search of the fusion weight on (validation) candidate rows.

    Weight ``w_i`` of the sorted grid gets the score

        score(w_i) = mean over j in [i - smooth, i + smooth] (clipped to the grid) of
                     mean over K in recall_ks of VCMR-R@K-IoU@t (w_j)

    with ``t`` the IoU of ``metric``; the best score wins, ties the smaller weight. On a
    validation split of a few hundred queries R@1 alone is flat over a wide range of weights
    and its argmax jumps across that range with the rounding noise of the grounder, now and then
    to the plateau's edge where the test curve falls, or to a large weight that trades R@10 for
    a noise-level R@1 gain; R@5 and R@10 add information and the grid window prefers the middle
    of the best plateau (docs/reproducibility.md). ``smooth=0, recall_ks=(1,)`` is the plain
    argmax of R@1. Returns ``{"form", "weight", "s1_norm", "max_moments", "metric", "value"
    (``metric`` at the chosen weight), "smooth", "recall_ks", "grid": [{"weight", "score",
    "metrics"}, ...], "num_queries"}``.
    """
    grid = sorted({float(w) for w in (weights if weights is not None else DEFAULT_GRIDS[form])})
    if not grid:
        raise ConfigError("tune-fusion: empty weight grid")
    if not rows:
        raise DataFormatError("tune-fusion: no candidate rows")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0:
        raise ConfigError(f"tune-fusion: smooth must be an integer >= 0, got {smooth!r}")
    iou = metric.rsplit("-IoU@", 1)[-1] if "-IoU@" in metric else "0.5"
    score_keys = [f"VCMR-R@{int(k)}-IoU@{iou}" for k in recall_ks]
    if not score_keys:
        raise ConfigError("tune-fusion: recall_ks is empty")
    results = []
    for w in grid:
        cfg = FusionConfig(form=form, weight=w, s1_norm=s1_norm, max_moments=max_moments)
        flat, _, _ = evaluate_candidates(rows, cfg, single_video=False)
        for key in [metric] + score_keys:
            if key not in flat:
                raise ConfigError(f"tune-fusion: unknown metric {key!r}; known: {sorted(flat)}")
        results.append({"weight": w, "metrics": flat})
    means = [float(np.mean([r["metrics"][k] for k in score_keys])) for r in results]
    best = None
    for i, res in enumerate(results):
        res["score"] = round(float(np.mean(means[max(0, i - smooth): i + smooth + 1])), 4)
        if best is None or res["score"] > best["score"]:
            best = res
    return {"form": form, "weight": best["weight"], "s1_norm": s1_norm, "max_moments": max_moments,
            "metric": metric, "value": best["metrics"][metric], "smooth": smooth,
            "recall_ks": [int(k) for k in recall_ks],
            "grid": [{"weight": r["weight"], "score": r["score"], "metrics": r["metrics"]} for r in results],
            "num_queries": len(rows)}


def load_fusion_choice(path: str) -> FusionConfig:
    """The :class:`FusionConfig` written by ``lavis-c2f tune-fusion`` (errors name the file)."""
    d = read_json(path)
    if not isinstance(d, dict):
        raise DataFormatError("expected a JSON object", path=path)
    try:
        return FusionConfig.from_mapping({k: d[k] for k in ("form", "weight", "s1_norm", "max_moments") if k in d},
                                         where=str(path))
    except ConfigError as e:
        raise DataFormatError(str(e), path=path) from None
