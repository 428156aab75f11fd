"""One place that turns an index locator into a backend of :class:`~lavis_c2f.index.base.StageOneIndex`.

* a folder: the FAISS backend (:class:`~lavis_c2f.index.corpus_index.CorpusIndex`), the default;
* a ``*.db`` path or an ``http(s)://`` URI, optionally ``#COLLECTION``: the Milvus backend
  (:class:`~lavis_c2f.index.milvus_index.MilvusIndex`; ``collection`` names the collection when
  the locator does not; default ``c2f_index``).

Every front end (``lavis-c2f index`` / ``search`` / ``serve``, the predictor) opens indexes here.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from lavis_c2f.index.corpus_index import CorpusIndex
from lavis_c2f.index.milvus_index import DEFAULT_TIMEOUT_S, MilvusIndex, is_milvus_locator, parse_milvus_locator


def backend_of(locator: Any) -> str:
    """``"milvus"`` for a ``*.db`` path or ``http(s)://`` URI, else ``"faiss"`` (a folder)."""
    return "milvus" if is_milvus_locator(locator) else "faiss"


def locator_text(locator: Any, collection: Optional[str] = None) -> str:
    """The canonical text of a locator: an absolute folder, or ``URI#COLLECTION``."""
    if backend_of(locator) == "milvus":
        return str(parse_milvus_locator(locator, collection))
    return os.path.abspath(os.fspath(locator))


def open_index(locator: Any, model=None, *, verify: bool = True, collection: Optional[str] = None,
               work_dir: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT_S):
    """The index at ``locator`` with ``model`` attached (fingerprint and widths checked; None for
    inspection). ``verify``: check a FAISS index's sha256 checksums; ``timeout``: seconds a Milvus
    store may take to answer."""
    if backend_of(locator) == "milvus":
        return MilvusIndex.open(parse_milvus_locator(locator, collection), model=model, timeout=timeout)
    return CorpusIndex.load(os.fspath(locator), model=model, verify=verify, work_dir=work_dir)


__all__ = ["backend_of", "locator_text", "open_index"]
