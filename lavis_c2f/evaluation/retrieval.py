"""Text-to-video (t2v) and video-to-text (v2t) retrieval metrics (numpy only).

Inputs are a similarity matrix ``sim`` of shape (Q, V) (row = query text, column = video,
higher = more similar) and ``gt_video`` of shape (Q,): the column index of each query's
ground-truth video. numpy arrays, lists and CPU torch tensors are accepted (a torch tensor is
converted with ``.detach().cpu().numpy()``; torch is never imported here).

Rank conventions (1-based):

* **Ties**: ``rank = 1 + number of candidates with a strictly greater score``. A tie with the
  ground truth is therefore resolved in its favour (optimistic ranking; a deterministic rule
  that does not depend on sort order). Scores are compared in the dtype they are given in.
* **t2v**: the rank of ``sim[q, gt_video[q]]`` in row ``q``.
* **v2t**: a video may be the ground truth of several queries; its rank is that of its
  best-ranked ground-truth query, i.e. ``1 + #{q : sim[q, v] > max over GT queries q' of
  sim[q', v]}``. Videos that are no query's ground truth are left out (and counted).

Metrics: ``R@K`` = percentage of ranks <= K (2 decimals), ``MdR`` = median rank, ``MnR`` =
mean rank (2 decimals). These are the official text-to-video metrics of CLIP4Clip, X-Pool and
T-MASS (``compute_metrics``: R1/R5/R10 = 100 * mean(rank0 < K), MedR = median(rank0) + 1,
MeanR = mean(rank0) + 1 with 0-based ranks from a double argsort); they agree exactly unless
scores tie (the argsort then orders ties arbitrarily).

DSL (dual softmax, :func:`dual_softmax`): the evaluation option ``--DSL`` of those codebases
re-weights each score by how much its video prefers this query over the other queries,
``S'[q, v] = S[q, v] * softmax_q(S[:, v] / T)[q]`` with ``T = 0.01`` (``sims * softmax(sims *
100, axis=0)`` in their code, axis 0 = queries). It uses every query of the split (test-time
information about other queries); report it separately from the plain metrics.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from lavis_c2f.evaluation._rows import pct

__all__ = ["DEFAULT_KS", "t2v_ranks", "v2t_ranks", "rank_metrics", "retrieval_metrics",
           "RetrievalAccumulator", "topk_from_scores", "dual_softmax", "column_logsumexp", "DSL_TEMPERATURE"]

DEFAULT_KS: Tuple[int, ...] = (1, 5, 10, 50)
DSL_TEMPERATURE = 0.01  # the codebases' ``sims * 100``
_ROW_CHUNK = 4096  # rows compared at a time, to bound the (rows, V) boolean temporaries


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_sim(sim: Any, name: str = "sim") -> np.ndarray:
    sim = _as_numpy(sim, name)
    if sim.ndim != 2:
        raise ValueError(f"{name} must be a (Q, V) matrix, got shape {sim.shape}")
    if sim.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got dtype {sim.dtype}")
    if sim.dtype.kind == "f" and np.isnan(sim).any():
        raise ValueError(f"{name} contains NaN")
    return sim


def _check_gt(gt_video: Any, num_rows: int, num_videos: int, name: str = "gt_video") -> np.ndarray:
    gt = _as_numpy(gt_video, name)
    if gt.shape != (num_rows,):
        raise ValueError(f"{name} must have shape ({num_rows},), got {gt.shape}")
    if num_rows and gt.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer video indices, got dtype {gt.dtype}")
    gt = gt.astype(np.int64)
    if num_rows and (gt.min() < 0 or gt.max() >= num_videos):
        bad = int(np.nonzero((gt < 0) | (gt >= num_videos))[0][0])
        raise ValueError(f"{name}[{bad}] = {gt[bad]} is not a video index in [0, {num_videos})")
    return gt


def _t2v_block(sim: np.ndarray, gt: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(sim), dtype=np.int64)
    for s in range(0, len(sim), _ROW_CHUNK):
        block, g = sim[s:s + _ROW_CHUNK], gt[s:s + _ROW_CHUNK]
        target = block[np.arange(len(block)), g]
        ranks[s:s + len(block)] = 1 + (block > target[:, None]).sum(1)
    return ranks


def _count_above(sim: np.ndarray, bar: np.ndarray) -> np.ndarray:
    """(V,) number of rows whose score in column v is strictly greater than ``bar[v]``."""
    counts = np.zeros(sim.shape[1], dtype=np.int64)
    for s in range(0, len(sim), _ROW_CHUNK):
        counts += (sim[s:s + _ROW_CHUNK] > bar[None, :]).sum(0)
    return counts


def t2v_ranks(sim: Any, gt_video: Any) -> np.ndarray:
    """(Q,) 1-based rank of each query's GT video among the V videos (ties: module docstring)."""
    sim = _check_sim(sim)
    return _t2v_block(sim, _check_gt(gt_video, *sim.shape))


