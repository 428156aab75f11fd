"""Stage-1 results -> stage-2 annotation files (``lavis-c2f merge-stage1``).

Input: a stage-1 ranks file (``{"qid", "query", "ranked_vids": [[vid, score], ...]}`` per
line, written by the ``c2f_video_retrieval`` task) and a split's annotation file. Output: the
annotation rows, in their order, each with one more key::

    "stage1_result": [[vid, score], ...]      # the query's top-K retrieved videos, ranked

The output is QVHighlights jsonl (QVHighlights rows are copied unchanged; Charades-STA /
TACoS annotations are converted with :meth:`MomentRecord.to_qvh_dict`), so a stage-2 dataset
YAML reads it with ``format: qvh`` and every record carries ``extra["stage1_result"]``. The
``c2f_corpus_moment_retrieval`` task grounds each query in those videos, and its training
split can add hard negatives from them (:mod:`lavis_c2f.pipeline.hard_negatives`).

Validation (errors name file, line and field): every annotation qid needs a stage-1 row
(unless ``allow_missing``), every stage-1 qid must be in the annotations, qids are unique,
each kept ``[vid, score]`` is a string id with a finite score, listed once, and each kept video must be
known: a video of the annotation file or of the ``videos`` list (the corpus). The output is
written atomically.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.common.io import iter_jsonl, write_jsonl
from lavis_c2f.data.readers import detect_format, read_annotations

logger = logging.getLogger(__name__)

STAGE1_KEY = "stage1_result"


def qid_key(qid: Any) -> str:
    """Match key of a qid: ints and their decimal strings match (JSON writers differ)."""
    return str(qid)


@dataclass
class Stage1Row:
    """One validated row of a stage-1 ranks file."""

    qid: Any
    line: int
    ranked: List[List[Any]]  # [[vid, score], ...] in file order


def _check_ranked(value: Any, path: str, line: Optional[int], limit: Optional[int],
                  field: str = "ranked_vids") -> List[List[Any]]:
    if not isinstance(value, list):
        raise DataFormatError(f"expected a list of [vid, score], got {type(value).__name__}", path=path,
                              line=line, field=field)
    out = []
    seen: Dict[str, int] = {}
    for i, item in enumerate(value if limit is None else value[:limit]):
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str) or not item[0]
                or isinstance(item[1], bool) or not isinstance(item[1], (int, float))
                or not math.isfinite(float(item[1]))):
            raise DataFormatError(f"expected [vid (non-empty string), finite score], got {item!r}", path=path,
                                  line=line, field=f"{field}[{i}]")
        if item[0] in seen:
            raise DataFormatError(f"video {item[0]!r} is listed twice (first at {field}[{seen[item[0]]}])",
                                  path=path, line=line, field=f"{field}[{i}]")
        seen[item[0]] = i
        out.append([item[0], float(item[1])])
    return out


def read_stage1_ranks(path: str, limit: Optional[int] = None) -> Dict[str, Stage1Row]:
    """Validated stage-1 rows keyed by :func:`qid_key` (the first ``limit`` entries of each
    ranked list are checked and kept; None = all)."""
    path = str(path)
    out: Dict[str, Stage1Row] = {}
    for line, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise DataFormatError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
        if "qid" not in obj:
            raise DataFormatError("missing field", path=path, line=line, field="qid")
        qid = obj["qid"]
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise DataFormatError(f"expected an int or string qid, got {qid!r}", path=path, line=line, field="qid")
        if "ranked_vids" not in obj:
            raise DataFormatError("missing field", path=path, line=line, field="ranked_vids")
        key = qid_key(qid)
        if key in out:
            raise DataFormatError(f"duplicate qid {qid!r} (first on line {out[key].line})", path=path, line=line,
                                  field="qid")
        out[key] = Stage1Row(qid, line, _check_ranked(obj["ranked_vids"], path, line, limit))
    if not out:
        raise DataFormatError("no stage-1 rows (empty file)", path=path)
    return out


def read_annotation_rows(path: str, fmt: str = "auto", **reader_kwargs: Any) -> List[Tuple[int, Dict[str, Any]]]:
    """``(line, QVHighlights row)`` of every annotation, validated by the package readers.

    QVHighlights jsonl rows are returned exactly as stored (every key kept); other formats
    (Charades-STA txt, TACoS json) are read into records and converted (``line`` is then the
    record's source line when known, else its position).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataFormatError("annotation file not found", path=path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    records = read_annotations(path, fmt=fmt, **reader_kwargs)   # validation, file:line errors
    if fmt == "qvh":
        raw = list(iter_jsonl(path))
        if len(raw) != len(records):  # on_error=skip dropped rows: keep the validated ones
            keep = {r.source for r in records}
            raw = [(ln, o) for ln, o in raw if f"{path}:{ln}" in keep]
        return raw
    out = []
    for i, rec in enumerate(records):
        line = i + 1
        if rec.source and ":" in rec.source:
            tail = rec.source.rsplit(":", 1)[1]
            line = int(tail) if tail.isdigit() else line
        out.append((line, rec.to_qvh_dict()))
    return out


def read_video_list(path: str) -> Set[str]:
    """Video ids from a text file (one per line) or a JSON list / ``{"vids": [...]}``."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataFormatError("video list not found", path=path)
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("[") or stripped.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"invalid JSON: {e.msg}", path=path, line=e.lineno) from None
        if isinstance(obj, dict):
            obj = obj.get("vids")
        if not isinstance(obj, list) or not all(isinstance(v, str) for v in obj):
            raise DataFormatError("expected a JSON list of video id strings (or {\"vids\": [...]})", path=path)
        return set(obj)
    return {ln.strip() for ln in text.splitlines() if ln.strip()}


def merge_stage1(stage1_path: str, ann_path: str, top_k: int, out_path: str, *, fmt: str = "auto",
                 videos: Optional[Iterable[str]] = None, allow_missing: bool = False,
                 reader_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``out_path``: the annotation rows of ``ann_path`` with ``stage1_result`` (top-K).

    Args:
        stage1_path: stage-1 ranks jsonl.
        ann_path: the split's annotations (QVHighlights jsonl, Charades-STA txt, TACoS json).
        top_k: videos kept per query (>= 1).
        out_path: output jsonl (written atomically).
        fmt: annotation format (``auto`` detects it).
        videos: extra known video ids (the corpus beyond the annotation's videos).
        allow_missing: annotation qids without a stage-1 row get an empty list instead of an error.
        reader_kwargs: options of the annotation reader (e.g. ``durations`` for Charades-STA).
    Returns:
        summary ``{"out", "num_queries", "top_k", "num_missing", "gt_in_top_k" (%), "mean_candidates"}``.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"--top-k: expected a positive integer, got {top_k!r}")
    ann = read_annotation_rows(ann_path, fmt, **(reader_kwargs or {}))
    stage1 = read_stage1_ranks(stage1_path, limit=top_k)
    ann_keys: Dict[str, int] = {}
    known: Set[str] = set(videos or ())
    for line, row in ann:
        ann_keys[qid_key(row["qid"])] = line
        known.add(str(row["vid"]))
    for key, s in stage1.items():
        if key not in ann_keys:
            raise DataFormatError(f"unknown qid {s.qid!r}: it is not in the annotation file {ann_path}",
                                  path=str(stage1_path), line=s.line, field="qid")
        for i, (vid, _score) in enumerate(s.ranked):
            if vid not in known:
                raise DataFormatError(f"video {vid!r} is missing: it is neither a video of {ann_path} nor in the "
                                      "given corpus video list", path=str(stage1_path), line=s.line,
                                      field=f"ranked_vids[{i}]")
    rows, missing, hits, n_cand = [], 0, 0, 0
    for line, row in ann:
        s = stage1.get(qid_key(row["qid"]))
        if s is None:
            if not allow_missing:
                raise DataFormatError(f"qid {row['qid']!r} has no row in the stage-1 file {stage1_path}",
                                      path=str(ann_path), line=line, field="qid")
            missing += 1
            ranked: List[List[Any]] = []
        else:
            ranked = s.ranked
        out = dict(row)
        out[STAGE1_KEY] = ranked
        rows.append(out)
        hits += any(v == row["vid"] for v, _ in ranked)
        n_cand += len(ranked)
    write_jsonl(rows, out_path)
    n = max(len(rows), 1)
    summary = {"out": str(out_path), "num_queries": len(rows), "top_k": top_k, "num_missing": missing,
               "gt_in_top_k": round(100.0 * hits / n, 2), "mean_candidates": round(n_cand / n, 2)}
    logger.debug("merge-stage1: %s", summary)
    return summary


def stage1_lists(records: Sequence[Any], source: Optional[str], top_k: Optional[int] = None,
                 where: str = "run.stage1_ranks") -> List[List[List[Any]]]:
    """Each record's ranked ``[[vid, score], ...]``: from ``source`` (a stage-1 ranks file)
    when given, else from the records' ``extra["stage1_result"]`` (merged annotations).

    Raises :class:`ConfigError` when neither is available and :class:`DataFormatError`
    (file/line/field) for bad or missing entries.
    """
    if source:
        ranks = read_stage1_ranks(source, limit=top_k)
        out = []
        for rec in records:
            s = ranks.get(qid_key(rec.qid))
            if s is None:
                raise DataFormatError(f"qid {rec.qid!r} (annotation {rec.source}) has no row in the stage-1 file",
                                      path=str(source), field="qid")
            out.append(s.ranked)
        return out
    out = []
    for rec in records:
        extra = getattr(rec, "extra", {}) or {}
        if STAGE1_KEY not in extra:
            raise ConfigError(f"{where} is not set and the annotation of qid {rec.qid!r} ({rec.source}) has no "
                              f"'{STAGE1_KEY}': run `lavis-c2f merge-stage1` on it or set {where}")
        path, _, line = (rec.source or "").rpartition(":")
        ranked = _check_ranked(extra[STAGE1_KEY], path or "<annotations>", int(line) if line.isdigit() else None,
                               top_k, field=STAGE1_KEY)
        out.append(ranked)
    return out
