"""Annotation readers: QVHighlights jsonl, Charades-STA txt and TACoS (2D-TAN json) -> ``MomentRecord``.

Every reader returns a :class:`RecordList` (a ``list`` of
:class:`~lavis_c2f.data.records.MomentRecord`) whose ``.report`` is a :class:`ReadReport`.
Times are in **seconds**.

Validation
----------
Bad input raises one :class:`~lavis_c2f.common.errors.DataFormatError` naming the file, the
1-based line (jsonl/txt) and the field: malformed line, missing field, wrong type, empty
query, duplicate qid, ``start >= end``, window outside ``[0, duration]``. With
``on_error="skip"`` the offending record is dropped instead, each problem is logged at
WARNING level and kept in ``report.problems`` and counted in ``report.n_skipped``.
A missing file always raises.

Windows and durations
---------------------
* A window end (or start) lying outside ``[0, duration]`` by at most ``tolerance`` seconds
  (default 1.0 s) is clamped into the video and counted in ``report.n_clamped``. The real
  TACoS 2D-TAN files need this: 48 windows end up to 0.51 s after ``num_frames / fps``.
* Beyond the tolerance the window is an error, unless ``clamp=True``, which clamps any window
  (and counts it). Use ``clamp=True`` when durations come from features
  (``num_clips * clip_length`` drops the last partial clip, so Charades-STA windows often end
  after it). A window that is empty after clamping (it starts after the video ends) is an
  error in every mode.
* ``start > end`` is an error unless ``swap_reversed=True`` (counted in ``report.n_swapped``);
  the real Charades-STA train file has 4 such lines (e.g. line 8252 ``LEOL6 8.0 7.0``), which
  MESM swaps. ``start == end`` is always an error.

Generated query ids (Charades-STA and TACoS have none)
------------------------------------------------------
* Charades-STA: ``qid = qid_offset + (line_number - 1)``, the 0-based line index in the file
  (blank lines consume an index), as MESM numbers its test queries.
* TACoS: ``qid = qid_offset + k`` where ``k`` counts sentences in file order (videos in JSON
  order, then sentences in order), skipped ones included, so ids are stable under skipping.

Items (CALCE)
-------------
A QVHighlights row's ``items`` (a list of strings, the query's noun phrases as CALCE ships them)
goes to ``record.items``. CALCE's own preprocessed files (``format: calce``, a JSON list of
``{video, qid, query, duration, items, relevant_windows[, stage1_result]}``, QVHighlights and
Charades-STA alike) are read by :func:`read_calce_json`; ``stage1_result`` (CALCE's stage-1
windows) goes to ``record.extra["coarse_windows"]``.
"""
from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.common.io import read_json, write_jsonl
from lavis_c2f.data.records import MomentRecord

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
DurationSource = Union[Mapping[str, float], PathLike, Callable[[str], float], Any]

FORMATS = ("qvh", "charades_sta", "tacos", "calce")
DEFAULT_TOLERANCE = 1.0


@dataclass
class ReadReport:
    """What a reader did: counts and the problems it skipped (``on_error="skip"``)."""

    path: str
    n_read: int = 0
    n_skipped: int = 0
    n_clamped: int = 0
    n_swapped: int = 0
    problems: List[DataFormatError] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.path}: {self.n_read} records read, {self.n_skipped} skipped, "
                f"{self.n_clamped} windows clamped, {self.n_swapped} swapped")


class RecordList(list):
    """``list[MomentRecord]`` with the :class:`ReadReport` of the read as ``.report``."""

    def __init__(self, records: Iterable[MomentRecord] = (), report: Optional[ReadReport] = None):
        super().__init__(records)
        self.report = report if report is not None else ReadReport(path="")


# --------------------------------------------------------------------------- helpers


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _type_name(x: Any) -> str:
    return type(x).__name__


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise DataFormatError("file not found", path=path)


class _Collector:
    """Applies the ``on_error`` policy and counts into a report."""

    def __init__(self, path: str, on_error: str):
        _check_on_error(on_error)
        self.on_error = on_error
        self.report = ReadReport(path=path)
        self.records: List[MomentRecord] = []

    def problem(self, err: DataFormatError) -> None:
        if self.on_error == "raise":
            raise err
        self.report.n_skipped += 1
        self.report.problems.append(err)
        logger.warning("skipping: %s", err)

    def add(self, rec: MomentRecord) -> None:
        self.records.append(rec)
        self.report.n_read += 1

    def result(self) -> RecordList:
        r = self.report
        if r.n_skipped or r.n_clamped or r.n_swapped:
            logger.info(r.summary())
        return RecordList(self.records, r)


