"""Stage-1 corpus index in Milvus: the second backend of :class:`~lavis_c2f.index.base.StageOneIndex`.

One client (``pymilvus.MilvusClient``) talks to an embedded milvus-lite file (``corpus.db``), a
``milvus-lite server`` or a Milvus standalone / distributed deployment (``http://host:19530``)
with the same calls. The locator is ``URI#COLLECTION`` (:func:`parse_milvus_locator`; the
collection defaults to ``c2f_index``).

The collection holds one row per video (what a query needs, in the form every Milvus
supports: milvus-lite has ``FLOAT_VECTOR`` only, no float16 and no array-of-vector fields)::

    vid        VARCHAR(512), primary key (upserts by video id: a re-run adds nothing twice)
    duration   DOUBLE, seconds (-1 = unknown)
    source     VARCHAR, where the video came from (a file path, "" when unknown)
    n_frames   INT32, valid stored rows F_v <= F
    valid_s    BOOL, pre-filter segment s holds a vector (s < S)
    pre_s      FLOAT_VECTOR(D), pre-filter vector of segment s (indexed: FLAT / HNSW / IVF_FLAT, IP)
    frames_c   VARCHAR(65535), c < C: the F_v valid stored rows (F_v, D) row-major as float16
               (``frame_dtype``; float32 on request) bytes, base64, cut into C fields of at most
               65532 characters (C = 1 for 12 x 512 float16 rows); read back by id for the exact
               re-ranking, never searched, so kept out of any vector index

With S pre-filter vectors per video (``prefilter_segments``, 1..3: Milvus allows 4 vector fields
per collection by default) a video's pre-filter score is its best segment, as in the FAISS
backend: each ``pre_s`` is searched for the top ``m`` among its valid rows and the hits are
merged per video. The union of the per-segment top ``m`` holds the top ``m`` videos by best
segment, so with an exact (FLAT) pre-filter the candidates are the FAISS flat index's. Vectors
are rounded to float16 precision and frames stored as float16 when ``frame_dtype`` is ``float16``
(the FAISS default), so both backends score the same numbers. Why bytes, not a vector field:
milvus-lite has no FLOAT16_VECTOR, and a FLOAT_VECTOR(F x D) of the frames (format version 1)
is held in memory twice as float32 (column and its required FLAT index) and sent as lists of
Python floats; as float16 text the frames take 1/3 of the memory and read back several times
faster (bench/index_backends.py).

The manifest (format, version, the retriever's fingerprint and config, widths, clip length and
the corpus sidecar of ``index videos``, build options) is one JSON row of the companion
collection ``COLLECTION_c2f_manifest``; opening a collection whose manifest disagrees with the
model (or whose vector fields have other widths than the manifest) raises
:class:`~lavis_c2f.index.corpus_index.IndexMismatchError` /
:class:`~lavis_c2f.index.store.IndexFormatError` naming the field. Stage-2 clip features are
not in Milvus: the manifest's ``corpus.features_dir`` names the feature store (a path every
serving node mounts), as the sidecar of a FAISS index does.

Per-video Sinkhorn (UCoFiA SK-norm) biases, computed once over a query bank and the whole
corpus (:meth:`MilvusIndex.compute_video_bias`, ``index build --sinkhorn-bank``, the numbers of
:func:`~lavis_c2f.index.corpus_index.video_bias_of` as the FAISS backend stores them), live in the
companion collection ``COLLECTION_c2f_bias`` (``vid`` primary key, ``bias``
FLOAT_VECTOR(max(L, 2)) holding the L per-level values; float32, so both backends score the same
numbers); the manifest's ``video_bias`` records the levels and the inference settings they were
computed with (another setting at query time is an :class:`IndexMismatchError`). A video without
a bias row (added later, or re-upserted, which drops its row) scores with zero bias, as in the
FAISS backend; without stored biases a retriever with ``sinkhorn: true`` scores with zero bias.
"""
from __future__ import annotations

import base64
import datetime
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from lavis_c2f.common.errors import ConfigError, IndexUnavailableError
from lavis_c2f.common.progress import progress_bar
from lavis_c2f.index.base import IndexMismatchError, StageOneBase, stored_rows_per_video
from lavis_c2f.index.corpus_index import (check_bias_settings, encode_features, model_info_of, stored_rows,
                                          video_bias_array, video_bias_of)
from lavis_c2f.index.exact import score_candidates
from lavis_c2f.index.store import IndexFormatError, rows_embedding
from lavis_c2f.version import __version__

logger = logging.getLogger(__name__)

FORMAT_NAME = "lavis_c2f.milvus_index"
FORMAT_VERSION = 2
DEFAULT_COLLECTION = "c2f_index"
MANIFEST_SUFFIX = "_c2f_manifest"
BIAS_SUFFIX = "_c2f_bias"
#: Milvus' largest ``limit`` of one search (``m`` candidates per query are capped to it)
MAX_TOPK = 16384
#: seconds a connection attempt (and each call) may take before the store counts as unreachable
DEFAULT_TIMEOUT_S = 10.0
ANN_KINDS = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}
_ANN_DEFAULTS = {"flat": {}, "hnsw": {"M": 16, "efConstruction": 200}, "ivf": {"nlist": 1024}}
_SEARCH_DEFAULTS = {"flat": {}, "hnsw": {"ef": 512}, "ivf": {"nprobe": 32}}
#: gRPC channel options of the client: no keepalive pings on an idle connection (pymilvus pings every
#: 10 s by default, and a ``milvus-lite server``, a plain gRPC server, answers pings without calls more
#: often than every 5 min with GOAWAY "too_many_pings", after which pymilvus' recovery of the
#: connection can fail and leave the client unable to connect); each call's timeout detects a dead store
_GRPC_OPTIONS = {"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": 0}
#: open clients of each embedded milvus-lite store of this process (absolute ``*.db`` path -> count):
#: the last :func:`disconnect` stops the store's in-process server, which frees its LOCK
_EMBEDDED_CLIENTS: Dict[str, int] = {}
_EMBEDDED_GUARD = threading.Lock()
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
_UPSERT_ROWS = 256          # rows per upsert call (F x D floats each)
_GET_IDS = 256              # ids per get call of the re-ranker
_MAX_SOURCE = 4096
_MAX_VID = 512
_MAX_MANIFEST = 65535
_FRAME_CHARS = 65532        # base64 characters per frames_c field (a multiple of 4, <= VARCHAR's 65535)


