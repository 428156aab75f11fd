"""What the coarse-to-fine engine needs of a stage-1 index: :class:`StageOneIndex`.

:class:`~lavis_c2f.index.corpus_index.CorpusIndex` (FAISS pre-filter over frame files on disk)
implements it; a second backend (a vector database holding the pre-filter vectors, say) does
by the same methods. A search is a pre-filter followed by an exact re-ranking with the
attached retriever::

    index.search(text_emb, k, m) == index.rerank(text_emb, index.candidates(text_emb, m), k)

``text_emb`` is the retriever's ``TextEmbedding`` of a batch of Q queries; every method
answers per query, in order.

Both backends attach their retriever the same way, through :class:`StageOneBase`: the model
must be the one the index was built with (:func:`check_model`: the manifest's
``model.config_hash`` / ``model.weights_hash``, the widths ``D`` and ``F``).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

logger = logging.getLogger(__name__)


class IndexMismatchError(ValueError):
    """The index was built with another model (fingerprint) or other dimensions."""


def stored_rows_per_video(model) -> int:
    """Rows of width D an index stores per video: the model's ``index_rows_per_video`` (a
    retriever whose video embedding is more than frames, e.g. UCoFiA's patch tokens) or its
    ``num_frames``."""
    return int(getattr(model, "index_rows_per_video", model.num_frames))


def check_model(model, model_info: Mapping[str, Any], dim: int, max_frames: int, where: str) -> None:
    """Raise :class:`IndexMismatchError` naming the field when ``model`` is not the one an index
    was built with (``model.config_hash`` / ``model.weights_hash`` of ``model_info``) or its widths
    differ (``dim``, ``max_frames``); ``where`` names the index (file or collection). Switches a
    model configured with ``per_pair`` inference noise to ``shared`` (re-ranking needs a pair's
    score to be independent of the candidate set)."""
    fp = model.fingerprint()
    for key in ("config_hash", "weights_hash"):
        if fp.get(key) != model_info.get(key):
            raise IndexMismatchError(
                f"{where}: model.{key} is {model_info.get(key)!r} but the given model has {fp.get(key)!r}: "
                "the index was built with another model configuration or checkpoint; rebuild it")
    if int(model.embed_dim) != int(dim) or stored_rows_per_video(model) != int(max_frames):
        raise IndexMismatchError(f"{where}: index dims (D={dim}, frames={max_frames}) differ from the "
                                 f"model's (D={model.embed_dim}, frames={stored_rows_per_video(model)})")
    if getattr(model, "inference_noise", "shared") == "per_pair":
        logger.warning("the corpus index scores with inference_noise 'shared' (the model was configured with "
                       "'per_pair', which is for whole-matrix evaluation)")
        model.configure_inference(inference_noise="shared")


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


class StageOneBase:
    """The retriever attachment both backends share: a subclass sets ``model_info`` (the
    manifest's fingerprint), ``dim``, ``max_frames`` and ``model`` (None until attached) and names
    its manifest in :meth:`_manifest_name` (the file or collection an error points at)."""

    model: Any = None
    model_info: Dict[str, Any]
    dim: int
    max_frames: int

    def _manifest_name(self) -> str:
        raise NotImplementedError

    def attach(self, model: Any):
        """Use ``model`` for queries and re-ranking; its fingerprint and widths must match the
        manifest's (:func:`check_model`)."""
        check_model(model, self.model_info, self.dim, self.max_frames, self._manifest_name())
        self.model = model
        return self

    def _require_model(self) -> Any:
        if self.model is None:
            raise RuntimeError(f"no model attached to the index {self._manifest_name()}: pass model= when opening "
                               "it or call attach(model)")
        return self.model


__all__ = ["IndexMismatchError", "StageOneBase", "StageOneIndex", "check_model", "stored_rows_per_video"]