def _clean_windows(windows: Sequence[Tuple[float, float]], duration: float, *, path: str,
                   line: Optional[int], fld: str, tolerance: float, clamp: bool,
                   swap_reversed: bool, report: ReadReport,
                   indexed: bool = True) -> List[Tuple[float, float]]:
    """Validate/clamp windows (seconds); raises DataFormatError naming ``fld``.

    Clamp/swap counts are added to ``report``: callers pass a scratch report and merge it
    only once the whole record is accepted."""
    out: List[Tuple[float, float]] = []
    n_clamped = n_swapped = 0
    for i, (st, ed) in enumerate(windows):
        where = f"{fld}[{i}]" if indexed else fld
        st, ed = float(st), float(ed)
        if st > ed:
            if not swap_reversed:
                raise DataFormatError(f"window start {st:g} > end {ed:g} (swap_reversed=True swaps "
                                      "them)", path=path, line=line, field=where)
            st, ed = ed, st
            n_swapped += 1
        if st == ed:
            raise DataFormatError(f"empty window: start == end == {st:g}", path=path, line=line,
                                  field=where)
        lo_out = st < 0
        hi_out = ed > duration
        if lo_out or hi_out:
            excess = max(-st, ed - duration)
            if excess > tolerance and not clamp:
                raise DataFormatError(
                    f"window [{st:g}, {ed:g}] lies outside [0, duration={duration:g}] by "
                    f"{excess:.3g} s (tolerance {tolerance:g} s; clamp=True clamps it)",
                    path=path, line=line, field=where)
            st, ed = max(st, 0.0), min(ed, duration)
            if st >= ed:
                raise DataFormatError(
                    f"window starts at or after the video end (duration={duration:g}); nothing "
                    "left after clamping", path=path, line=line, field=where)
            n_clamped += 1
        out.append((st, ed))
    report.n_clamped += n_clamped
    report.n_swapped += n_swapped
    return out


# --------------------------------------------------------------------------- QVHighlights


def _qvh_row(obj: Any, *, path: str, line: int, tolerance: float, clamp: bool,
             swap_reversed: bool, require_windows: bool, report: ReadReport) -> MomentRecord:
    """One validated row; window clamp/swap counts go into ``report`` (a scratch report the
    caller merges once the record is accepted)."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"expected a JSON object, got {_type_name(obj)}", path=path, line=line)
    for key in ("qid", "query", "vid", "duration"):
        if key not in obj:
            raise DataFormatError("missing field", path=path, line=line, field=key)
    qid, query, vid, duration = obj["qid"], obj["query"], obj["vid"], obj["duration"]
    if not (_is_int(qid) or isinstance(qid, str)):
        raise DataFormatError(f"expected int or str, got {_type_name(qid)}", path=path, line=line,
                              field="qid")
    if not isinstance(query, str):
        raise DataFormatError(f"expected str, got {_type_name(query)}", path=path, line=line,
                              field="query")
    if not query.strip():
        raise DataFormatError("empty query", path=path, line=line, field="query")
    if not isinstance(vid, str) or not vid:
        raise DataFormatError(f"expected a non-empty str, got {vid!r}", path=path, line=line,
                              field="vid")
    if not _is_number(duration) or float(duration) <= 0:
        raise DataFormatError(f"expected a positive number, got {duration!r}", path=path, line=line,
                              field="duration")
    duration = float(duration)

    windows_raw = obj.get("relevant_windows")
    if windows_raw is None:
        if require_windows:
            raise DataFormatError("missing field (this split needs ground truth)", path=path,
                                  line=line, field="relevant_windows")
        windows_raw = []
    if not isinstance(windows_raw, list):
        raise DataFormatError(f"expected a list of [start, end], got {_type_name(windows_raw)}",
                              path=path, line=line, field="relevant_windows")
    if require_windows and not windows_raw:
        raise DataFormatError("no windows (this split needs ground truth)", path=path, line=line,
                              field="relevant_windows")
    pairs = []
    for i, w in enumerate(windows_raw):
        if not (isinstance(w, (list, tuple)) and len(w) == 2 and all(_is_number(v) for v in w)):
            raise DataFormatError(f"expected [start, end] numbers, got {w!r}", path=path, line=line,
                                  field=f"relevant_windows[{i}]")
        pairs.append((float(w[0]), float(w[1])))

    clip_ids = obj.get("relevant_clip_ids")
    scores = obj.get("saliency_scores")
    if clip_ids is not None:
        if not isinstance(clip_ids, list) or not all(_is_int(c) and c >= 0 for c in clip_ids):
            raise DataFormatError("expected a list of non-negative ints", path=path, line=line,
                                  field="relevant_clip_ids")
    if scores is not None:
        if not isinstance(scores, list) or not all(
                isinstance(s, list) and s and all(_is_number(v) for v in s) for s in scores):
            raise DataFormatError("expected a list of per-annotator score lists", path=path,
                                  line=line, field="saliency_scores")
        if clip_ids is None:
            raise DataFormatError("saliency_scores given without relevant_clip_ids", path=path,
                                  line=line, field="relevant_clip_ids")
        if len(scores) != len(clip_ids):
            raise DataFormatError(f"{len(scores)} score lists for {len(clip_ids)} relevant_clip_ids",
                                  path=path, line=line, field="saliency_scores")

    windows = _clean_windows(pairs, duration, path=path, line=line, fld="relevant_windows",
                             tolerance=tolerance, clamp=clamp, swap_reversed=swap_reversed,
                             report=report)
    items = _items(obj, path, line)
    known = {"qid", "query", "vid", "duration", "relevant_windows", "relevant_clip_ids",
             "saliency_scores", "items"}
    extra = {k: v for k, v in obj.items() if k not in known}
    return MomentRecord(
        qid=qid, query=query, vid=vid, duration=duration, relevant_windows=windows,
        relevant_clip_ids=list(clip_ids) if clip_ids is not None else None,
        saliency_scores=[[float(v) for v in s] for s in scores] if scores is not None else None,
        source=f"{path}:{line}", extra=extra, items=items)


def _items(obj: Mapping[str, Any], path: str, line: Optional[int], fld: str = "items") -> Optional[List[str]]:
    """A row's ``items`` (None when absent); anything but a list of strings is an error."""
    items = obj.get("items")
    if items is None:
        return None
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise DataFormatError(f"expected a list of strings, got {items!r}", path=path, line=line, field=fld)
    return [x.strip() for x in items]


