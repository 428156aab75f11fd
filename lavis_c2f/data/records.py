"""The one typed record every annotation reader produces.

Times are in **seconds**. ``relevant_windows`` may be empty (a test split without ground
truth). ``saliency_scores`` follows QVHighlights: one list of per-annotator scores (0-4)
per entry of ``relevant_clip_ids``. ``items`` are the query's noun phrases as CALCE's annotations
ship them (``None``: the file has none).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

QueryId = Union[int, str]


@dataclass
class MomentRecord:
    qid: QueryId
    query: str
    vid: str
    duration: float
    relevant_windows: List[Tuple[float, float]] = field(default_factory=list)
    relevant_clip_ids: Optional[List[int]] = None
    saliency_scores: Optional[List[List[float]]] = None
    source: Optional[str] = None  # "path:line" the record came from, for error messages
    extra: Dict[str, Any] = field(default_factory=dict)
    items: Optional[List[str]] = None

    @property
    def has_windows(self) -> bool:
        return len(self.relevant_windows) > 0

    @property
    def has_saliency(self) -> bool:
        return bool(self.relevant_clip_ids) and self.saliency_scores is not None

    def to_qvh_dict(self) -> Dict[str, Any]:
        """The record as a QVHighlights jsonl row (keys as the official files use them)."""
        row: Dict[str, Any] = {
            "qid": self.qid,
            "query": self.query,
            "duration": self.duration,
            "vid": self.vid,
        }
        if self.relevant_windows:
            row["relevant_windows"] = [[float(s), float(e)] for s, e in self.relevant_windows]
        if self.relevant_clip_ids is not None:
            row["relevant_clip_ids"] = list(self.relevant_clip_ids)
        if self.saliency_scores is not None:
            row["saliency_scores"] = [list(s) for s in self.saliency_scores]
        if self.items is not None:
            row["items"] = list(self.items)
        row.update(self.extra)
        return row
