"""The exact re-scoring of one query's candidate videos, shared by every stage-1 backend
(:class:`~lavis_c2f.index.corpus_index.CorpusIndex`, :class:`~lavis_c2f.index.milvus_index.MilvusIndex`).

A query is scored on its own, with the same shapes whether it is searched alone or in a batch,
so its scores never depend on the other queries (and both backends give bit-equal scores for
the same stored frames): a retriever that scores explicit pairs (T-MASS ``score_pairs``) gets
the pairs ``(q, candidate)`` with the query and the pairs padded to
:data:`~lavis_c2f.ops.batching.GEMM_MIN_ROWS` rows (:mod:`lavis_c2f.ops.batching`); other
retrievers (UCoFiA) the (1, m) grid of ``score``.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from lavis_c2f.ops.batching import GEMM_MIN_ROWS, padded_index


def score_candidates(model: Any, text_emb: Any, q: int, video_emb: Any,
                     video_bias: Optional[torch.Tensor] = None) -> np.ndarray:
    """(m,) float64 exact scores of query ``q`` of ``text_emb`` against the m videos of
    ``video_emb`` (``video_bias``: their (m, L) Sinkhorn biases, or None)."""
    m = len(video_emb)
    if hasattr(model, "score_pairs"):
        vi = torch.from_numpy(padded_index(m))
        scores = model.score_pairs(text_emb[np.full(GEMM_MIN_ROWS, q)], video_emb, torch.zeros_like(vi), vi,
                                   video_bias=video_bias, block_size=len(vi))[:m]
    else:
        scores = model.score(text_emb[q], video_emb, video_bias=video_bias)[0]
    return scores.cpu().double().numpy()


__all__ = ["score_candidates"]
