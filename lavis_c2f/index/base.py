"""What the coarse-to-fine engine needs of a stage-1 index: :class:`StageOneIndex`.

:class:`~lavis_c2f.index.corpus_index.CorpusIndex` (FAISS pre-filter over frame files on disk)
implements it; a second backend (a vector database holding the pre-filter vectors, say) does
by the same methods. A search is a pre-filter followed by an exact re-ranking with the
attached retriever::

    index.search(text_emb, k, m) == index.rerank(text_emb, index.candidates(text_emb, m), k)

``text_emb`` is the retriever's ``TextEmbedding`` of a batch of Q queries; every method
answers per query, in order.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable


@runtime_checkable
class StageOneIndex(Protocol):
    """A searchable set of videos encoded by one stage-1 retriever (module docstring)."""

    @property
    def vids(self) -> List[str]:
        """The indexed video ids."""

    def __len__(self) -> int: ...

    def __contains__(self, vid: object) -> bool: ...

    def duration(self, vid: str) -> Optional[float]:
        """Seconds of an indexed video, None when unknown."""

    def attach(self, model: Any) -> "StageOneIndex":
        """Use ``model`` (a stage-1 retriever) for queries and re-ranking; raises when the index
        was built with another model (its fingerprint) or other dimensions."""

    def candidates(self, text_emb: Any, m: int) -> List[List[str]]:
        """Pre-filter: at most ``m`` video ids per query, best first."""

    def rerank(self, text_emb: Any, candidates: Sequence[Sequence[str]], k: int) -> List[List[Tuple[str, float]]]:
        """The ``k`` best ``(vid, exact score)`` of each query's candidates, best first."""

    def search(self, text_emb: Any, k: int = 10, m: Optional[int] = None) -> List[List[Tuple[str, float]]]:
        """``rerank(text_emb, candidates(text_emb, m), k)`` (``m`` defaults to the backend's)."""

    def info(self) -> Dict[str, Any]:
        """Metadata: counts, dims, the retriever's fingerprint, the backend's settings."""


__all__ = ["StageOneIndex"]
