"""What a search returns to users: :class:`SearchResults` (``list[Moment]`` with context) and
:class:`Moments` (the windows and saliency of one query in one video), in seconds.

:meth:`SearchResults.of` turns the engine's :class:`~lavis_c2f.pipeline.engine.QueryResult` of
one query into them (the moments of the fused list with the stage scores they came from, and
the grounding of every grounded video).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from lavis_c2f.common.clock import format_time
from lavis_c2f.pipeline.engine import QueryResult

@dataclass
class Moments:
    """Moments of one query in one video: ``windows`` ``[[start, end, score], ...]`` seconds, best
    first; ``saliency`` (L,) float32 per clip (grounder saliency, or the smoothed similarity
    curve in zero-shot mode); ``mode`` of stage 2 (``trained`` / ``zero-shot``); ``refined``:
    whether stage 3 rewrote the windows."""

    query: str
    vid: str
    duration: float
    clip_length: float
    windows: List[List[float]]
    saliency: np.ndarray
    mode: str
    refined: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {"query": self.query, "vid": self.vid, "duration": float(self.duration),
                "clip_length": float(self.clip_length), "mode": self.mode, "refined": self.refined,
                "windows": [[float(a), float(b), float(s)] for a, b, s in self.windows],
                "saliency": [round(float(x), 4) for x in np.asarray(self.saliency).reshape(-1)]}


@dataclass
class Moment:
    """One moment of a corpus search: ``vid``, ``start`` / ``end`` seconds, fused ``score``,
    its ``rank`` (1 = best), the stage scores it came from, the video's duration and file."""

    vid: str
    start: float
    end: float
    score: float
    rank: int = 0
    stage1_score: Optional[float] = None
    stage2_score: Optional[float] = None
    duration: Optional[float] = None
    path: Optional[str] = None
    refined: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {"rank": self.rank, "vid": self.vid, "start": float(self.start), "end": float(self.end),
                "start_hms": format_time(self.start), "end_hms": format_time(self.end),
                "score": float(self.score), "stage1_score": self.stage1_score, "stage2_score": self.stage2_score,
                "duration": self.duration, "path": self.path, "refined": self.refined}


class SearchResults(list):
    """``list[Moment]`` (best first) with the search's context: ``query``, ``mode``, ``stage1``
    (``[(vid, score), ...]`` of the retrieved videos), ``details`` (vid -> :class:`Moments` of
    each grounded video, saliency included) and ``timings`` (seconds per stage)."""

    def __init__(self, moments: Sequence[Moment], *, query: str, mode: Dict[str, str],
                 stage1: Sequence[Tuple[str, float]], details: Dict[str, Moments], timings: Dict[str, float]):
        super().__init__(moments)
        self.query, self.mode = query, dict(mode)
        self.stage1 = [(str(v), float(s)) for v, s in stage1]
        self.details, self.timings = details, timings

    @classmethod
    def of(cls, res: QueryResult, corpus: Any, mode: Dict[str, str], timings: Dict[str, float], top_k: int
           ) -> "SearchResults":
        """The ``top_k`` best moments of an engine result over ``corpus`` (durations, files,
        clip length) with ``mode`` (:attr:`C2FPredictor.mode`) and the search's ``timings``."""
        windows = {c[0]: c[2] for c in res.candidates}
        s1_of = dict(res.stage1)
        s2_of = {(vid, round(w[0], 6), round(w[1], 6)): w[2] for vid, ws in windows.items() for w in ws}
        moments = [Moment(vid=vid, start=float(st), end=float(ed), score=float(score), rank=rank,
                          stage1_score=float(s1_of[vid]), stage2_score=s2_of.get((vid, round(st, 6), round(ed, 6))),
                          duration=float(corpus.duration(vid)), path=corpus.path(vid), refined=vid in res.refined)
                   for rank, (vid, st, ed, score) in enumerate(res.moments[:top_k], start=1)]
        details = {vid: Moments(query=res.query.text, vid=vid, duration=g.duration, clip_length=corpus.clip_length,
                                windows=windows[vid], saliency=np.asarray(g.saliency, np.float32),
                                mode=mode["stage2"], refined=vid in res.refined)
                   for vid, g in res.groundings.items()}
        return cls(moments, query=res.query.text, mode=mode, stage1=res.stage1, details=details, timings=timings)

    def to_dict(self) -> Dict[str, Any]:
        return {"query": self.query, "mode": self.mode, "stage1": [[v, s] for v, s in self.stage1],
                "moments": [m.to_dict() for m in self], "timings": {k: round(v, 4) for k, v in self.timings.items()}}


__all__ = ["Moment", "Moments", "SearchResults"]
