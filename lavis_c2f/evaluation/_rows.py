"""Row reading and validation shared by the evaluation modules (numpy only).

Every metric function takes plain lists of dicts. When the list came from a file through
:func:`load_rows`, it is a :class:`JsonlRows` that remembers the file and the line of every
row, so a bad row is reported as ``file:line``; for an ordinary in-memory list the "line" is
the 1-based position of the row in the list and the "file" is a name such as
``<submission>``.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.common.io import iter_jsonl


class QidMismatchError(DataFormatError):
    """The submission and the ground truth do not hold the same set of query ids."""


class JsonlRows(list):
    """A list of JSON-lines rows that remembers where each row came from.

    Attributes:
        source: the file path (str).
        lines: 1-based line number of each row, same length as the list.
    """

    def __init__(self, rows: Iterable[Any] = (), source: str = "<rows>",
                 lines: Optional[Sequence[int]] = None):
        super().__init__(rows)
        self.source = str(source)
        self.lines = list(lines) if lines is not None else list(range(1, len(self) + 1))
        if len(self.lines) != len(self):
            raise ValueError("JsonlRows needs one line number per row")


def load_rows(path: "os.PathLike | str") -> JsonlRows:
    """Read a JSON-lines file into :class:`JsonlRows` (errors name the file and line)."""
    rows, lines = [], []
    for lineno, obj in iter_jsonl(path):
        rows.append(obj)
        lines.append(lineno)
    return JsonlRows(rows, source=str(path), lines=lines)


def row_origin(rows: Sequence[Any], default_name: str) -> Tuple[str, List[int]]:
    """``(source name, line numbers)`` of ``rows`` (positions for plain lists)."""
    if isinstance(rows, JsonlRows):
        return rows.source, rows.lines
    return default_name, list(range(1, len(rows) + 1))


def is_number(x: Any) -> bool:
    """A finite int/float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class RowChecker:
    """Validation helpers bound to one row (``source``, ``line``) for precise error messages."""

    __slots__ = ("row", "source", "line")

    def __init__(self, row: Any, source: str, line: int):
        if not isinstance(row, dict):
            raise DataFormatError(f"expected a JSON object, got {type(row).__name__}",
                                  path=source, line=line)
        self.row, self.source, self.line = row, source, line

    def error(self, message: str, field: Optional[str] = None) -> DataFormatError:
        return DataFormatError(message, path=self.source, line=self.line, field=field)

    def require(self, field: str) -> Any:
        if field not in self.row:
            raise self.error("missing required field", field=field)
        return self.row[field]

    def qid(self) -> Hashable:
        qid = self.require("qid")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise self.error(f"qid must be an int or a string, got {qid!r}", field="qid")
        return qid

    def number(self, field: str, positive: bool = False) -> float:
        value = self.require(field)
        if not is_number(value) or (positive and value <= 0):
            kind = "a positive number" if positive else "a finite number"
            raise self.error(f"must be {kind}, got {value!r}", field=field)
        return float(value)

    def windows(self, field: str, width: int, required: bool = True,
                allow_empty: bool = True) -> Optional[np.ndarray]:
        """A list of ``[st, ed, (score)]`` rows -> float64 array ``(N, width)``.

        Entries may be longer than ``width`` (extra items are ignored, as the official code
        does with ``w[:2]``); every used item must be a finite number and ``ed >= st``.
        Returns None when the field is absent and ``required`` is False.
        """
        if field not in self.row:
            if required:
                raise self.error("missing required field", field=field)
            return None
        value = self.row[field]
        if not isinstance(value, list):
            raise self.error(f"must be a list of [start, end{', score' if width > 2 else ''}]"
                             f" lists, got {type(value).__name__}", field=field)
        if not value:
            if not allow_empty:
                raise self.error("must not be empty", field=field)
            return np.zeros((0, width), dtype=np.float64)
        try:  # fast path: a rectangular list of numbers
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            arr = None
        if (arr is not None and arr.ndim == 2 and arr.shape[1] >= width
                and np.isfinite(arr[:, :width]).all() and (arr[:, 1] >= arr[:, 0]).all()
                and not _has_bool(value)):
            return np.ascontiguousarray(arr[:, :width])
        out = np.empty((len(value), width), dtype=np.float64)
        for i, w in enumerate(value):
            if (not isinstance(w, (list, tuple)) or len(w) < width
                    or not all(is_number(x) for x in w[:width])):
                raise self.error(f"entry {i} must be a list of at least {width} finite numbers"
                                 f" ([start, end{', score' if width > 2 else ''}]), got {w!r}",
                                 field=field)
            if w[1] < w[0]:
                raise self.error(f"entry {i} has end < start: {w!r}", field=field)
            out[i] = w[:width]
        return out

    def number_list(self, field: str, allow_empty: bool = False) -> np.ndarray:
        value = self.require(field)
        if not isinstance(value, list) or (not value and not allow_empty):
            raise self.error("must be a non-empty list of numbers", field=field)
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.ndim != 1 or not np.isfinite(arr).all() or _has_bool(value):
            raise self.error("must be a list of finite numbers", field=field)
        return arr