def v2t_ranks(sim: Any, gt_video: Any) -> Tuple[np.ndarray, np.ndarray]:
    """v2t ranks: ``(ranks (V',), video_indices (V',))`` for the V' videos that are some
    query's ground truth; a video's rank is that of its best-ranked GT query."""
    sim = _check_sim(sim)
    gt = _check_gt(gt_video, *sim.shape)
    best = np.full(sim.shape[1], -np.inf)
    np.maximum.at(best, gt, sim[np.arange(len(gt)), gt].astype(np.float64))
    videos = np.unique(gt)
    bar = best.astype(sim.dtype) if sim.dtype.kind == "f" else best
    return 1 + _count_above(sim, bar)[videos], videos


def rank_metrics(ranks: Any, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, Any]:
    """``{"R@K": %, ..., "MdR": median, "MnR": mean, "num": n}`` from 1-based ranks.

    R@K and MnR are rounded to 2 decimals; with no ranks every value is None.
    """
    ranks = np.asarray(ranks, dtype=np.float64).reshape(-1)
    out: Dict[str, Any] = {}
    for k in ks:
        out[f"R@{k}"] = pct(np.mean(ranks <= k)) if len(ranks) else None
    out["MdR"] = float(np.median(ranks)) if len(ranks) else None
    out["MnR"] = round(float(np.mean(ranks)), 2) if len(ranks) else None
    out["num"] = int(len(ranks))
    return out


def retrieval_metrics(sim: Any, gt_video: Any, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, Any]:
    """t2v and v2t metrics of a full (Q, V) similarity matrix.

    Returns:
        ``{"t2v": rank_metrics, "v2t": rank_metrics, "num_videos_without_query": int}``.
    """
    sim = _check_sim(sim)
    gt = _check_gt(gt_video, *sim.shape)
    v_ranks, videos = v2t_ranks(sim, gt)
    return {"t2v": rank_metrics(_t2v_block(sim, gt), ks), "v2t": rank_metrics(v_ranks, ks),
            "num_videos_without_query": int(sim.shape[1] - len(videos))}