# =========================================================================== locators
@dataclass(frozen=True)
class MilvusLocator:
    """Where a Milvus index lives: ``uri`` (an absolute ``*.db`` path for milvus-lite, or
    ``http(s)://host:port``) and the ``collection``."""

    uri: str
    collection: str

    @property
    def embedded(self) -> bool:
        return not self.uri.startswith(("http://", "https://"))

    def __str__(self) -> str:
        return f"{self.uri}#{self.collection}"


def is_milvus_locator(text: Any) -> bool:
    """Whether ``text`` names a Milvus index: ``http(s)://...`` or a ``*.db`` path (optionally
    with ``#COLLECTION``); anything else is a FAISS index folder."""
    if text is None:
        return False
    if isinstance(text, MilvusLocator):
        return True
    base = os.fspath(text).split("#", 1)[0]
    return base.startswith(("http://", "https://")) or base.endswith(".db")


def parse_milvus_locator(text: Any, collection: Optional[str] = None) -> MilvusLocator:
    """``URI[#COLLECTION]`` (or a :class:`MilvusLocator`) -> :class:`MilvusLocator`; ``collection``
    (e.g. ``--collection``) applies when the text names none. Raises :class:`ConfigError` for a
    bad collection name or two different ones."""
    if isinstance(text, MilvusLocator):
        if collection and collection != text.collection:
            raise ConfigError(f"collection {collection!r} given twice with another name ({text.collection!r})")
        return text
    raw = os.fspath(text)
    uri, _, frag = raw.partition("#")
    if frag and collection and frag != collection:
        raise ConfigError(f"{raw}: names collection {frag!r} but --collection is {collection!r}")
    name = frag or collection or DEFAULT_COLLECTION
    if not _NAME_RE.match(name):
        raise ConfigError(f"{raw}: collection name {name!r} is not a Milvus name (letters, digits, '_'; "
                          "not starting with a digit)")
    if not uri.startswith(("http://", "https://")):
        if not uri.endswith(".db"):
            raise ConfigError(f"{raw}: not a Milvus locator (a *.db file or an http(s):// URI)")
        uri = os.path.abspath(os.path.expanduser(uri))
    return MilvusLocator(uri, name)


def connect(loc: MilvusLocator, timeout: float = DEFAULT_TIMEOUT_S, create: bool = False):
    """A ``MilvusClient`` for ``loc``; :class:`IndexUnavailableError` naming the URI when the
    server does not answer within ``timeout`` seconds, :class:`IndexFormatError` for a milvus-lite
    ``*.db`` that does not exist (unless ``create``; milvus-lite 3 keeps a folder there)."""
    try:
        from pymilvus import MilvusClient  # heavy optional dependency
    except ImportError:  # pragma: no cover - pinned in requirements-lock.txt
        raise ConfigError("the Milvus backend needs pymilvus (and milvus-lite for *.db files): "
                          "pip install pymilvus milvus-lite") from None
    if loc.embedded:
        if not create and not os.path.exists(loc.uri):
            raise IndexFormatError("milvus-lite data (a *.db folder) not found (build it with 'lavis-c2f index build --out "
                                   f"{os.path.basename(loc.uri)}')", path=loc.uri)
        if create:
            os.makedirs(os.path.dirname(loc.uri), exist_ok=True)
    t0 = time.monotonic()
    try:
        client = MilvusClient(uri=loc.uri, timeout=float(timeout), grpc_options=dict(_GRPC_OPTIONS))
    except Exception as e:  # noqa: BLE001 - pymilvus raises MilvusException / grpc errors / lock errors
        if loc.embedded and _locked_elsewhere(loc.uri):
            raise IndexUnavailableError(f"the milvus-lite store {loc.uri} is open in another process, which holds "
                                        f"{os.path.join(loc.uri, 'LOCK')}: close it there, or share the store between "
                                        "processes through a server (milvus-lite server --data-dir ...; docs/serve.md) "
                                        "and use its http:// URI") from None
        raise IndexUnavailableError(f"Milvus store {loc.uri} is unreachable (gave up after "
                                    f"{time.monotonic() - t0:.1f} s, timeout {timeout:g} s): "
                                    f"{type(e).__name__}: {_short(e)}") from None
    if loc.embedded:
        with _EMBEDDED_GUARD:
            _EMBEDDED_CLIENTS[loc.uri] = _EMBEDDED_CLIENTS.get(loc.uri, 0) + 1
    return client


