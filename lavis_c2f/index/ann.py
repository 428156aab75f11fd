"""FAISS pre-filter of the corpus index (inner product on L2-normalised vectors).

The kind is chosen from the corpus size unless forced (:class:`AnnConfig`; every default
below is written in ``lavis_c2f/configs/index/ann.yaml``):

N counts indexed *vectors* (the corpus index stores ``prefilter_segments`` vectors per video).

* ``flat`` -- exact ``IndexFlatIP`` inside an ``IndexIDMap2`` for ``N <= flat_max``
  (default 60 000: a single-query flat scan reads N x D x 4 bytes, about 120 MB at
  60 000 x 512, ~15 ms on two cores here; at 3e5 vectors it would be ~75 ms);
* ``pq`` -- every vector scanned as 4-bit fast-scan PQ codes (``IndexPQFastScan`` of
  ``ivf_pq_m`` sub-vectors, 32 bytes per 512-d vector at 64; no coarse quantizer), then the best
  ``ivf_pq_refine x m`` re-scored exactly from the stored float16 vectors, for
  ``flat_max < N <= pq_max`` (default 1e7). One thread scans 3e5 codes in 0.6 ms and 3e6 in
  3.5 ms (k = 4096), less than an IVF index spends probing half its lists, and nothing is missed
  by the probes; the PQ is trained on at most ``pq_train_max`` sampled vectors;
* ``ivf`` -- beyond ``pq_max`` vectors: ``IndexIVFScalarQuantizer`` 8-bit (``ivf_sq8_from``: 4x less
  memory and a faster scan than float codes, near-identical inner products on unit vectors),
  or ``IndexIVFFlat`` with ``ivf_codec: flat`` (or below ``ivf_sq8_from``). ``nlist`` defaults to the power of two nearest
  ``4 * sqrt(N)``, clamped to [64, ``ivf_nlist_max`` = 4096] (k-means cost grows with nlist^2);
  the coarse quantizer is trained (``ivf_kmeans_iters`` = 10 iterations) on
  ``min(N, ivf_train_per_list * nlist)`` vectors (40 per list, FAISS's minimum) sampled with
  ``seed``; ``nprobe`` defaults to ``nlist // ivf_nprobe_div`` clamped to
  [``ivf_nprobe_min``, ``ivf_nprobe_max``] (a quarter of the lists, at most 512: text queries
  have low inner products with the video vectors, so their neighbours spread over many lists;
  the scan cost bounds it at 1e6 videos; measurements in the YAML);
* ``ivf`` with ``ivf_codec: pq4`` -- ``IndexIVFPQFastScan``: 4-bit product-quantizer codes of
  ``ivf_pq_m`` sub-vectors (64: 32 bytes per 512-d vector) scanned with SIMD lookup tables,
  several times cheaper per probed vector than 8-bit codes, so many more lists can be probed
  for the same time. Their inner products are coarse, so the pre-filter fetches
  ``ivf_pq_refine x m`` vectors and re-scores them exactly from the stored float16 vectors
  before keeping the best ``m`` videos (:class:`~lavis_c2f.index.prefilter.Prefilter`);
* ``hnsw`` -- ``IndexHNSWFlat`` (``hnsw_m``, ``efConstruction``, ``efSearch``), only when
  asked for (building it for 1e6 x 512 takes long on two cores). HNSW cannot delete: removed
  ids stay in the graph as tombstones, filtered at search time and dropped at the next
  rebuild.

Ids are the corpus index's int64 row numbers.

Searches are batch-independent: FAISS computes the distances of 20 or more queries (flat
index, IVF coarse quantizer) with BLAS, whose rounding differs from its one-query kernel, so
:meth:`AnnIndex.search` keeps FAISS on its own kernels (a batch of queries gives exactly what
each query gives alone; the scans still run in parallel over the queries).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import check_keys, yaml_defaults

logger = logging.getLogger(__name__)

KINDS = ("auto", "flat", "pq", "ivf", "hnsw")
CODECS = ("auto", "flat", "sq8", "pq4")
#: FAISS's ``distance_compute_blas_threshold`` while searching: never BLAS (batch-independent results)
NO_BLAS_ROWS = 1 << 30


#: defaults of :class:`AnnConfig`: lavis_c2f/configs/index/ann.yaml
ANN_DEFAULTS = yaml_defaults("index/ann.yaml", "ann")


@dataclass
class AnnConfig:
    """Pre-filter settings (all overridable; defaults in ``configs/index/ann.yaml``, see the
    module docstring)."""

    kind: str = ANN_DEFAULTS["kind"]
    flat_max: int = ANN_DEFAULTS["flat_max"]
    pq_max: Optional[int] = ANN_DEFAULTS["pq_max"]
    pq_train_max: int = ANN_DEFAULTS["pq_train_max"]
    ivf_nlist: Optional[int] = ANN_DEFAULTS["ivf_nlist"]
    ivf_nprobe: Optional[int] = ANN_DEFAULTS["ivf_nprobe"]
    ivf_nprobe_div: int = ANN_DEFAULTS["ivf_nprobe_div"]
    ivf_nprobe_min: int = ANN_DEFAULTS["ivf_nprobe_min"]
    ivf_nprobe_max: int = ANN_DEFAULTS["ivf_nprobe_max"]
    ivf_codec: str = ANN_DEFAULTS["ivf_codec"]
    ivf_sq8_from: int = ANN_DEFAULTS["ivf_sq8_from"]
    ivf_pq_from: Optional[int] = ANN_DEFAULTS["ivf_pq_from"]
    ivf_pq_m: int = ANN_DEFAULTS["ivf_pq_m"]
    ivf_pq_refine: int = ANN_DEFAULTS["ivf_pq_refine"]
    ivf_pq_nprobe_div: int = ANN_DEFAULTS["ivf_pq_nprobe_div"]
    ivf_pq_nprobe_max: int = ANN_DEFAULTS["ivf_pq_nprobe_max"]
    ivf_train_per_list: int = ANN_DEFAULTS["ivf_train_per_list"]
    ivf_nlist_max: int = ANN_DEFAULTS["ivf_nlist_max"]
    ivf_kmeans_iters: int = ANN_DEFAULTS["ivf_kmeans_iters"]
    hnsw_m: int = ANN_DEFAULTS["hnsw_m"]
    hnsw_ef_construction: int = ANN_DEFAULTS["hnsw_ef_construction"]
    hnsw_ef_search: int = ANN_DEFAULTS["hnsw_ef_search"]
    seed: int = ANN_DEFAULTS["seed"]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"ann.kind must be one of {KINDS}, got {self.kind!r}")
        if self.ivf_codec not in CODECS:
            raise ConfigError(f"ann.ivf_codec must be one of {CODECS}, got {self.ivf_codec!r}")
        for name in ("flat_max", "pq_train_max", "ivf_sq8_from", "ivf_train_per_list", "ivf_nlist_max", "ivf_kmeans_iters",
                     "ivf_pq_m", "ivf_pq_refine", "ivf_pq_nprobe_div", "ivf_pq_nprobe_max",
                     "ivf_nprobe_div", "ivf_nprobe_min", "ivf_nprobe_max",
                     "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"ann.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("pq_max", "ivf_nlist", "ivf_nprobe", "ivf_pq_from"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ConfigError(f"ann.{name} must be >= 1, got {v!r}")

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "AnnConfig":
        return cls(**check_keys(d, {f.name for f in dataclasses.fields(cls)}, "ann"))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def choose_kind(self, n: int) -> str:
        """``kind``, or for ``auto``: flat up to ``flat_max`` vectors, pq up to ``pq_max`` (None:
        no bound), IVF beyond."""
        if self.kind != "auto":
            return self.kind
        if n <= self.flat_max:
            return "flat"
        return "pq" if self.pq_max is None or n <= self.pq_max else "ivf"

    def train_size(self, n: int) -> int:
        """How many of ``n`` vectors train the quantizers of the kind chosen for ``n`` (0: none)."""
        kind = self.choose_kind(n)
        if kind == "ivf":
            return min(n, int(self.ivf_train_per_list) * self.nlist_for(n))
        return min(n, int(self.pq_train_max)) if kind == "pq" else 0

    def nlist_for(self, n: int) -> int:
        if self.ivf_nlist is not None:
            return int(self.ivf_nlist)
        target = 4.0 * math.sqrt(max(n, 1))
        return int(min(self.ivf_nlist_max, max(64, 2 ** round(math.log2(target)))))

    def codec_for(self, n: int) -> str:
        if self.ivf_codec != "auto":
            return self.ivf_codec
        if self.ivf_pq_from is not None and n > self.ivf_pq_from:
            return "pq4"
        return "sq8" if n > self.ivf_sq8_from else "flat"

    def nprobe_for(self, nlist: int, codec: str = "sq8") -> int:
        """Lists probed: ``ivf_nprobe``, else ``nlist / div`` clamped to [``ivf_nprobe_min``, max]
        with ``div`` / max of the codes (``ivf_pq_nprobe_*`` for pq4, whose scan is cheaper)."""
        if self.ivf_nprobe is not None:
            return min(int(self.ivf_nprobe), nlist)
        pq = codec == "pq4"
        div = int(self.ivf_pq_nprobe_div if pq else self.ivf_nprobe_div)
        cap = int(self.ivf_pq_nprobe_max if pq else self.ivf_nprobe_max)
        return min(nlist, max(int(self.ivf_nprobe_min), min(cap, nlist // div)))


def _faiss():
    # imported lazily: the package works without it until an index is used; its loader logs
    # every CPU-specific build it tries at INFO, which is noise for users
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


class AnnIndex:
    """A FAISS inner-product index over int64 ids (see the module docstring)."""

    def __init__(self, index, kind: str, dim: int, params: Dict[str, Any]):
        self.index, self.kind, self.dim, self.params = index, kind, int(dim), dict(params)

    # -------------------------------------------------------------- construction
    @classmethod
    def create(cls, config: AnnConfig, n: int, dim: int, train: Optional[np.ndarray] = None) -> "AnnIndex":
        """An empty index for ``n`` vectors of width ``dim`` (kind from ``config.choose_kind(n)``);
        IVF quantizers are trained on ``train`` (a sample of the vectors, float32)."""
        faiss = _faiss()
        d = int(dim)
        kind = config.choose_kind(n)
        if kind in ("ivf", "pq") and (train is None or len(train) < 2):
            kind = "flat"
        params: Dict[str, Any] = {}
        if kind == "pq" or (kind == "ivf" and config.codec_for(n) == "pq4"):
            pq_m = int(config.ivf_pq_m)
            if d % pq_m:
                raise ConfigError(f"ann.ivf_pq_m ({pq_m}) must divide the vector width {d}")
        if kind in ("ivf", "pq"):
            train = np.ascontiguousarray(train, dtype=np.float32)
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        elif kind == "pq":
            base = faiss.IndexPQFastScan(d, int(config.ivf_pq_m), 4, faiss.METRIC_INNER_PRODUCT)
            base.train(train)
            index = faiss.IndexIDMap2(base)
            params = {"codec": "pq4", "pq_m": int(config.ivf_pq_m), "refine": int(config.ivf_pq_refine),
                      "trained_on": int(len(train))}
        elif kind == "hnsw":
            base = faiss.IndexHNSWFlat(d, int(config.hnsw_m), faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = int(config.hnsw_ef_construction)
            base.hnsw.efSearch = int(config.hnsw_ef_search)
            index = faiss.IndexIDMap2(base)
            params = {"m": int(config.hnsw_m), "ef_construction": int(config.hnsw_ef_construction),
                      "ef_search": int(config.hnsw_ef_search)}
        else:
            nlist = max(1, min(config.nlist_for(n), len(train)))
            codec = config.codec_for(n)
            quantizer = faiss.IndexFlatIP(d)
            if codec == "sq8":
                index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                      faiss.METRIC_INNER_PRODUCT)
            elif codec == "pq4":
                index = faiss.IndexIVFPQFastScan(quantizer, d, nlist, int(config.ivf_pq_m), 4,
                                                 faiss.METRIC_INNER_PRODUCT)
            else:
                index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.own_fields = True
            quantizer.this.disown()
            if hasattr(index, "cp"):
                index.cp.seed = int(config.seed)
                index.cp.niter = int(config.ivf_kmeans_iters)
            index.train(train)
            index.nprobe = config.nprobe_for(nlist, codec)
            params = {"nlist": nlist, "nprobe": int(index.nprobe), "codec": codec, "trained_on": int(len(train))}
            if codec == "pq4":
                params.update(pq_m=int(config.ivf_pq_m), refine=int(config.ivf_pq_refine))
        return cls(index, kind, d, params)

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, config: AnnConfig) -> "AnnIndex":
        """Index ``vectors`` (N, D) float32 (L2-normalised) under ``ids`` (N,) int64."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if vectors.ndim != 2 or ids.shape != (vectors.shape[0],):
            raise ValueError(f"AnnIndex.build: vectors (N, D) and ids (N,) expected, got {vectors.shape}, {ids.shape}")
        n = vectors.shape[0]
        train = None
        n_train = config.train_size(n)
        if n_train:
            rng = np.random.default_rng(config.seed)
            train = vectors if n_train >= n else vectors[np.sort(rng.choice(n, n_train, replace=False))]
        out = cls.create(config, n, vectors.shape[1], train)
        if n:
            out.add(vectors, ids)
        return out

    # -------------------------------------------------------------- updates
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def supports_remove(self) -> bool:
        return self.kind != "hnsw"

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"AnnIndex.add: expected (N, {self.dim}) vectors, got {vectors.shape}")
        if len(ids):
            self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids``; returns how many were removed (0 for HNSW: tombstones)."""
        if not self.supports_remove or len(ids) == 0:
            return 0
        faiss = _faiss()
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        return int(self.index.remove_ids(sel))

    def set_search_params(self, nprobe: Optional[int] = None, ef_search: Optional[int] = None) -> None:
        """Override ``nprobe`` (IVF) / ``efSearch`` (HNSW) for later searches."""
        faiss = _faiss()
        if nprobe is not None and self.kind == "ivf":
            self.index.nprobe = int(nprobe)
            self.params["nprobe"] = int(nprobe)
        if ef_search is not None and self.kind == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = int(ef_search)
            self.params["ef_search"] = int(ef_search)

    # -------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) float32 -> (scores (Q, k), ids (Q, k)); missing slots have id -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        q = queries.shape[0]
        k = int(min(k, max(self.ntotal, 0)))
        if k <= 0 or q == 0:
            return np.zeros((q, 0), np.float32), np.zeros((q, 0), np.int64)
        # FAISS computes flat / coarse-quantizer distances of 20+ queries with BLAS, whose rounding
        # differs from its per-query kernel: searching a batch must give what each query gives alone
        faiss = _faiss()
        if faiss.cvar.distance_compute_blas_threshold <= q:
            faiss.cvar.distance_compute_blas_threshold = NO_BLAS_ROWS
        scores, ids = self.index.search(queries, k)
        return scores, ids

    # -------------------------------------------------------------- persistence
    def write(self, path: str) -> None:
        _faiss().write_index(self.index, path)

    @classmethod
    def read(cls, path: str, kind: str, dim: int, params: Mapping[str, Any]) -> "AnnIndex":
        faiss = _faiss()
        index = faiss.read_index(path)
        if int(index.d) != int(dim):
            raise ValueError(f"FAISS index has dimension {index.d}, expected {dim}")
        out = cls(index, kind, dim, dict(params))
        if kind == "ivf" and "nprobe" in params:
            index.nprobe = int(params["nprobe"])
        if kind == "hnsw" and "ef_search" in params:
            faiss.downcast_index(index.index).hnsw.efSearch = int(params["ef_search"])
        return out