def read_qvh_jsonl(path: PathLike, *, tolerance: float = DEFAULT_TOLERANCE, clamp: bool = False,
                   swap_reversed: bool = False, require_windows: bool = False,
                   on_error: str = "raise") -> RecordList:
    """Read a QVHighlights jsonl file (``qid, query, duration, vid, relevant_windows,
    relevant_clip_ids, saliency_scores``; the test split has no ground truth).

    Args:
        require_windows: every row must have at least one window (training splits).
        Others: see the module docstring.
    Unknown keys of a row are kept in ``record.extra``.
    """
    path = str(path)
    _require_file(path)
    col = _Collector(path, on_error)
    seen: Dict[Any, int] = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            text = text.strip()
            if not text:
                continue
            try:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"malformed line, invalid JSON: {e.msg} (column {e.colno})",
                                          path=path, line=lineno) from None
                scratch = ReadReport(path=path)
                rec = _qvh_row(obj, path=path, line=lineno, tolerance=tolerance, clamp=clamp,
                               swap_reversed=swap_reversed, require_windows=require_windows,
                               report=scratch)
                if rec.qid in seen:
                    raise DataFormatError(f"duplicate qid {rec.qid!r} (first on line {seen[rec.qid]})",
                                          path=path, line=lineno, field="qid")
            except DataFormatError as e:
                col.problem(e)
                continue
            seen[rec.qid] = lineno
            col.report.n_clamped += scratch.n_clamped
            col.report.n_swapped += scratch.n_swapped
            col.add(rec)
    return col.result()


# --------------------------------------------------------------------------- Charades-STA