class RetrievalAccumulator:
    """Exact retrieval metrics from a similarity matrix delivered in row blocks.

    t2v needs one pass: :meth:`add` ranks each block's rows at once and keeps only the ranks
    (memory O(Q + V)). v2t is exact too, with a second pass over the same rows: a video's
    rank needs the score of its best GT query, which may come in any later block, so
    :meth:`add` records per video the running maximum of its GT queries' scores and
    :meth:`add_v2t` then counts, per video, the rows scoring strictly above it. Memory stays
    O(Q + V); the second pass must see the same scores (recompute them deterministically or
    re-read them), in any block order. Skip the second pass when only t2v is wanted.

    Example::

        acc = RetrievalAccumulator(num_videos=V)
        for rows, gt in blocks():           # pass 1: (B, V) scores, (B,) GT video indices
            acc.add(rows, gt)
        for rows, _ in blocks():            # optional pass 2, for v2t
            acc.add_v2t(rows)
        metrics = acc.compute()             # {"t2v": ..., "v2t": ...}
    """

    def __init__(self, num_videos: int, ks: Sequence[int] = DEFAULT_KS):
        if int(num_videos) < 1:
            raise ValueError(f"num_videos must be positive, got {num_videos}")
        self.num_videos = int(num_videos)
        self.ks = tuple(ks)
        self._ranks: List[np.ndarray] = []
        self._best = np.full(self.num_videos, -np.inf)
        self._has_query = np.zeros(self.num_videos, dtype=bool)
        self._rows = 0
        self._rows_v2t = 0
        self._above = np.zeros(self.num_videos, dtype=np.int64)
        self._dtype: Optional[np.dtype] = None

    def _check_block(self, sim_block: Any) -> np.ndarray:
        sim = _check_sim(sim_block, "sim_block")
        if sim.shape[1] != self.num_videos:
            raise ValueError(f"sim_block has {sim.shape[1]} columns, expected num_videos="
                             f"{self.num_videos}")
        if self._dtype is not None and sim.dtype != self._dtype:
            raise ValueError(f"sim_block dtype {sim.dtype} differs from the first block's "
                             f"{self._dtype}; scores must be compared in one dtype")
        self._dtype = sim.dtype
        return sim

    def add(self, sim_block: Any, gt_block: Any) -> np.ndarray:
        """First pass: (B, V) scores and (B,) GT video indices. Returns the block's t2v ranks."""
        if self._rows_v2t:
            raise RuntimeError("add() after add_v2t(): the first pass is over once the second starts")
        sim = self._check_block(sim_block)
        gt = _check_gt(gt_block, len(sim), self.num_videos, "gt_block")
        ranks = _t2v_block(sim, gt)
        self._ranks.append(ranks)
        np.maximum.at(self._best, gt, sim[np.arange(len(gt)), gt].astype(np.float64))
        self._has_query[gt] = True
        self._rows += len(sim)
        return ranks

    def add_v2t(self, sim_block: Any) -> None:
        """Second pass (v2t only): the same rows again, (B, V), in any block order."""
        if not self._rows:
            raise RuntimeError("add_v2t() before any add(): run the first pass first")
        sim = self._check_block(sim_block)
        bar = self._best.astype(sim.dtype) if sim.dtype.kind == "f" else self._best
        self._above += _count_above(sim, bar)
        self._rows_v2t += len(sim)
        if self._rows_v2t > self._rows:
            raise ValueError(f"the second pass saw {self._rows_v2t} rows, more than the "
                             f"{self._rows} of the first")

    @property
    def num_queries(self) -> int:
        return self._rows

    def t2v_ranks(self) -> np.ndarray:
        """(Q,) t2v ranks in the order rows were added."""
        return np.concatenate(self._ranks) if self._ranks else np.zeros(0, dtype=np.int64)

    def v2t_ranks(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(ranks, video_indices)`` as :func:`v2t_ranks`; needs the complete second pass."""
        if self._rows_v2t != self._rows or not self._rows:
            raise RuntimeError(f"v2t needs the second pass over all {self._rows} rows "
                               f"(add_v2t saw {self._rows_v2t})")
        videos = np.nonzero(self._has_query)[0]
        return 1 + self._above[videos], videos

    def compute(self) -> Dict[str, Any]:
        """``{"t2v": ...}`` plus ``"v2t"`` and ``"num_videos_without_query"`` once the
        second pass is complete."""
        out: Dict[str, Any] = {"t2v": rank_metrics(self.t2v_ranks(), self.ks)}
        if self._rows_v2t:
            ranks, videos = self.v2t_ranks()
            out["v2t"] = rank_metrics(ranks, self.ks)
            out["num_videos_without_query"] = int(self.num_videos - len(videos))
        return out


def topk_from_scores(sim: Any, vids: Sequence[Any], k: int) -> List[Any]:
    """Rank videos by score.

    Args:
        sim: (Q, V) scores, or (V,) for a single query.
        vids: V video ids (column order).
        k: how many to keep (clipped to V).
    Returns:
        For (Q, V): Q lists of ``[vid, score]`` (best first); for (V,): one such list.
        Ties are ordered by column index (lower first). Scores are Python floats.
    """
    arr = _as_numpy(sim, "sim")
    single = arr.ndim == 1
    arr = _check_sim(arr[None] if single else arr)
    if len(vids) != arr.shape[1]:
        raise ValueError(f"{len(vids)} vids for {arr.shape[1]} score columns")
    k = min(int(k), arr.shape[1])
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    out = []
    for row in arr:
        if k < len(row):
            kth = np.partition(row, len(row) - k)[len(row) - k]   # k-th largest score
            cand = np.nonzero(row >= kth)[0]                      # every tie at the boundary
        else:
            cand = np.arange(len(row))
        vals = row[cand].astype(np.float64) if row.dtype.kind == "u" else row[cand]
        top = cand[np.argsort(-vals, kind="stable")[:k]]
        out.append([[vids[j], float(row[j])] for j in top])
    return out[0] if single else out


def column_logsumexp(sim: Any, temperature: float = DSL_TEMPERATURE) -> np.ndarray:
    """(V,) float64 ``log sum_q exp(sim[q, v] / temperature)`` of a (Q, V) block. Blocks of
    rows combine with ``np.logaddexp`` (so DSL over a matrix delivered in blocks, or spread
    over ranks, equals DSL over the whole matrix)."""
    sim = _check_sim(sim).astype(np.float64) / float(temperature)
    if sim.shape[0] == 0:
        return np.full(sim.shape[1], -np.inf)
    m = sim.max(0)
    return m + np.log(np.exp(sim - m[None, :]).sum(0))


def dual_softmax(sim: Any, temperature: float = DSL_TEMPERATURE, col_lse: Optional[np.ndarray] = None
                 ) -> np.ndarray:
    """DSL re-weighting (module docstring): ``sim * exp(sim / T - lse_v)`` -> (Q, V) float64.

    Args:
        sim: (Q, V) scores (rows = queries).
        temperature: ``T`` (the codebases use 0.01).
        col_lse: (V,) :func:`column_logsumexp` over *all* queries when ``sim`` is only a block
            of rows; default: that of ``sim`` itself.
    """
    sim = _check_sim(sim).astype(np.float64)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lse = column_logsumexp(sim, temperature) if col_lse is None else np.asarray(col_lse, dtype=np.float64)
    if lse.shape != (sim.shape[1],):
        raise ValueError(f"col_lse must have shape ({sim.shape[1]},), got {lse.shape}")
    return sim * np.exp(sim / float(temperature) - lse[None, :])