def _locked_elsewhere(folder: str) -> bool:
    """Whether another process holds the ``LOCK`` of milvus-lite's data ``folder`` (an advisory
    ``flock`` it keeps while the store is open; this process's own server would have been reused)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Unix: milvus-lite locks another way
        return False
    path = os.path.join(folder, "LOCK")
    if not os.path.exists(path):
        return False
    with open(path, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def disconnect(loc: MilvusLocator, client) -> None:
    """Close a client of :func:`connect`. For an embedded store (a ``*.db`` folder), the last
    client of this process also stops milvus-lite's in-process server, which holds the folder's
    ``LOCK`` while it runs: another process (``lavis-c2f serve``, a second build) can then open
    the store without this one exiting."""
    try:
        client.close()
    except Exception:  # noqa: BLE001 - a gone server or a client closed before
        pass
    if not loc.embedded:
        return
    with _EMBEDDED_GUARD:
        left = _EMBEDDED_CLIENTS.get(loc.uri, 0) - 1
        if left > 0:
            _EMBEDDED_CLIENTS[loc.uri] = left
            return
        _EMBEDDED_CLIENTS.pop(loc.uri, None)
    from milvus_lite.server_manager import server_manager_instance  # the optional dependency connect() needed
    server_manager_instance.release_server(loc.uri)


def _short(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e)
    return " ".join(str(msg).split())[:300]


# =========================================================================== the index
class MilvusIndex(StageOneBase):
    """Video corpus index in a Milvus collection (module docstring). Open one with
    :meth:`open` (an existing collection) or :meth:`create` (a new or resumed build).

    Args:
        client: a connected ``MilvusClient``.
        locator: the :class:`MilvusLocator`.
        manifest: the collection's manifest (:meth:`_manifest_for`).
        model: the retriever to attach (fingerprint checked), or None.
        timeout: seconds each call to the store may take.
    """

    def __init__(self, client, locator: MilvusLocator, manifest: Mapping[str, Any], model=None,
                 timeout: float = DEFAULT_TIMEOUT_S):
        self.client, self.locator, self.manifest = client, locator, dict(manifest)
        self.timeout = float(timeout)
        self.model = None
        self.dim = int(self.manifest["dim"])
        self.max_frames = int(self.manifest["max_frames"])
        self.segments_per_video = int(self.manifest["prefilter_segments"])
        self.frame_dtype = str(self.manifest["frame_dtype"])
        self.ann = dict(self.manifest["ann"])
        self.model_info = dict(self.manifest.get("model") or {})
        self.search_params: Dict[str, Any] = dict(self.ann.get("search_params") or {})
        if model is not None:
            self.attach(model)

    @property
    def path(self) -> str:
        """The locator as text (``URI#COLLECTION``), as :attr:`CorpusIndex.path` names a folder."""
        return str(self.locator)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, locator: Any, model, ann: Optional[Mapping[str, Any]] = None, prefilter_segments: int = 3,
               frame_dtype: str = "float16", overwrite: bool = False, corpus: Optional[Mapping[str, Any]] = None,
               timeout: float = DEFAULT_TIMEOUT_S) -> "MilvusIndex":
        """A collection for ``model``'s videos: created (dropped first with ``overwrite``), or, when
        it exists with a manifest of the same model, widths and options, reopened so that a
        re-run resumes (its upserts replace rows by video id). ``ann``: ``{"kind": "flat" |
        "hnsw" | "ivf", "params": {...build params}, "search_params": {...}}`` (default flat)."""
        loc = parse_milvus_locator(locator)
        if frame_dtype not in ("float16", "float32"):
            raise ConfigError(f"frame_dtype must be float16 or float32, got {frame_dtype!r}")
        if not 1 <= int(prefilter_segments) <= 3:
            raise ConfigError(f"prefilter_segments must be 1..3 for Milvus (4 vector fields per collection), "
                              f"got {prefilter_segments}")
        want = cls._manifest_for(model, _ann_spec(ann), int(prefilter_segments), frame_dtype, corpus)
        client = connect(loc, timeout, create=True)
        try:
            return cls._created(client, loc, want, model, timeout, overwrite, corpus)
        except BaseException:
            disconnect(loc, client)
            raise

    @classmethod
    def _created(cls, client, loc: MilvusLocator, want: Dict[str, Any], model, timeout: float, overwrite: bool,
                 corpus: Optional[Mapping[str, Any]]) -> "MilvusIndex":
        """:meth:`create` on an open ``client``: the new collection, or the existing one reopened."""
        exists = _call(loc, client.has_collection, loc.collection)
        if exists and overwrite:
            for name in (loc.collection, loc.collection + MANIFEST_SUFFIX, loc.collection + BIAS_SUFFIX):
                if _call(loc, client.has_collection, name):
                    _call(loc, client.drop_collection, name)
            exists = False
        if exists:
            index = cls.open(loc, model=model, timeout=timeout, client=client)
            diff = [k for k in ("dim", "max_frames", "prefilter_segments", "frame_dtype", "ann")
                    if index.manifest.get(k) != want[k]]
            if diff:
                raise IndexMismatchError(f"{loc}: the collection exists with other build options "
                                         f"({', '.join(f'{k}={index.manifest.get(k)!r}' for k in diff)}); "
                                         "pass --overwrite to rebuild it")
            if corpus is not None:
                index.set_corpus(corpus)
            logger.info("index: resuming %s (%d videos already stored)", loc, len(index))
            return index
        _create_collection(client, loc, want)
        return cls(client, loc, want, model=model, timeout=timeout)

    @staticmethod
    def _manifest_for(model, ann: Dict[str, Any], segments: int, frame_dtype: str,
                      corpus: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "lavis_c2f_version": __version__,
                "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "model": model_info_of(model), "dim": int(model.embed_dim), "max_frames": stored_rows_per_video(model),
                "prefilter_segments": int(segments), "frame_dtype": frame_dtype, "ann": ann,
                "frame_fields": frame_fields(stored_rows_per_video(model) * int(model.embed_dim), frame_dtype),
                "corpus": dict(corpus) if corpus is not None else None}

    @classmethod
    def open(cls, locator: Any, model=None, timeout: float = DEFAULT_TIMEOUT_S, client=None) -> "MilvusIndex":
        """Open an existing collection; raises :class:`IndexFormatError` (missing collection or
        manifest, unknown format / version, a vector field whose width is not the manifest's)
        naming the field, :class:`IndexUnavailableError` for an unreachable store, and
        :class:`IndexMismatchError` when ``model`` is not the one the index was built with."""
        loc = parse_milvus_locator(locator)
        if client is not None:
            return cls._opened(client, loc, model, timeout)
        client = connect(loc, timeout)
        try:
            return cls._opened(client, loc, model, timeout)
        except BaseException:
            disconnect(loc, client)
            raise

    @classmethod
    def _opened(cls, client, loc: MilvusLocator, model, timeout: float) -> "MilvusIndex":
        """:meth:`open` on an open ``client``."""
        if not _call(loc, client.has_collection, loc.collection):
            have = [c for c in _call(loc, client.list_collections) if not c.endswith(MANIFEST_SUFFIX)]
            raise IndexFormatError(f"collection {loc.collection!r} does not exist (collections there: "
                                   f"{', '.join(have) or 'none'})", path=loc.uri)
        man = _read_manifest(client, loc)
        _check_schema(client, loc, man)
        _call(loc, client.load_collection, loc.collection)
        if man.get("video_bias"):
            if not _call(loc, client.has_collection, loc.collection + BIAS_SUFFIX):
                raise IndexFormatError(f"the manifest records Sinkhorn biases but collection "
                                       f"{loc.collection + BIAS_SUFFIX!r} is missing", path=loc.uri, field="video_bias")
            _call(loc, client.load_collection, loc.collection + BIAS_SUFFIX)
        return cls(client, loc, man, model=model, timeout=timeout)

    def _manifest_name(self) -> str:
        return f"{self.locator} (manifest)"

    def set_corpus(self, corpus: Mapping[str, Any]) -> None:
        """Record what the front ends need to search the videos (the sidecar of ``index videos``:
        backbone, ``features_dir`` of the stage-2 clip features, clip length...) in the manifest."""
        self.manifest["corpus"] = dict(corpus)
        _write_manifest(self.client, self.locator, self.manifest)

    def _ask(self, fn, *args, **kwargs):
        """One read of the store (``fn`` a client method), bounded by :attr:`timeout` seconds
        (:class:`IndexUnavailableError` naming the URI when the store does not answer). A
        collection the server no longer holds loaded (it restarted) is loaded again and the call
        retried once (the collection ``fn`` reads: its first argument), so a replica recovers from a
        store restart by itself."""
        kwargs.setdefault("timeout", self.timeout)
        try:
            return _call(self.locator, fn, *args, **kwargs)
        except IndexUnavailableError:
            raise
        except Exception as e:  # noqa: BLE001 - pymilvus' MilvusException
            if not _not_loaded(e):
                raise
        collection = args[0] if args else self.locator.collection   # every read names its collection first
        logger.warning("index: the store released %s (restarted?); loading %s again", self.locator, collection)
        _call(self.locator, self.client.load_collection, collection, timeout=self.timeout)
        return _call(self.locator, fn, *args, **kwargs)

    # ------------------------------------------------------------------ rows
    def __len__(self) -> int:
        res = self._ask(self.client.query, self.locator.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    @property
    def vids(self) -> List[str]:
        """Every stored video id (sorted)."""
        if len(self) <= MAX_TOPK:      # one query (a query's limit is bounded like a search's)
            rows = self._ask(self.client.query, self.locator.collection, filter="", output_fields=["vid"],
                         limit=MAX_TOPK)
            return sorted(str(r["vid"]) for r in rows)
        it = self._ask(self.client.query_iterator, self.locator.collection, batch_size=4096, filter="",
                   output_fields=["vid"])
        out: List[str] = []
        try:
            while True:
                batch = _call(self.locator, it.next)
                if not batch:
                    break
                out.extend(str(r["vid"]) for r in batch)
        finally:
            it.close()
        return sorted(out)

    def _get(self, vids: Sequence[str], fields: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for s in range(0, len(vids), _GET_IDS):
            chunk = list(vids[s:s + _GET_IDS])
            for r in self._ask(self.client.get, self.locator.collection, ids=chunk,
                           output_fields=["vid", *fields]):
                out[str(r["vid"])] = r
        return out

    def __contains__(self, vid: object) -> bool:
        return isinstance(vid, str) and bool(self._get([vid], []))

    def present(self, vids: Sequence[str]) -> set:
        """Which of ``vids`` are stored (one batched lookup instead of one per id)."""
        return set(self._get([str(v) for v in dict.fromkeys(vids)], []))

    def _row(self, vid: str, fields: Sequence[str]) -> Dict[str, Any]:
        got = self._get([str(vid)], fields)
        if str(vid) not in got:
            raise KeyError(f"video id {vid!r} is not in the index {self.locator}")
        return got[str(vid)]

    def duration(self, vid: str) -> Optional[float]:
        """Seconds of an indexed video (None when unknown); ``KeyError`` naming an unknown id."""
        d = float(self._row(vid, ["duration"])["duration"])
        return None if d < 0 or math.isnan(d) else d

    def source(self, vid: str) -> Optional[str]:
        """Where the video came from (None when unknown); ``KeyError`` naming an unknown id."""
        return str(self._row(vid, ["source"])["source"]) or None

    # ------------------------------------------------------------------ adding / removing
    def add_rows(self, vids: Sequence[str], frames: np.ndarray, lengths: np.ndarray, prefilter: np.ndarray,
                 durations: Optional[Sequence[Optional[float]]] = None,
                 sources: Optional[Sequence[Optional[str]]] = None) -> None:
        """Upsert videos given what the index stores of them (:func:`stored_rows`: valid frames
        back to back ``(sum lengths, D)``, ``lengths`` (V,), pre-filter vectors (V, S, D)); a video
        id already stored is replaced, so a re-run adds nothing twice."""
        vids = [str(v) for v in vids]
        n, d, f, sv = len(vids), self.dim, self.max_frames, self.segments_per_video
        frames = np.asarray(frames, np.float32)
        pre = np.asarray(prefilter, np.float32)
        lengths = np.asarray(lengths, np.int64)
        if frames.ndim != 2 or frames.shape[1] != d:
            raise IndexMismatchError(f"{self.locator}: frames are {frames.shape[1:]}-wide, the collection's field "
                                     f"'frames' holds {f} x {d}")
        if pre.shape != (n, sv, d):
            raise IndexMismatchError(f"{self.locator}: pre-filter vectors are {pre.shape}, the collection's fields "
                                     f"'pre_0'..'pre_{sv - 1}' need ({n}, {sv}, {d})")
        if len(lengths) != n or int(lengths.sum()) != len(frames) or (lengths > f).any():
            raise ValueError(f"lengths must be ({n},) <= {f} summing to the {len(frames)} frames")
        if len(set(vids)) != n:
            raise ValueError("a video id appears twice in one add")
        bad = next((v for v in vids if not v or len(v.encode()) > _MAX_VID), None)
        if bad is not None:
            raise ValueError(f"video id {bad!r} is empty or longer than {_MAX_VID} bytes")
        frames = frames.astype(self.frame_dtype)     # float16: the FAISS default's precision, same scores
        pre = pre.astype(np.float16).astype(np.float32)
        offs = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        nf = int(self.manifest["frame_fields"])
        rows = []
        for i, v in enumerate(vids):
            text = base64.b64encode(np.ascontiguousarray(frames[offs[i]:offs[i] + lengths[i]]).tobytes()).decode()
            dur = None if durations is None else durations[i]
            src = "" if sources is None or sources[i] is None else str(sources[i])[:_MAX_SOURCE]
            row = {"vid": v, "duration": -1.0 if dur is None or not dur >= 0 else float(dur), "source": src,
                   "n_frames": int(lengths[i])}
            for c in range(nf):
                row[f"frames_{c}"] = text[c * _FRAME_CHARS:(c + 1) * _FRAME_CHARS]
            for s in range(sv):
                row[f"valid_{s}"] = bool(np.abs(pre[i, s]).sum() > 0)
                row[f"pre_{s}"] = np.ascontiguousarray(pre[i, s])
            rows.append(row)
        if self.manifest.get("video_bias"):       # their stored bias was computed from other rows
            self._delete(self._bias_collection, vids)
            logger.warning("index: %d upserted videos get zero Sinkhorn bias; recompute it with compute_video_bias()",
                           n)
        for s in range(0, n, _UPSERT_ROWS):
            _call(self.locator, self.client.upsert, self.locator.collection, rows[s:s + _UPSERT_ROWS])

    def add_row_batches(self, batches: Iterable[Tuple[Sequence[str], np.ndarray, np.ndarray, np.ndarray,
                                                      Optional[Sequence[Optional[float]]]]],
                        sources: Optional[Mapping[str, Optional[str]]] = None) -> None:
        """:meth:`add_rows` of each ``(vids, frames, lengths, prefilter, durations)`` batch
        (``sources``: vid -> where the video came from)."""
        for vids, frames, lengths, pre, durs in batches:
            self.add_rows(vids, frames, lengths, pre, durs, None if sources is None else [sources.get(v) for v in vids])

    def add_features(self, vids: Sequence[str], load_features: Callable[[str], np.ndarray],
                     durations: Optional[Mapping[str, Optional[float]]] = None, batch_size: int = 64,
                     progress: bool = True, sources: Optional[Mapping[str, str]] = None) -> None:
        """Encode videos with the attached model (``vid -> (L, Dv)`` features) in batches of
        ``batch_size`` and upsert them (as :meth:`CorpusIndex.add_features`)."""
        model = self._require_model()
        vids = [str(v) for v in vids]
        it: Iterable = range(0, len(vids), batch_size)
        if progress:
            it = progress_bar(it, total=(len(vids) + batch_size - 1) // batch_size, desc="index: encode videos",
                              unit="batch", leave=True)
        for s in it:
            chunk = vids[s:s + batch_size]
            emb = encode_features(model, chunk, load_features)
            rows = stored_rows(model, emb, self.dim, self.max_frames, self.segments_per_video)
            self.add_rows(chunk, *rows, None if durations is None else [durations.get(v) for v in chunk],
                          None if sources is None else [sources.get(v) for v in chunk])

    def add(self, vids: Sequence[str], video_emb, durations: Optional[Sequence[Optional[float]]] = None,
            prefilter: Optional[np.ndarray] = None) -> None:
        """Upsert encoded videos (:class:`VideoEmbedding` of the attached model)."""
        self.add_rows(vids, *stored_rows(self.model, video_emb, self.dim, self.max_frames, self.segments_per_video,
                                         prefilter), durations)

    def remove(self, vids: Sequence[str], missing_ok: bool = False) -> int:
        """Delete videos; returns how many were removed (``KeyError`` naming the first unknown id
        unless ``missing_ok``; nothing is deleted then)."""
        vids = list(dict.fromkeys(str(v) for v in vids))
        have = set(self._get(vids, []))
        missing = [v for v in vids if v not in have]
        if missing and not missing_ok:
            raise KeyError(f"video id {missing[0]!r} is not in the index {self.locator}"
                           + (f" ({len(missing)} unknown ids)" if len(missing) > 1 else ""))
        present = [v for v in vids if v in have]
        self._delete(self.locator.collection, present)
        if self.manifest.get("video_bias"):
            self._delete(self._bias_collection, present)
        return len(present)

    def _delete(self, collection: str, vids: Sequence[str]) -> None:
        for s in range(0, len(vids), 1024):
            _call(self.locator, self.client.delete, collection, ids=list(vids[s:s + 1024]))

    # ------------------------------------------------------------------ Sinkhorn biases
    @property
    def _bias_collection(self) -> str:
        return self.locator.collection + BIAS_SUFFIX

    def set_video_bias(self, bias: np.ndarray, settings: Mapping[str, Any], vids: Optional[Sequence[str]] = None
                       ) -> None:
        """Store per-video, per-level Sinkhorn log scalings ((V, L) float32, rows in ``vids``
        order, default :attr:`vids`) with the model's :meth:`inference_settings` they were
        computed with (as :meth:`CorpusIndex.set_video_bias`; videos not listed get 0). The
        previous biases are replaced as a whole."""
        model = self._require_model()
        vids = self.vids if vids is None else [str(v) for v in vids]
        bias = video_bias_array(model, bias, len(vids))
        nl = len(model.levels)
        missing = sorted(set(vids) - self.present(vids))
        if missing:
            raise KeyError(f"video id {missing[0]!r} is not in the index {self.locator}")
        width = max(nl, 2)                          # Milvus vectors have at least 2 values
        _create_bias_collection(self.client, self.locator, width)
        padded = np.zeros((len(vids), width), np.float32)
        padded[:, :nl] = bias
        rows = [{"vid": v, "bias": padded[i]} for i, v in enumerate(vids)]
        for s in range(0, len(rows), 4096):
            _call(self.locator, self.client.upsert, self._bias_collection, rows[s:s + 4096])
        _call(self.locator, self.client.flush, self._bias_collection)
        self.manifest["video_bias"] = {"levels": list(model.levels), "settings": dict(settings)}
        _write_manifest(self.client, self.locator, self.manifest)

    def compute_video_bias(self, bank_text_emb, block_videos: int = 2048, progress: bool = False) -> np.ndarray:
        """UCoFiA's inference bias over a query bank x every stored video
        (:func:`~lavis_c2f.index.corpus_index.video_bias_of`, the FAISS backend's numbers), read
        back from the collection in blocks of ``block_videos``; stored and returned ((V, L),
        :attr:`vids` order)."""
        model = self._require_model()
        vids = self.vids
        starts = range(0, len(vids), block_videos)
        bias = video_bias_of(model, bank_text_emb, (self.embeddings(vids[s:s + block_videos]) for s in starts),
                             len(starts), progress)
        self.set_video_bias(bias, model.inference_settings(), vids)
        return bias

    def _bias_for(self, vids: Sequence[str]) -> Optional[torch.Tensor]:
        """(V, L) Sinkhorn biases of ``vids`` for the model's score (0 for a video without a
        stored row), zeros without stored biases, None when the model's Sinkhorn is off."""
        model = self.model
        if not getattr(model, "sinkhorn", False):
            return None
        nl = len(model.levels)
        out = torch.zeros(len(vids), nl)
        info = self.manifest.get("video_bias")
        if not info:
            return out
        check_bias_settings(model, info)
        got: Dict[str, Any] = {}
        for s in range(0, len(vids), _GET_IDS):
            for r in self._ask(self.client.get, self._bias_collection, ids=list(vids[s:s + _GET_IDS]),
                               output_fields=["vid", "bias"]):
                got[str(r["vid"])] = r["bias"]
        for i, v in enumerate(vids):
            if v in got:
                out[i] = torch.as_tensor(np.asarray(got[v], np.float32)[:nl])
        return out

    def flush(self) -> None:
        """Make the rows this client wrote durable (each writer of a parallel build flushes its own)."""
        _call(self.locator, self.client.flush, self.locator.collection)

    def save(self, path: Optional[str] = None) -> str:
        """Make the written rows durable (flush) and record the counts in the manifest; returns
        the locator (``path`` must be None or this locator: a collection does not move)."""
        if path is not None and str(parse_milvus_locator(path, self.locator.collection)) != str(self.locator):
            raise ConfigError(f"a Milvus index is saved where it lives ({self.locator}), not to {path}")
        self.flush()
        self.manifest["counts"] = {"videos": len(self)}
        _write_manifest(self.client, self.locator, self.manifest)
        return str(self.locator)

    # ------------------------------------------------------------------ search
    def candidates(self, text_emb, m: int) -> List[List[str]]:
        """Pre-filter: per query, at most ``m`` (<= :data:`MAX_TOPK`) video ids, best pre-filter
        score (best segment) first; ties by video id."""
        nq = len(text_emb)
        if nq == 0:
            return []
        if int(m) > MAX_TOPK:
            logger.warning("index: %d candidates asked of %s; Milvus returns at most %d per search", int(m),
                           self.locator, MAX_TOPK)
        m = min(int(m), MAX_TOPK)
        qv = self._require_model().prefilter_query(text_emb).detach().cpu().float().numpy()
        best: List[Dict[str, float]] = [{} for _ in range(nq)]
        params = {"metric_type": "IP", "params": dict(self.search_params)}
        for s in range(self.segments_per_video):
            hits = self._ask(self.client.search, self.locator.collection, data=qv.tolist(),
                         anns_field=f"pre_{s}", limit=m, filter=f"valid_{s} == true", output_fields=["vid"],
                         search_params=params)
            for q, row in enumerate(hits):
                for h in row:
                    v, sc = str(h["vid"]), float(h["distance"])
                    if sc > best[q].get(v, -math.inf):
                        best[q][v] = sc
        return [[v for v, _ in sorted(b.items(), key=lambda kv: (-kv[1], kv[0]))[:m]] for b in best]

    def _gather(self, vids: Sequence[str]) -> Dict[str, np.ndarray]:
        """vid -> its valid stored rows (F_v, D) float32; ``KeyError`` naming an unknown id."""
        fields = [f"frames_{c}" for c in range(int(self.manifest["frame_fields"]))]
        got = self._get(list(dict.fromkeys(vids)), ["n_frames", *fields])
        out = {}
        for v in vids:
            if v not in got:
                raise KeyError(f"video id {v!r} is not in the index {self.locator}")
            r = got[v]
            raw = base64.b64decode("".join(r[c] for c in fields))
            out[v] = np.frombuffer(raw, self.frame_dtype).reshape(int(r["n_frames"]), self.dim).astype(np.float32)
        return out

    def embeddings(self, vids: Sequence[str]):
        """The model's video embedding of the given ids, in that order (frames zero-padded to the
        longest, as :meth:`CorpusIndex.gather`)."""
        rows = self._gather([str(v) for v in vids])
        return self._embedding([rows[str(v)] for v in vids])

    def _embedding(self, blocks: Sequence[np.ndarray]):
        f = max([1] + [len(b) for b in blocks])
        out = torch.zeros(len(blocks), f, self.dim)
        mask = torch.zeros(len(blocks), f)
        for i, b in enumerate(blocks):
            out[i, : len(b)] = torch.from_numpy(b)
            mask[i, : len(b)] = 1.0
        return rows_embedding(self.model, out, mask)

    def rerank(self, text_emb, candidates: Sequence[Sequence[str]], k: int) -> List[List[Tuple[str, float]]]:
        """Exact scores of each query's candidates; the ``k`` best ``(vid, score)`` per query, best
        first (ties: video id)."""
        model = self._require_model()
        allv = list(dict.fromkeys(str(v) for c in candidates for v in c))
        rows = self._gather(allv)
        out = []
        for q, cand in enumerate(candidates):
            cand = [str(v) for v in cand]
            if not cand:
                out.append([])
                continue
            emb = self._embedding([rows[v] for v in cand])
            bias = self._bias_for(cand)
            scores = score_candidates(model, text_emb, q, emb, bias)
            order = sorted(range(len(cand)), key=lambda i: (-scores[i], cand[i]))[: min(int(k), len(cand))]
            out.append([(cand[i], float(scores[i])) for i in order])
        return out

    def search(self, text_emb, k: int = 10, m: Optional[int] = None,
               timings: Optional[Dict[str, float]] = None) -> List[List[Tuple[str, float]]]:
        """Top-k videos per query: the pre-filter's ``m`` candidates (default ``max(256, 4 k)``)
        re-scored exactly with the model, best first (as :meth:`CorpusIndex.search`)."""
        t0 = time.perf_counter()
        self._require_model()
        m = max(int(k), int(m if m is not None else max(256, 4 * k)))
        cands = self.candidates(text_emb, m)
        t1 = time.perf_counter()
        res = self.rerank(text_emb, cands, k)
        if timings is not None:
            timings["prefilter_s"] = timings.get("prefilter_s", 0.0) + (t1 - t0)
            timings["rerank_s"] = timings.get("rerank_s", 0.0) + (time.perf_counter() - t1)
        return res

    def search_exhaustive(self, text_emb, k: int = 10) -> List[List[Tuple[str, float]]]:
        """Exact top-k of every query against every stored video."""
        vids = self.vids
        return self.rerank(text_emb, [vids] * len(text_emb), k)

    # ------------------------------------------------------------------ info
    def info(self) -> Dict[str, Any]:
        """Counts, widths, the pre-filter index, the retriever's fingerprint, the store."""
        return {"path": str(self.locator), "backend": "milvus", "uri": self.locator.uri,
                "collection": self.locator.collection, "format": FORMAT_NAME, "version": FORMAT_VERSION,
                "videos": len(self), "dim": self.dim, "max_frames": self.max_frames,
                "frame_dtype": self.frame_dtype, "prefilter_segments": self.segments_per_video,
                "ann": {"kind": self.ann["kind"], **self.ann.get("params", {}), **self.search_params},
                "model": {k: self.model_info.get(k) for k in ("arch", "config_hash", "weights_hash")},
                "video_bias": (self.manifest.get("video_bias") or {}).get("levels")}

    def close(self) -> None:
        """Close the client (once; a second call does nothing). On an embedded milvus-lite store
        the last open index of this process releases the folder for other processes
        (:func:`disconnect`)."""
        client, self.client = self.client, None
        if client is not None:
            disconnect(self.locator, client)


# =========================================================================== helpers
def _call(loc: MilvusLocator, fn, *args, **kwargs):
    """One call to the store; a connection failure becomes :class:`IndexUnavailableError`
    naming the URI (other server answers propagate)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - classify pymilvus / grpc errors
        text = f"{type(e).__name__} {_short(e)}".lower()
        if any(w in text for w in ("unavailable", "connect", "deadline", "timeout", "timed out", "closed channel")):
            raise IndexUnavailableError(f"Milvus store {loc.uri} stopped answering"
                                        + (f" (timeout {kwargs['timeout']:g} s)" if kwargs.get("timeout") else "")
                                        + f": {_short(e)}") from None
        raise


def _not_loaded(e: BaseException) -> bool:
    """Whether a store error says the collection is not loaded (code 101: a restarted server
    holds its collections released until ``load_collection``)."""
    text = _short(e).lower()
    return getattr(e, "code", None) == 101 or "released" in text or "not loaded" in text


def frame_fields(values: int, frame_dtype: str) -> int:
    """How many ``frames_c`` VARCHAR fields hold ``values`` stored numbers of ``frame_dtype`` as base64."""
    n_bytes = int(values) * np.dtype(frame_dtype).itemsize
    return max(1, -(-(4 * -(-n_bytes // 3)) // _FRAME_CHARS))


def _ann_spec(ann: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``{"kind", "params", "search_params"}`` with the defaults of the kind filled in."""
    ann = dict(ann or {})
    unknown = set(ann) - {"kind", "params", "search_params"}
    if unknown:
        raise ConfigError(f"unknown Milvus ann key(s) {sorted(unknown)} (kind, params, search_params)")
    kind = str(ann.get("kind") or "flat")
    if kind not in ANN_KINDS:
        raise ConfigError(f"Milvus ann kind must be one of {sorted(ANN_KINDS)}, got {kind!r}")
    return {"kind": kind, "params": {**_ANN_DEFAULTS[kind], **dict(ann.get("params") or {})},
            "search_params": {**_SEARCH_DEFAULTS[kind], **dict(ann.get("search_params") or {})}}


def _create_collection(client, loc: MilvusLocator, man: Mapping[str, Any]) -> None:
    from pymilvus import DataType, MilvusClient  # heavy optional dependency
    d, sv = int(man["dim"]), int(man["prefilter_segments"])
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("vid", DataType.VARCHAR, is_primary=True, max_length=_MAX_VID)
    schema.add_field("duration", DataType.DOUBLE)
    schema.add_field("source", DataType.VARCHAR, max_length=_MAX_SOURCE)
    schema.add_field("n_frames", DataType.INT32)
    for s in range(sv):
        schema.add_field(f"valid_{s}", DataType.BOOL)
        schema.add_field(f"pre_{s}", DataType.FLOAT_VECTOR, dim=d)
    for c in range(int(man["frame_fields"])):
        schema.add_field(f"frames_{c}", DataType.VARCHAR, max_length=65535)
    ip = client.prepare_index_params()
    ann = man["ann"]
    for s in range(sv):   # build parameters only take effect nested as params={"params": {...}}
        ip.add_index(field_name=f"pre_{s}", index_type=ANN_KINDS[ann["kind"]], metric_type="IP",
                     params={"params": dict(ann["params"])})
    _call(loc, client.create_collection, loc.collection, schema=schema, index_params=ip)
    mschema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    mschema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
    mschema.add_field("value", DataType.VARCHAR, max_length=_MAX_MANIFEST)
    mschema.add_field("v", DataType.FLOAT_VECTOR, dim=2)       # Milvus needs a vector field
    mip = client.prepare_index_params()
    mip.add_index(field_name="v", index_type="FLAT", metric_type="L2")
    name = loc.collection + MANIFEST_SUFFIX
    if _call(loc, client.has_collection, name):
        _call(loc, client.drop_collection, name)
    _call(loc, client.create_collection, name, schema=mschema, index_params=mip)
    _write_manifest(client, loc, man)


def _create_bias_collection(client, loc: MilvusLocator, width: int) -> None:
    """(Re)create ``COLLECTION_c2f_bias``: ``vid`` primary key, ``bias`` FLOAT_VECTOR(width)."""
    from pymilvus import DataType, MilvusClient  # heavy optional dependency
    name = loc.collection + BIAS_SUFFIX
    if _call(loc, client.has_collection, name):
        _call(loc, client.drop_collection, name)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("vid", DataType.VARCHAR, is_primary=True, max_length=_MAX_VID)
    schema.add_field("bias", DataType.FLOAT_VECTOR, dim=int(width))
    ip = client.prepare_index_params()
    ip.add_index(field_name="bias", index_type="FLAT", metric_type="IP")
    _call(loc, client.create_collection, name, schema=schema, index_params=ip)


def _write_manifest(client, loc: MilvusLocator, man: Mapping[str, Any]) -> None:
    text = json.dumps(man, sort_keys=True, default=str)
    if len(text.encode()) > _MAX_MANIFEST:
        raise ValueError(f"the manifest of {loc} is {len(text.encode())} bytes (at most {_MAX_MANIFEST})")
    _call(loc, client.upsert, loc.collection + MANIFEST_SUFFIX, [{"key": "manifest", "value": text, "v": [0.0, 0.0]}])


def _read_manifest(client, loc: MilvusLocator) -> Dict[str, Any]:
    name = loc.collection + MANIFEST_SUFFIX
    where = f"{loc.uri}#{name}"
    if not _call(loc, client.has_collection, name):
        raise IndexFormatError(f"collection {loc.collection!r} has no lavis-c2f manifest (collection {name!r}): "
                               "not built by 'lavis-c2f index build --backend milvus'", path=loc.uri)
    _call(loc, client.load_collection, name)
    rows = _call(loc, client.get, name, ids=["manifest"], output_fields=["value"])
    if not rows:
        raise IndexFormatError("manifest row missing", path=where, field="manifest")
    try:
        man = json.loads(rows[0]["value"])
    except ValueError as e:
        raise IndexFormatError(f"corrupt manifest: {e}", path=where) from None
    if not isinstance(man, dict) or man.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"not a lavis-c2f Milvus index (format {man.get('format') if isinstance(man, dict) else None!r})",
                               path=where, field="format")
    if man.get("version") != FORMAT_VERSION:
        raise IndexFormatError(f"index format version {man.get('version')!r} is not supported (this code reads "
                               f"version {FORMAT_VERSION})", path=where, field="version")
    for key in ("dim", "max_frames", "prefilter_segments", "frame_dtype", "frame_fields", "ann", "model"):
        if key not in man:
            raise IndexFormatError("manifest lacks a field", path=where, field=key)
    return man


def _check_schema(client, loc: MilvusLocator, man: Mapping[str, Any]) -> None:
    """The collection's vector fields have the manifest's widths (names the field otherwise)."""
    desc = _call(loc, client.describe_collection, loc.collection)
    dims = {f["name"]: int(f.get("params", {}).get("dim", 0)) for f in desc.get("fields", [])}
    d, f, sv = int(man["dim"]), int(man["max_frames"]), int(man["prefilter_segments"])
    want = {f"pre_{s}": d for s in range(sv)}
    for name, w in want.items():
        if name not in dims:
            raise IndexFormatError(f"vector field missing from collection {loc.collection!r}", path=loc.uri,
                                   field=name)
        if dims[name] != w:
            raise IndexFormatError(f"collection {loc.collection!r} stores {dims[name]}-d vectors but the manifest "
                                   f"(D={d}, frames={f}) needs {w}", path=loc.uri, field=name)
    for c in range(int(man["frame_fields"])):
        if f"frames_{c}" not in dims:
            raise IndexFormatError(f"field missing from collection {loc.collection!r} (the manifest's frames of "
                                   f"{f} x {d} {man['frame_dtype']} values take {man['frame_fields']} fields)",
                                   path=loc.uri, field=f"frames_{c}")


__all__ = ["DEFAULT_COLLECTION", "FORMAT_NAME", "FORMAT_VERSION", "MAX_TOPK", "MilvusIndex", "MilvusLocator", "connect",
           "is_milvus_locator", "parse_milvus_locator"]