def _has_bool(value: list) -> bool:
    """Whether a list (or list of lists) holds a JSON boolean (numpy would read it as 0/1)."""
    for x in value:
        if x.__class__ is bool:
            return True
        if x.__class__ is list:
            for y in x:
                if y.__class__ is bool:
                    return True
    return False


def check_unique(qids: Sequence[Hashable], source: str, lines: Sequence[int]) -> Dict[Hashable, int]:
    """qid -> position; a repeated qid raises naming both lines."""
    pos: Dict[Hashable, int] = {}
    for i, q in enumerate(qids):
        if q in pos:
            raise DataFormatError(f"duplicate qid {q!r} (first seen on line {lines[pos[q]]})",
                                  path=source, line=lines[i], field="qid")
        pos[q] = i
    return pos


def match_qids(pred_qids: Sequence[Hashable], pred_source: str, pred_lines: Sequence[int],
               gt_qids: Sequence[Hashable], gt_source: str, gt_lines: Sequence[int],
               match_number: bool) -> List[Hashable]:
    """The qids to evaluate, in ground-truth order.

    With ``match_number`` (the official behaviour) the two qid sets must be equal, otherwise
    :class:`QidMismatchError` names the first offending qid, its file and line. Without it the
    intersection is evaluated.
    """
    pred_pos = check_unique(pred_qids, pred_source, pred_lines)
    gt_pos = check_unique(gt_qids, gt_source, gt_lines)
    if match_number:
        missing = [q for q in gt_qids if q not in pred_pos]
        if missing:
            q = missing[0]
            raise QidMismatchError(
                f"{len(missing)} ground-truth qid(s) have no prediction in this submission, "
                f"first: qid {q!r} ({gt_source}:{gt_lines[gt_pos[q]]}); use match_number=False "
                f"(--no-match-number) to evaluate the intersection", path=pred_source)
        extra = [q for q in pred_qids if q not in gt_pos]
        if extra:
            q = extra[0]
            raise QidMismatchError(
                f"{len(extra)} submitted qid(s) are not in the ground truth {gt_source}, "
                f"first: qid {q!r}; use match_number=False (--no-match-number) to evaluate "
                f"the intersection", path=pred_source, line=pred_lines[pred_pos[q]], field="qid")
    shared = [q for q in gt_qids if q in pred_pos]
    if not shared:
        raise QidMismatchError(f"no qid in common with the ground truth {gt_source}",
                               path=pred_source)
    return shared


def iou_cross(spans1: np.ndarray, spans2: np.ndarray) -> np.ndarray:
    """Temporal IoU of every pair, broadcasting: (..., N, 2) x (..., M, 2) -> (..., N, M).

    ``inter / (len1 + len2 - inter)``, computed with the same operations as the official
    QVHighlights ``compute_temporal_iou_batch_cross`` (0/0 gives NaN there too).
    """
    len1 = spans1[..., 1] - spans1[..., 0]
    len2 = spans2[..., 1] - spans2[..., 0]
    left = np.maximum(spans1[..., :, None, 0], spans2[..., None, :, 0])
    right = np.minimum(spans1[..., :, None, 1], spans2[..., None, :, 1])
    inter = np.clip(right - left, 0, None)
    union = len1[..., :, None] + len2[..., None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / union


def iou_paired(spans1: np.ndarray, spans2: np.ndarray) -> np.ndarray:
    """IoU of matching rows (..., 2) x (..., 2) -> (...), as the official
    ``compute_temporal_iou_batch_paired``: the denominator is the hull ``max(ed) - min(st)``
    (equal to the union whenever the spans overlap) and a zero denominator gives 0."""
    inter = np.maximum(0.0, np.minimum(spans1[..., 1], spans2[..., 1])
                       - np.maximum(spans1[..., 0], spans2[..., 0]))
    hull = np.maximum(spans1[..., 1], spans2[..., 1]) - np.minimum(spans1[..., 0], spans2[..., 0])
    return np.divide(inter, hull, out=np.zeros_like(inter), where=hull != 0)


def iou_max_over_gt(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(N, 2) predictions x (M, 2) GT windows -> (N,) best IoU over the GT windows.

    Zero-length unions give 0 (not NaN); M == 0 gives zeros.
    """
    if len(gt) == 0 or len(pred) == 0:
        return np.zeros(len(pred), dtype=np.float64)
    iou = iou_cross(pred, gt)
    return np.nan_to_num(iou, nan=0.0).max(axis=1)


def pct(value: float) -> Optional[float]:
    """``100 * value`` rounded to 2 decimals as the official code does (``float(f"{x:.2f}")``);
    NaN (an empty set of queries) becomes None."""
    value = float(value)
    if math.isnan(value):
        return None
    return float(f"{100 * value:.2f}")


def thr_key(thr: float) -> str:
    """Threshold as it appears in metric keys: ``str(float(f"{thr:.2f}"))`` -> '0.5', '0.55'."""
    return str(float(f"{thr:.2f}"))