def read_charades_durations_csv(path: PathLike) -> Dict[str, float]:
    """``{id: length}`` from a ``Charades_v1_{train,test}.csv`` (columns ``id`` and ``length``)."""
    path = str(path)
    _require_file(path)
    out: Dict[str, float] = {}
    with open(path, "r", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for col in ("id", "length"):
            if col not in header:
                raise DataFormatError(f"missing column (header has {header})", path=path, line=1,
                                      field=col)
        for row in reader:
            lineno = reader.line_num
            vid, length = row.get("id"), row.get("length")
            try:
                value = float(length)
            except (TypeError, ValueError):
                raise DataFormatError(f"expected a number, got {length!r}", path=path, line=lineno,
                                      field="length") from None
            if not vid or not math.isfinite(value) or value <= 0:
                raise DataFormatError(f"bad row id={vid!r} length={length!r}", path=path,
                                      line=lineno, field="length")
            out[vid] = value
    return out


def _duration_lookup(durations: DurationSource, clip_length: Optional[float]
                     ) -> Tuple[Callable[[str], Optional[float]], str]:
    """Turn the ``durations`` argument into ``vid -> seconds or None`` and a description."""
    # a feature store (duck-typed: num_rows + __contains__) -> num_clips * clip_length
    if hasattr(durations, "num_rows") and hasattr(durations, "__contains__"):
        if clip_length is None or clip_length <= 0:
            raise ValueError("durations from a feature store need clip_length > 0")
        store = durations

        def from_store(vid: str) -> Optional[float]:
            return store.num_rows(vid) * float(clip_length) if vid in store else None
        return from_store, f"features in {getattr(store, 'path', store)!s}"
    if isinstance(durations, Mapping):
        table = durations
        return (lambda vid: float(table[vid]) if vid in table else None), "the durations table"
    if isinstance(durations, (str, os.PathLike)):
        table = read_charades_durations_csv(durations)
        return (lambda vid: table.get(vid)), str(durations)
    if callable(durations):
        fn = durations

        def from_callable(vid: str) -> Optional[float]:
            try:
                return fn(vid)
            except KeyError:
                return None
        return from_callable, "the durations callable"
    raise TypeError("durations must be a dict, a Charades_v1_*.csv path, a FeatureStore or a "
                    f"callable, got {_type_name(durations)}")


def read_charades_sta(path: PathLike, durations: DurationSource, *,
                      clip_length: Optional[float] = None, qid_offset: int = 0,
                      tolerance: float = DEFAULT_TOLERANCE, clamp: bool = False,
                      swap_reversed: bool = False, on_error: str = "raise") -> RecordList:
    """Read a Charades-STA txt file: ``VID start end##sentence`` per line.

    Args:
        durations: seconds per video, as a dict, a ``Charades_v1_*.csv`` path (``id``,
            ``length`` columns), a feature store (``num_rows(vid) * clip_length``) or a
            callable ``vid -> seconds`` (KeyError = unknown video).
        clip_length: seconds per feature row, needed when ``durations`` is a feature store.
        qid_offset: added to the 0-based line index to make the qid (module docstring).
    A video missing from ``durations`` is an error on that line (field ``vid``).
    """
    path = str(path)
    _require_file(path)
    lookup, dur_desc = _duration_lookup(durations, clip_length)
    col = _Collector(path, on_error)
    with open(path, "r", encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            text = text.rstrip("\r\n")
            if not text.strip():
                continue
            try:
                if "##" not in text:
                    raise DataFormatError("malformed line: expected 'VID start end##sentence'",
                                          path=path, line=lineno)
                head, sentence = text.split("##", 1)
                parts = head.split()
                if len(parts) != 3:
                    raise DataFormatError(f"malformed line: expected 'VID start end' before '##', "
                                          f"got {head!r}", path=path, line=lineno)
                vid = parts[0]
                try:
                    st, ed = float(parts[1]), float(parts[2])
                except ValueError:
                    raise DataFormatError(f"start/end are not numbers: {parts[1]!r} {parts[2]!r}",
                                          path=path, line=lineno, field="relevant_windows") from None
                if not (math.isfinite(st) and math.isfinite(ed)):
                    raise DataFormatError("start/end must be finite", path=path, line=lineno,
                                          field="relevant_windows")
                query = sentence.strip()
                if not query:
                    raise DataFormatError("empty query", path=path, line=lineno, field="query")
                duration = lookup(vid)
                if duration is None:
                    raise DataFormatError(f"no duration for video {vid!r} in {dur_desc}", path=path,
                                          line=lineno, field="vid")
                duration = float(duration)
                if not (math.isfinite(duration) and duration > 0):
                    raise DataFormatError(f"duration of {vid!r} is {duration!r}", path=path,
                                          line=lineno, field="duration")
                scratch = ReadReport(path=path)
                windows = _clean_windows([(st, ed)], duration, path=path, line=lineno,
                                         fld="relevant_windows", tolerance=tolerance, clamp=clamp,
                                         swap_reversed=swap_reversed, report=scratch)
            except DataFormatError as e:
                col.problem(e)
                continue
            col.report.n_clamped += scratch.n_clamped
            col.report.n_swapped += scratch.n_swapped
            col.add(MomentRecord(qid=qid_offset + lineno - 1, query=query, vid=vid,
                                 duration=duration, relevant_windows=windows,
                                 source=f"{path}:{lineno}"))
    return col.result()


# --------------------------------------------------------------------------- TACoS


def read_tacos(path: PathLike, *, qid_offset: int = 0, strip_video_ext: bool = False,
               tolerance: float = DEFAULT_TOLERANCE, clamp: bool = False,
               swap_reversed: bool = False, on_error: str = "raise") -> RecordList:
    """Read a TACoS 2D-TAN json ``{video: {timestamps: [[f_st, f_ed], ...], sentences, fps,
    num_frames}}``; seconds = frame / fps, duration = num_frames / fps.

    Args:
        strip_video_ext: ``"s13-d21.avi" -> "s13-d21"`` for the vid (features keyed without it).
    Errors name the file and the field path (``<video>.timestamps[i]``); a JSON syntax error
    names the line.
    """
    path = str(path)
    col = _Collector(path, on_error)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(f"expected a JSON object {{video: {{...}}}}, got {_type_name(data)}",
                              path=path)
    k = 0
    for video, meta in data.items():
        try:
            if not isinstance(meta, dict):
                raise DataFormatError(f"expected an object, got {_type_name(meta)}", path=path,
                                      field=video)
            for key in ("timestamps", "sentences", "fps", "num_frames"):
                if key not in meta:
                    raise DataFormatError("missing field", path=path, field=f"{video}.{key}")
            fps, nf = meta["fps"], meta["num_frames"]
            ts, sents = meta["timestamps"], meta["sentences"]
            if not _is_number(fps) or fps <= 0:
                raise DataFormatError(f"expected a positive number, got {fps!r}", path=path,
                                      field=f"{video}.fps")
            if not _is_number(nf) or nf <= 0:
                raise DataFormatError(f"expected a positive number, got {nf!r}", path=path,
                                      field=f"{video}.num_frames")
            if not isinstance(ts, list) or not isinstance(sents, list):
                raise DataFormatError("timestamps and sentences must be lists", path=path,
                                      field=f"{video}.timestamps")
            if len(ts) != len(sents):
                raise DataFormatError(f"{len(ts)} timestamps for {len(sents)} sentences", path=path,
                                      field=f"{video}.sentences")
        except DataFormatError as e:
            # the whole video is unusable; its sentences (if countable) still consume qids
            n = len(meta["sentences"]) if isinstance(meta, dict) and isinstance(
                meta.get("sentences"), list) else 0
            k += n
            col.problem(e)
            continue
        duration = float(nf) / float(fps)
        vid = video.rsplit(".", 1)[0] if strip_video_ext and "." in video else video
        for i, (t, sentence) in enumerate(zip(ts, sents)):
            qid = qid_offset + k
            k += 1
            try:
                if not (isinstance(t, list) and len(t) == 2 and all(_is_number(v) for v in t)):
                    raise DataFormatError(f"expected [frame_start, frame_end], got {t!r}", path=path,
                                          field=f"{video}.timestamps[{i}]")
                if not isinstance(sentence, str):
                    raise DataFormatError(f"expected str, got {_type_name(sentence)}", path=path,
                                          field=f"{video}.sentences[{i}]")
                if not sentence.strip():
                    raise DataFormatError("empty query", path=path, field=f"{video}.sentences[{i}]")
                scratch = ReadReport(path=path)
                windows = _clean_windows([(t[0] / fps, t[1] / fps)], duration, path=path, line=None,
                                         fld=f"{video}.timestamps[{i}]", tolerance=tolerance,
                                         clamp=clamp, swap_reversed=swap_reversed, report=scratch,
                                         indexed=False)
            except DataFormatError as e:
                col.problem(e)
                continue
            col.report.n_clamped += scratch.n_clamped
            col.report.n_swapped += scratch.n_swapped
            col.add(MomentRecord(qid=qid, query=sentence.strip(), vid=vid, duration=duration,
                                 relevant_windows=windows, source=f"{path}#{video}[{i}]"))
    return col.result()


# --------------------------------------------------------------------------- CALCE json


def read_calce_json(path: PathLike, *, tolerance: float = DEFAULT_TOLERANCE, clamp: bool = False,
                    swap_reversed: bool = False, require_windows: bool = False,
                    on_error: str = "raise") -> RecordList:
    """Read one of CALCE's preprocessed annotation files: a JSON list of ``{video, qid, query,
    duration, items, relevant_windows[, stage1_result]}`` (qids are strings such as
    ``"QVHighlight_2579"``). ``items`` -> ``record.items``; ``stage1_result`` (windows
    ``[[s, e], ...]``) -> ``record.extra["coarse_windows"]``. Errors name the file and the
    entry (``[i].field``)."""
    path = str(path)
    col = _Collector(path, on_error)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(f"expected a JSON list of annotation objects, got {_type_name(data)}", path=path)
    seen: Dict[Any, int] = {}
    for i, obj in enumerate(data):
        try:
            if not isinstance(obj, dict):
                raise DataFormatError(f"expected an object, got {_type_name(obj)}", path=path, field=f"[{i}]")
            row = {k: v for k, v in obj.items() if k not in ("video", "stage1_result")}
            if "video" in obj:
                row["vid"] = obj["video"]
            scratch = ReadReport(path=path)
            try:
                rec = _qvh_row(row, path=path, line=None, tolerance=tolerance, clamp=clamp,
                               swap_reversed=swap_reversed, require_windows=require_windows, report=scratch)
            except DataFormatError as e:
                fld = {"vid": "video"}.get(e.field, e.field)
                raise DataFormatError(e.reason, path=path, field=f"[{i}].{fld}" if fld else f"[{i}]") from None
            if "stage1_result" in obj:
                coarse = obj["stage1_result"]
                if not isinstance(coarse, list) or not all(
                        isinstance(w, (list, tuple)) and len(w) == 2 and all(_is_number(v) for v in w) for w in coarse):
                    raise DataFormatError(f"expected windows [[s, e], ...], got {coarse!r}", path=path,
                                          field=f"[{i}].stage1_result")
                rec.extra["coarse_windows"] = [[w[0], w[1]] for w in coarse]
            if rec.qid in seen:
                raise DataFormatError(f"duplicate qid {rec.qid!r} (first at [{seen[rec.qid]}])", path=path,
                                      field=f"[{i}].qid")
        except DataFormatError as e:
            col.problem(e)
            continue
        seen[rec.qid] = i
        rec.source = f"{path}[{i}]"
        col.report.n_clamped += scratch.n_clamped
        col.report.n_swapped += scratch.n_swapped
        col.add(rec)
    return col.result()


# --------------------------------------------------------------------------- dispatch / write


def detect_format(path: PathLike) -> str:
    """``qvh`` for ``.jsonl``, ``charades_sta`` for ``.txt``, ``tacos`` for ``.json``."""
    suffix = Path(str(path)).suffix.lower()
    fmt = {".jsonl": "qvh", ".txt": "charades_sta", ".json": "tacos"}.get(suffix)
    if fmt is None:
        raise DataFormatError(f"cannot tell the annotation format from the extension {suffix!r}; "
                              f"pass fmt= one of {FORMATS}", path=str(path))
    return fmt


def read_annotations(path: PathLike, fmt: str = "auto", **kw: Any) -> RecordList:
    """Read any supported annotation file.

    Args:
        fmt: ``"auto"`` (from the extension: .jsonl qvh, .txt charades_sta, .json tacos),
            ``"qvh"``, ``"charades_sta"``, ``"tacos"`` or ``"calce"`` (CALCE's json).
        **kw: passed to the reader (:func:`read_qvh_jsonl`, :func:`read_charades_sta`
            (needs ``durations``), :func:`read_tacos`). An option the reader does not take
            raises ``TypeError`` naming it.
    """
    if fmt == "auto":
        fmt = detect_format(path)
    readers = {"qvh": read_qvh_jsonl, "charades_sta": read_charades_sta, "tacos": read_tacos,
               "calce": read_calce_json}
    if fmt not in readers:
        close = difflib.get_close_matches(str(fmt), FORMATS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown annotation format {fmt!r}{hint}; expected 'auto' or one of {FORMATS}")
    reader = readers[fmt]
    if fmt == "charades_sta":
        if "durations" not in kw:
            raise TypeError("read_annotations(fmt='charades_sta') needs durations= (dict, csv path, "
                            "feature store or callable)")
        durations = kw.pop("durations")
        return reader(path, durations, **kw)
    return reader(path, **kw)


def write_qvh_jsonl(records: Iterable[MomentRecord], path: PathLike) -> str:
    """Write records as QVHighlights jsonl rows (atomically); returns the path."""
    return write_jsonl((r.to_qvh_dict() for r in records), path)
