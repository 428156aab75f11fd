"""The coarse-to-fine engine: one loop for every caller.

A batch of queries goes through::

    stage 1   ranked = stage1.rank(queries, K)                 top-K videos per query
    stage 2   grounded = stage2.ground(queries, pairs)          windows in each (query, video) pair
    fusion    moments = fuse_candidates([[vid, s1, windows]...], fusion)
    stage 3   (optional) refiner.refine_query(...)              best videos' windows rewritten, fused again

The corpus task (:mod:`lavis_c2f.tasks.corpus_moment_retrieval`, stage-1 lists read from
files, grounding by the dataset's batches), :class:`lavis_c2f.predictor.C2FPredictor` (an
index of videos or the demo corpus; trained or zero-shot stages, long videos grounded in
chunks: :mod:`lavis_c2f.pipeline.stages`), ``lavis-c2f search`` and the web demo all run it.

Pairs. Query ``i`` is grounded in its top-K videos in stage-1 order and, when its
``gt_vid`` is set, ``ground_gt`` is on and the GT video is not among them, in the GT video
too (single-video metrics and the perfect-stage-1 bound of the evaluation); the pairs of the
whole batch go to stage 2 in that order, so a backend may batch them across queries.

Stage 3 (:class:`~lavis_c2f.pipeline.refine.CorpusRefiner`) refines the windows of each
query's ``top_videos`` best fused videos (and of the GT video when it was grounded and the
refiner's ``gt_video`` is on); the candidates then carry the refined windows and are fused
again.

Stage backends implement :class:`Stage1` (``rank``) and :class:`Stage2` (``ground``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.progress import progress_bar
from lavis_c2f.data.cfg import yaml_defaults
from lavis_c2f.pipeline.fusion import FusionConfig, fuse_candidates

Ranked = List[Tuple[str, float]]
#: defaults of a search (``stage1_top_k``, ``top_k``, ``refine_videos``): lavis_c2f/configs/pipeline/search.yaml
SEARCH_DEFAULTS = yaml_defaults("pipeline/search.yaml", "search")


@dataclass(frozen=True)
class Query:
    """One query of a batch.

    Attributes:
        text: the query text (white space collapsed).
        qid: its id, when it has one.
        tokens: (T, Dt) float32 token features (None: the stage backends do not need them).
        pooled: (D,) float32 sentence embedding (None: as for ``tokens``).
        gt_vid: the query's ground-truth video, when it is annotated (evaluation).
        items: the query's items (CALCE's refiner; None when the annotations have none).
        record: what the query came from (the corpus task's annotation record), for backends.
    """

    text: str
    qid: Any = None
    tokens: Optional[np.ndarray] = None
    pooled: Optional[np.ndarray] = None
    gt_vid: Optional[str] = None
    items: Optional[Sequence[str]] = None
    record: Any = None


@dataclass
class Grounding:
    """Stage 2 in one (query, video) pair: ``windows`` ``[[st, ed, s2], ...]`` in seconds, best
    first; ``saliency`` (L,) per clip (or None); ``duration`` the seconds the windows live in."""

    windows: List[List[float]]
    saliency: Any
    duration: float


@dataclass
class QueryResult:
    """What the engine found for one query.

    Attributes:
        query: the :class:`Query`.
        stage1: its stage-1 list ``[(vid, s1), ...]`` as stage 1 gave it (at least the top K).
        candidates: ``[[vid, s1, [[st, ed, s2], ...]], ...]`` of the top K in stage-1 order
            (windows after stage 3 when it ran): the candidate rows of
            :mod:`lavis_c2f.pipeline.fusion`.
        groundings: vid -> :class:`Grounding` of every grounded video (stage 2, before stage 3).
        gt_windows: windows in the GT video when it was grounded (refined when stage 3 refined it).
        refine: stage 3's entry (refined vids, their stage-2 windows, counters), or None.
        moments: the fused list ``[[vid, st, ed, score], ...]``, best first.
    """

    query: Query
    stage1: Ranked
    candidates: List[List[Any]]
    groundings: Dict[str, Grounding]
    gt_windows: Optional[List[List[float]]] = None
    refine: Optional[Dict[str, Any]] = None
    moments: List[List[Any]] = field(default_factory=list)

    @property
    def refined(self) -> set:
        """Videos whose windows went through stage 3."""
        return set(self.refine["vids"]) if self.refine else set()


class Stage1(Protocol):
    def rank(self, queries: Sequence[Query], k: int) -> List[Ranked]:
        """Per query, at least its ``k`` best ``(vid, score)``, best first."""


class Stage2(Protocol):
    def ground(self, queries: Sequence[Query], pairs: Sequence[Tuple[int, str]]) -> List[Grounding]:
        """A :class:`Grounding` per ``(query index, vid)`` pair, in order."""


class CoarseToFine:
    """The engine (module docstring).

    Args:
        stage1: a :class:`Stage1` backend.
        stage2: a :class:`Stage2` backend.
        fusion: :class:`FusionConfig` of stage-1 / stage-2 scores.
        stage1_top_k: K, videos grounded per query (default of :meth:`run`).
        ground_gt: also ground each query's ``gt_vid`` when it is not in the top K.
    """

    def __init__(self, stage1: Stage1, stage2: Stage2, fusion: FusionConfig, stage1_top_k: int,
                 ground_gt: bool = False):
        if isinstance(stage1_top_k, bool) or int(stage1_top_k) < 1:
            raise ConfigError(f"stage1_top_k must be >= 1, got {stage1_top_k}")
        self.stage1, self.stage2, self.fusion = stage1, stage2, fusion
        self.stage1_top_k = int(stage1_top_k)
        self.ground_gt = bool(ground_gt)

    def run(self, queries: Sequence[Query], k: Optional[int] = None, refiner: Any = None,
            progress: Optional[str] = None, timings: Optional[Dict[str, float]] = None) -> List[QueryResult]:
        """Run the batch.

        Args:
            queries: the :class:`Query` batch.
            k: videos grounded per query (default :attr:`stage1_top_k`).
            refiner: a :class:`~lavis_c2f.pipeline.refine.CorpusRefiner` (stage 3), or None.
            progress: label of a progress bar over the queries of stage 3 (None: no bar).
            timings: when given, ``stage1_s``, ``stage2_s`` (and ``stage3_s``) are added to it.
        """
        k = self.stage1_top_k if k is None else int(k)
        if k < 1:
            raise ConfigError(f"stage1_top_k must be >= 1, got {k}")
        t0 = time.perf_counter()
        ranked = self.stage1.rank(queries, k)
        t1 = time.perf_counter()
        pairs: List[Tuple[int, str]] = []
        for qi, q in enumerate(queries):
            vids = [str(v) for v, _ in ranked[qi][:k]]
            if self.ground_gt and q.gt_vid is not None and q.gt_vid not in vids:
                vids.append(q.gt_vid)
            pairs.extend((qi, v) for v in vids)
        by_query: List[Dict[str, Grounding]] = [{} for _ in queries]
        for (qi, vid), g in zip(pairs, self.stage2.ground(queries, pairs)):
            by_query[qi][vid] = g
        t2 = time.perf_counter()
        results = []
        for qi, q in enumerate(progress_bar(queries, desc=progress or "", unit="query",
                                            enabled=progress is not None and refiner is not None)):
            groundings = by_query[qi]
            cands = [[str(v), float(s1), groundings[str(v)].windows] for v, s1 in ranked[qi][:k]]
            gt = groundings.get(q.gt_vid) if q.gt_vid is not None else None
            gt_windows = None if gt is None else gt.windows
            info = None
            if refiner is not None:
                cands, gt_windows, info = refiner.refine_query(
                    q.text, cands, {v: g.duration for v, g in groundings.items()}, self.fusion,
                    gt_vid=q.gt_vid if gt is not None else None, gt_windows=gt_windows, items=q.items)
            results.append(QueryResult(query=q, stage1=[(str(v), float(s)) for v, s in ranked[qi]], candidates=cands,
                                       groundings=groundings, gt_windows=gt_windows, refine=info,
                                       moments=fuse_candidates(cands, self.fusion)))
        if timings is not None:
            timings["stage1_s"] = timings.get("stage1_s", 0.0) + (t1 - t0)
            timings["stage2_s"] = timings.get("stage2_s", 0.0) + (t2 - t1)
            if refiner is not None:
                timings["stage3_s"] = timings.get("stage3_s", 0.0) + (time.perf_counter() - t2)
        return results


__all__ = ["CoarseToFine", "Grounding", "Query", "QueryResult", "SEARCH_DEFAULTS", "Stage1", "Stage2"]
