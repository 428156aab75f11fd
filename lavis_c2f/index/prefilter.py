"""The pre-filter of the corpus index: candidate videos of a query from a FAISS index.

Each video is represented by up to ``S`` vectors (the normalised means of its frames in S
contiguous segments, stored by :class:`~lavis_c2f.index.store.FrameStore`); a video's
pre-filter score is its best segment. FAISS ids are ``row * S + segment``; hits are grouped
per video, best segment first, and dead rows are skipped. The FAISS index kind follows the
size policy of :class:`~lavis_c2f.index.ann.AnnConfig` (flat, PQ fast-scan, IVF, HNSW). Coarse
4-bit PQ hits (``pq`` kind, or IVF with pq4 codes) are re-scored exactly from the stored vectors.

Removal deletes the ids from flat / IVF indexes; HNSW cannot delete, so its removed entries
stay as tombstones (filtered at search time) until the automatic rebuild once more than
``rebuild_fraction`` of the entries are dead. When the ``auto`` policy would now pick another
kind (the corpus grew past ``flat_max``), the index is rebuilt on the next extension.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from lavis_c2f.index.ann import AnnConfig, AnnIndex
from lavis_c2f.index.store import FrameStore, IndexFormatError

logger = logging.getLogger(__name__)

ANN_FILE = "ann.faiss"
_BLOCK = 65536


class Prefilter:
    """FAISS candidates over the pre-filter vectors of a :class:`FrameStore` (module docstring).

    Args:
        config: :class:`AnnConfig` (or a mapping of its fields).
        rebuild_fraction: rebuild an HNSW index once this fraction of its entries are dead.
    """

    def __init__(self, config: Any = None, rebuild_fraction: float = 0.3):
        self.config = config if isinstance(config, AnnConfig) else AnnConfig.from_dict(config)
        self.rebuild_fraction = float(rebuild_fraction)
        self.ann: Optional[AnnIndex] = None
        self.dead = 0

    @property
    def kind(self) -> Optional[str]:
        return None if self.ann is None else self.ann.kind

    # ------------------------------------------------------------------ building
    def extend(self, store: FrameStore, rows: np.ndarray) -> None:
        """Add ``rows`` to the FAISS index, or rebuild it when the size policy now wants another
        kind (e.g. flat -> IVF) or there is none yet."""
        want = self.config.choose_kind(store.num_vectors())
        if self.ann is None or (self.config.kind == "auto" and want != self.ann.kind):
            self.rebuild(store)
        else:
            for s in range(0, len(rows), _BLOCK):
                vec, ids = store.vectors(rows[s:s + _BLOCK])
                self.ann.add(vec, ids)

    def rebuild(self, store: FrameStore, config: Optional[AnnConfig] = None) -> None:
        """(Re)build the FAISS index from the alive rows (kind re-chosen by the size policy)."""
        if config is not None:
            self.config = config
        rows = store.alive_rows()
        cfg = self.config
        n_vec = store.num_vectors(rows)
        train = None
        n_train = cfg.train_size(n_vec)
        if n_train:
            # training sample: random rows until enough vectors (chunked, never all at once)
            rng = np.random.default_rng(cfg.seed)
            pick = rows[np.sort(rng.permutation(len(rows))[: int(math.ceil(n_train / max(1, n_vec / len(rows))))])]
            train, _ = store.vectors(pick)
            train = train[:n_train]
        self.ann = AnnIndex.create(cfg, n_vec, store.dim, train)
        for s in range(0, len(rows), _BLOCK):
            vec, ids = store.vectors(rows[s:s + _BLOCK])
            self.ann.add(vec, ids)
        self.dead = 0
        logger.info("index: built a %s pre-filter over %d videos (%d vectors) %s", self.ann.kind, len(rows), n_vec,
                    self.ann.params)

    def remove(self, store: FrameStore, rows: np.ndarray) -> None:
        """Drop the entries of ``rows`` (tombstones where FAISS cannot delete; rebuilt past
        ``rebuild_fraction``)."""
        if self.ann is None or not len(rows):
            return
        _, ids = store.vectors(rows)
        removed = self.ann.remove(ids)
        self.dead += len(ids) - removed
        if self.ann.ntotal and self.dead / self.ann.ntotal > self.rebuild_fraction:
            logger.info("index: %d of %d FAISS entries are tombstones; rebuilding", self.dead, self.ann.ntotal)
            self.rebuild(store)

    # ------------------------------------------------------------------ searching
    def set_nprobe(self, nprobe: int) -> None:
        """IVF lists probed per query from now on."""
        self.ann.set_search_params(nprobe=nprobe)

    def candidates(self, store: FrameStore, query_vectors: np.ndarray, m: int,
                   nprobe: Optional[int] = None) -> List[np.ndarray]:
        """Per query (rows of ``query_vectors`` (Q, D)), the rows of at most ``m`` alive videos,
        best pre-filter score first. ``nprobe`` overrides the IVF ``nprobe`` for this call."""
        sv = store.segments_per_video
        if nprobe is not None:
            old = self.ann.params.get("nprobe")
            self.ann.set_search_params(nprobe=nprobe)
        refine = int(self.ann.params.get("refine", 0)) if self.ann.params.get("codec") == "pq4" else 0
        try:
            fetch = min(self.ann.ntotal, (refine * m if refine else m * sv) + self.dead)
            _, ids = self.ann.search(query_vectors, fetch)
        finally:
            if nprobe is not None and old is not None:
                self.ann.set_search_params(nprobe=old)
        out = []
        for q, hits in enumerate(ids):
            hits = hits[hits >= 0]
            if refine:                                          # coarse PQ scores: exact ones, best first
                exact = torch.mv(store.vectors_of_ids(hits), torch.from_numpy(query_vectors[q]).float()).numpy()
                hits = hits[np.lexsort((hits, -exact))]
            rows = hits // sv                                   # best segment first, per video
            _, first = np.unique(rows, return_index=True)
            cand = rows[np.sort(first)]
            out.append(cand[store.is_alive(cand)][:m])
        return out

    # ------------------------------------------------------------------ persistence
    def write(self, folder: str) -> Optional[str]:
        """Write the FAISS index as ``folder/ann.faiss``; returns the file name (None without one)."""
        if self.ann is None:
            return None
        self.ann.write(os.path.join(folder, ANN_FILE))
        return ANN_FILE

    def manifest(self) -> Dict[str, Any]:
        return {"kind": self.ann.kind if self.ann else None, "params": self.ann.params if self.ann else {},
                "config": self.config.to_dict(), "dead_entries": self.dead}

    @classmethod
    def read(cls, folder: str, files: Mapping[str, Any], manifest: Mapping[str, Any], store: FrameStore,
             rebuild_fraction: float = 0.3) -> "Prefilter":
        """The pre-filter of a saved index (``manifest`` = its ``ann`` entry); the entry count
        is checked against the store's vectors."""
        pre = cls(manifest.get("config"), rebuild_fraction=rebuild_fraction)
        path = os.path.join(folder, ANN_FILE)
        if ANN_FILE in files:
            try:
                pre.ann = AnnIndex.read(path, manifest.get("kind"), store.dim, manifest.get("params", {}))
            except Exception as e:  # noqa: BLE001 - FAISS raises RuntimeError with C++ text
                raise IndexFormatError(f"cannot read the FAISS index: {e}", path=path) from None
            pre.dead = int(manifest.get("dead_entries", 0))
            want = store.num_vectors() + pre.dead
            if pre.ann.ntotal != want:
                raise IndexFormatError(f"FAISS index holds {pre.ann.ntotal} entries, expected {want}", path=path)
        return pre

    def info(self) -> Optional[Dict[str, Any]]:
        if self.ann is None:
            return None
        return {"kind": self.ann.kind, **self.ann.params, "entries": self.ann.ntotal, "tombstones": self.dead}


__all__ = ["ANN_FILE", "Prefilter"]
