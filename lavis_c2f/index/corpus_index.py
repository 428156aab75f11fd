"""Scalable stage-1 corpus index: FAISS pre-filter + exact T-MASS re-ranking.

T-MASS pools frames conditioned on the query, so exact scoring of Q queries against V
videos costs Q x V cross-attentions. :class:`CorpusIndex` keeps, per video, the encoded
frames (by reference: memory-mapped float16/float32 segment files with row offsets) and a
query-independent pooled vector in a FAISS index (:mod:`lavis_c2f.index.ann`). A search
takes the top ``m`` videos of the pre-filter and re-scores them exactly with the model
(:meth:`C2FTMassRetriever.score`), returning the top ``k``.

Pre-filter vectors. Each video is represented by ``prefilter_segments`` (S, default 3)
vectors, the normalised means of its frames in S contiguous segments
(:meth:`C2FTMassRetriever.prefilter_segment_vectors`); a video's pre-filter score is its best
segment. Query-conditioned pooling scores a video by the frames matching the query, which
a whole-video mean dilutes; on the synthetic benchmark (bench/stage1_search.py, 1e5 videos)
the exhaustive top-10 falls within the exact top-256 of the best-segment score 98.5% of
the time against 90% for the whole-video mean (which needs the top ~1024). FAISS ids are
``row * S + segment``; hits are grouped per video. A video without valid frames has no
pre-filter vector: it is stored (and scored by :meth:`CorpusIndex.search_exhaustive`) but
never a pre-filter candidate.

On-disk layout (``FORMAT_VERSION`` 1), everything listed with its sha256 and size in
``manifest.json``::

    DIR/manifest.json          format, version, model fingerprint, dims, ANN kind/params,
                               segments, optional Sinkhorn bias settings, files + checksums
    DIR/vids.json              video id of every row (row number = FAISS id)
    DIR/rows.npz               per row: segment, frame offset, frame count, duration
                               (NaN = unknown), alive (False = removed), valid pre-filter
                               vectors (bit mask)
    DIR/seg-00000.frames       (n_frames, D) raw little-endian float16/float32, valid frames of
                               each video back to back (append-only, never rewritten)
    DIR/seg-00000.prefilter    (n_rows, S, D) float16 pre-filter vectors of that segment's rows
                               (S = ``prefilter_segments`` per video, zero rows = empty)
    DIR/ann.faiss              the FAISS index
    DIR/bias.f32               optional (rows, L) per-level Sinkhorn video biases

Writes are atomic: :meth:`CorpusIndex.save` writes a temporary folder beside ``DIR`` (unchanged
segment files are hard-linked, not copied) and renames it into place. Loading checks the
format/version, every file's size, and (unless ``verify=False``) its sha256; any problem
raises :class:`IndexFormatError` naming the file. Attaching a model whose fingerprint
(config hash, weights hash) or width differs raises :class:`IndexMismatchError`.

Updates. :meth:`add` appends rows to a new segment (spilled to disk as it grows, so a build
never holds the frames in memory). :meth:`remove` marks rows dead (tombstones) and deletes
them from flat/IVF FAISS indexes; HNSW keeps them until the automatic rebuild when more than
``rebuild_fraction`` of its entries are dead. :meth:`compact` rewrites the segments without
dead rows. When the ``auto`` ANN policy would now pick another kind (e.g. the corpus grew past
``flat_max``) the FAISS index is rebuilt (IVF retrained on a sample) on the next add.

Sharding. A corpus too big for one machine is split by a stable hash of the video id
(``lavis-c2f index build --shard I/N``); each shard is an ordinary index on its own machine
or disk. :func:`search_shards` searches every shard with the same query and merges the
per-shard top-k lists: the scores are exact T-MASS scores (comparable across shards), so
the merged top-k equals what one index over the union would return from the same
candidates (with ``m`` >= each shard's size it equals exhaustive search). Per-video Sinkhorn
biases must then be computed over the whole corpus and passed to each shard
(:meth:`set_video_bias`), since Sinkhorn normalises over all videos.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.index.ann import AnnConfig, AnnIndex

logger = logging.getLogger(__name__)

FORMAT_NAME = "lavis_c2f.corpus_index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_DTYPES = {"float16": np.float16, "float32": np.float32}
_HASH_CHUNK = 8 << 20


class IndexFormatError(DataFormatError):
    """A corrupt, truncated, unknown-version or inconsistent index file (names the file)."""


class IndexMismatchError(ValueError):
    """The index was built with another model (fingerprint) or other dimensions."""


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_HASH_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass
class _Segment:
    """One append-only frames file and its prefilter rows."""

    name: str                                  # "seg-00000"
    n_rows: int
    n_frames: int
    frames: Optional[np.ndarray] = None        # (n_frames, D) memmap / array
    prefilter: Optional[np.ndarray] = None     # (n_rows, S, D) float16
    path_dir: Optional[str] = None             # folder holding the files (saved segments)
    fd: Optional[int] = None                   # read-only descriptor of the frames file (pread)
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # file -> {sha256, bytes}


class _SpillFile:
    """An append-only raw array file in a spill folder, hashed as it is written and
    memory-mapped for reading (re-mapped after appends)."""

    def __init__(self, path: str, dtype: np.dtype, row_shape: Tuple[int, ...]):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), tuple(row_shape)
        self._fh = open(path, "wb")
        self._sha = hashlib.sha256()
        self.n = 0
        self._map: Optional[np.ndarray] = None
        self._map_n = -1

    def append(self, rows: np.ndarray) -> int:
        if self._fh.closed:  # finished by a save that failed later: keep appending
            self._fh = open(self.path, "ab")
        start = self.n
        b = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        self._fh.write(b)
        self._sha.update(b)
        self.n += int(rows.shape[0])
        return start

    def view(self) -> np.ndarray:
        if self._map_n != self.n:
            if not self._fh.closed:
                self._fh.flush()
            self._map = (np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n, *self.row_shape))
                         if self.n else np.zeros((0, *self.row_shape), self.dtype))
            self._map_n = self.n
        return self._map

    def finish(self) -> str:
        """Flush, fsync and close; returns the sha256 of the content."""
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        return self._sha.hexdigest()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._fh.close()
        self._map = None


class _PendingSegment:
    """A segment being written: frames and pre-filter vectors appended to spill files (so a
    build never holds them in memory)."""

    def __init__(self, dim: int, dtype: np.dtype, work_dir: Optional[str], segments: int):
        self.dim, self.dtype, self.segments = dim, np.dtype(dtype), int(segments)
        self.tmpdir = tempfile.mkdtemp(prefix=".c2f-index-spill-", dir=work_dir)
        self.frames = _SpillFile(os.path.join(self.tmpdir, "frames.bin"), self.dtype, (dim,))
        self.prefilter = _SpillFile(os.path.join(self.tmpdir, "prefilter.bin"), np.float16, (self.segments, dim))

    @property
    def n_frames(self) -> int:
        return self.frames.n

    @property
    def n_rows(self) -> int:
        return self.prefilter.n

    def append(self, frames: np.ndarray, prefilter: np.ndarray) -> int:
        """Append (n, D) frames and (rows, S, D) pre-filter vectors; returns the frames' offset."""
        start = self.frames.append(frames)
        self.prefilter.append(prefilter)
        return start

    def frames_view(self) -> np.ndarray:
        return self.frames.view()

    def prefilter_array(self) -> np.ndarray:
        return self.prefilter.view()

    def finish(self) -> Dict[str, Tuple[str, str]]:
        """Close the spill files; returns {"frames"|"prefilter": (path, sha256)}."""
        return {"frames": (self.frames.path, self.frames.finish()),
                "prefilter": (self.prefilter.path, self.prefilter.finish())}

    def discard(self) -> None:
        self.frames.close()
        self.prefilter.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _stored_rows_per_video(model) -> int:
    """Rows of width D the index stores per video: the model's ``index_rows_per_video`` (a
    retriever whose video embedding is more than frames, e.g. UCoFiA's patch tokens) or its
    ``num_frames``."""
    return int(getattr(model, "index_rows_per_video", model.num_frames))


def _to_stored(model, video_emb):
    """The video-terms hook: a model with ``to_index_rows(video_emb)`` packs its embedding into a
    :class:`VideoEmbedding` of (V, rows, D) (a prefix of valid rows) that the index stores as
    frames, and unpacks what :meth:`CorpusIndex.gather` reads with ``from_index_rows(rows,
    mask)``; other models store their frames as they are."""
    return model.to_index_rows(video_emb) if model is not None and hasattr(model, "to_index_rows") else video_emb


class CorpusIndex:
    """Video corpus index for stage-1 search (see the module docstring).

    Args:
        dim: embedding width D (the model's ``embed_dim``).
        max_frames: frames per video (the model's ``num_frames``).
        model_info: the model's :meth:`fingerprint` plus ``config`` (stored in the manifest).
        frame_dtype: ``float16`` (default, half the disk/page-cache) or ``float32``.
        ann: :class:`AnnConfig` or a dict of its fields.
        model: the retriever used to encode queries, compute pre-filter vectors and re-rank
            (may be attached later with :meth:`attach`).
        work_dir: folder for spill files of not-yet-saved rows (default: the system temp
            dir; put it on the same filesystem as the output to make saving a rename).
        rebuild_fraction: rebuild an HNSW index once this fraction of its entries are dead.
        prefilter_segments: pre-filter vectors per video (see the module docstring).
        io_threads: threads reading candidate frames from saved segments (``pread``, one
            contiguous read per video, so a re-rank over a corpus larger than the page cache
            waits for ``m / io_threads`` disk reads instead of ``m``); 0 reads in the caller.
    """

    def __init__(self, dim: int, max_frames: int, model_info: Mapping[str, Any], frame_dtype: str = "float16",
                 ann: Optional[Any] = None, model=None, work_dir: Optional[str] = None,
                 rebuild_fraction: float = 0.3, prefilter_segments: int = 3, io_threads: int = 8):
        if frame_dtype not in _DTYPES:
            raise ValueError(f"frame_dtype must be one of {sorted(_DTYPES)}, got {frame_dtype!r}")
        if not 1 <= int(prefilter_segments) <= 8:
            raise ValueError(f"prefilter_segments must be in 1..8, got {prefilter_segments}")
        self.segments_per_video = int(prefilter_segments)
        self.io_threads = max(0, int(io_threads))
        self._pool = None
        self.dim, self.max_frames = int(dim), int(max_frames)
        self.frame_dtype = frame_dtype
        self.model_info = dict(model_info)
        self.ann_config = ann if isinstance(ann, AnnConfig) else AnnConfig.from_dict(ann)
        self.work_dir = work_dir
        self.rebuild_fraction = float(rebuild_fraction)
        self.model = None
        # rows
        self._vids: List[str] = []
        self._row_of: Dict[str, int] = {}
        self._seg = np.zeros(0, np.int32)
        self._off = np.zeros(0, np.int64)
        self._len = np.zeros(0, np.int32)
        self._dur = np.zeros(0, np.float64)
        self._alive = np.zeros(0, bool)
        self._segmask = np.zeros(0, np.uint8)
        self._n = 0
        self._segments: List[_Segment] = []
        self._pending: Optional[_PendingSegment] = None
        self._ann: Optional[AnnIndex] = None
        self._ann_dead = 0
        self._bias: Optional[np.ndarray] = None
        self._bias_info: Optional[Dict[str, Any]] = None
        self.path: Optional[str] = None
        if model is not None:
            self.attach(model)

    # ================================================================== construction
    @classmethod
    def for_model(cls, model, **kwargs: Any) -> "CorpusIndex":
        """An empty index matching ``model`` (a :class:`C2FTMassRetriever`, or any retriever with
        the video-terms hook, see :func:`_stored_rows_per_video`)."""
        info = dict(model.fingerprint())
        info["config"] = dict(model.hparams)
        return cls(int(model.embed_dim), _stored_rows_per_video(model), info, model=model, **kwargs)

    @classmethod
    def build(cls, model, vids: Sequence[str], load_features: Callable[[str], np.ndarray],
              durations: Optional[Mapping[str, float]] = None, batch_size: int = 64, progress: bool = True,
              **kwargs: Any) -> "CorpusIndex":
        """Encode every video with ``model`` and index it.

        Args:
            vids: video ids, in index order.
            load_features: ``vid -> (L, Dv)`` float features (per-clip, no TEF).
            durations: optional ``vid -> seconds``.
            batch_size: videos encoded per model call.
            kwargs: :class:`CorpusIndex` constructor arguments (``ann``, ``frame_dtype``...).
        """
        index = cls.for_model(model, **kwargs)
        index.add_features(vids, load_features, durations, batch_size=batch_size, progress=progress)
        return index

    def attach(self, model) -> "CorpusIndex":
        """Use ``model`` for queries and re-ranking; its fingerprint and width must match."""
        fp = model.fingerprint()
        where = f"{os.path.join(self.path, MANIFEST) if self.path else 'index'}"
        for key in ("config_hash", "weights_hash"):
            if fp.get(key) != self.model_info.get(key):
                raise IndexMismatchError(
                    f"{where}: model.{key} is {self.model_info.get(key)!r} but the given model has {fp.get(key)!r}: "
                    "the index was built with another model configuration or checkpoint; rebuild it")
        if int(model.embed_dim) != self.dim or _stored_rows_per_video(model) != self.max_frames:
            raise IndexMismatchError(f"{where}: index dims (D={self.dim}, frames={self.max_frames}) differ from the "
                                     f"model's (D={model.embed_dim}, frames={_stored_rows_per_video(model)})")
        if getattr(model, "inference_noise", "shared") == "per_pair":
            # candidate re-ranking needs a pair's score to be independent of the candidate set
            logger.warning("the corpus index scores with inference_noise 'shared' (the model was configured with "
                           "'per_pair', which is for whole-matrix evaluation)")
            model.configure_inference(inference_noise="shared")
        self.model = model
        return self

    def _require_model(self):
        if self.model is None:
            raise RuntimeError("no model attached to the index: pass model= to load() or call attach(model)")
        return self.model

    # ================================================================== properties
    def __len__(self) -> int:
        return int(self._alive[: self._n].sum())

    @property
    def num_rows(self) -> int:
        return self._n

    @property
    def vids(self) -> List[str]:
        """Alive video ids in row order."""
        return [self._vids[i] for i in np.flatnonzero(self._alive[: self._n])]

    def __contains__(self, vid: object) -> bool:
        return vid in self._row_of

    def duration(self, vid: str) -> Optional[float]:
        d = float(self._dur[self._row_of[vid]])
        return None if math.isnan(d) else d

    @property
    def ann_kind(self) -> Optional[str]:
        return None if self._ann is None else self._ann.kind

    # ================================================================== adding
    def _grow(self, n_new: int) -> None:
        need = self._n + n_new
        if need <= len(self._seg):
            return
        cap = max(need, int(len(self._seg) * 1.5) + 1024)

        def grow(a, fill):
            out = np.full(cap, fill, dtype=a.dtype)
            out[: self._n] = a[: self._n]
            return out

        self._seg, self._off, self._len = grow(self._seg, -1), grow(self._off, 0), grow(self._len, 0)
        self._dur, self._alive = grow(self._dur, np.nan), grow(self._alive, False)
        self._segmask = grow(self._segmask, 0)

    def add(self, vids: Sequence[str], video_emb, durations: Optional[Sequence[Optional[float]]] = None,
            prefilter: Optional[np.ndarray] = None, replace: bool = False, update_ann: bool = True) -> None:
        """Append encoded videos.

        Args:
            vids: (V,) ids; an id already in the index raises unless ``replace`` (then the old
                row is removed first).
            video_emb: :class:`VideoEmbedding` (V, F, D) from the attached model.
            durations: optional (V,) seconds (None = unknown).
            prefilter: (V, S, D) pre-filter vectors, zero rows for empty segments (default:
                ``model.prefilter_segment_vectors(video_emb, S)``); (V, D) when S == 1.
            update_ann: add to the FAISS index now (``False`` during a bulk build, which
                builds it once at the end).
        """
        vids = [str(v) for v in vids]
        n = len(vids)
        if len(video_emb) != n:
            raise ValueError(f"{n} vids but {len(video_emb)} embedded videos")
        model_emb, video_emb = video_emb, _to_stored(self.model, video_emb)
        if video_emb.dim != self.dim:
            raise IndexMismatchError(f"embeddings are {video_emb.dim}-d but the index is {self.dim}-d")
        if video_emb.frames.shape[1] > self.max_frames:
            raise IndexMismatchError(f"embeddings have {video_emb.frames.shape[1]} frames, index max {self.max_frames}")
        seen = set()
        for v in vids:
            if v in seen:
                raise ValueError(f"video id {v!r} appears twice in one add()")
            seen.add(v)
        dup = [v for v in vids if v in self._row_of]
        if dup:
            if not replace:
                raise ValueError(f"{len(dup)} video id(s) already indexed (e.g. {dup[0]!r}); remove them or pass "
                                 "replace=True")
            self.remove(dup)
        if durations is not None and len(durations) != n:
            raise ValueError(f"{n} vids but {len(durations)} durations")
        if n == 0:
            return
        sv = self.segments_per_video
        if prefilter is None:
            prefilter, _ = self._require_model().prefilter_segment_vectors(model_emb, sv)
        pre = prefilter.detach().cpu().float().numpy() if torch.is_tensor(prefilter) else np.asarray(prefilter, np.float32)
        if pre.ndim == 2 and sv == 1:
            pre = pre[:, None, :]
        if pre.shape != (n, sv, self.dim):
            raise ValueError(f"prefilter must be ({n}, {sv}, {self.dim}), got {pre.shape}")
        segmask = ((np.abs(pre).sum(-1) > 0) * (1 << np.arange(sv))).sum(-1).astype(np.uint8)
        lengths = video_emb.lengths.cpu().numpy().astype(np.int32)
        mask = video_emb.mask.detach().cpu() > 0
        if not torch.equal(mask, torch.arange(mask.shape[1])[None, :] < torch.from_numpy(lengths)[:, None].long()):
            raise ValueError("video_emb.mask must mark a prefix of valid frames per video (as the encoders do)")
        frames = video_emb.frames.detach().cpu().float()[mask].numpy()   # valid frames, row-major = per video
        if self._pending is None:
            self._pending = _PendingSegment(self.dim, _DTYPES[self.frame_dtype], self.work_dir, sv)
        start = self._pending.append(frames, pre)
        offs = start + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._grow(n)
        rows = np.arange(self._n, self._n + n, dtype=np.int64)
        self._seg[rows] = len(self._segments)            # the pending segment's future number
        self._off[rows], self._len[rows] = offs, lengths
        self._dur[rows] = [np.nan if d is None else float(d) for d in (durations if durations is not None
                                                                        else [None] * n)]
        self._alive[rows] = True
        self._segmask[rows] = segmask
        for r, v in zip(rows.tolist(), vids):
            self._vids.append(v)
            self._row_of[v] = r
        self._n += n
        if self._bias is not None:
            self._bias = np.concatenate([self._bias, np.zeros((n, self._bias.shape[1]), np.float32)])
            logger.warning("added videos get zero Sinkhorn bias; recompute it with compute_video_bias()")
        if update_ann:
            self._extend_ann(rows)

    def _extend_ann(self, rows: np.ndarray) -> None:
        """Add ``rows`` to the FAISS index, or rebuild it when the size policy now wants
        another kind (e.g. flat -> IVF) or there is none yet."""
        want = self.ann_config.choose_kind(self._num_vectors())
        if self._ann is None or (self.ann_config.kind == "auto" and want != self._ann.kind):
            self.rebuild_ann()
        else:
            for s in range(0, len(rows), 65536):
                vec, ids = self._ann_vectors(rows[s:s + 65536])
                self._ann.add(vec, ids)

    def _num_vectors(self, rows: Optional[np.ndarray] = None) -> int:
        """Valid pre-filter vectors of ``rows`` (default: every alive row)."""
        if rows is None:
            rows = np.flatnonzero(self._alive[: self._n])
        bits = np.unpackbits(self._segmask[rows][:, None], axis=1, bitorder="little")
        return int(bits.sum())

    def _ann_vectors(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(vectors (n, D) float32, FAISS ids row * S + segment) of the valid segments of ``rows``."""
        sv = self.segments_per_video
        rows = np.asarray(rows, np.int64)
        pre = self._prefilter_rows(rows)                                      # (R, S, D)
        valid = (self._segmask[rows][:, None] >> np.arange(sv)[None, :]) & 1  # (R, S)
        r_i, s_i = np.nonzero(valid)
        return pre[r_i, s_i], rows[r_i] * sv + s_i

    def add_features(self, vids: Sequence[str], load_features: Callable[[str], np.ndarray],
                     durations: Optional[Mapping[str, float]] = None, batch_size: int = 64,
                     progress: bool = True) -> None:
        """Encode and add videos given a feature loader (``vid -> (L, Dv)``); the FAISS index is
        (re)built or extended once at the end."""
        model = self._require_model()
        vids = [str(v) for v in vids]
        first_new = self._n
        it: Iterable = range(0, len(vids), batch_size)
        if progress:
            from lavis_c2f.common.progress import progress_bar

            it = progress_bar(it, total=(len(vids) + batch_size - 1) // batch_size, desc="index: encode videos",
                              unit="batch", leave=True)
        was_training = model.training
        model.eval()
        try:
            for s in it:
                chunk = vids[s:s + batch_size]
                feats = [np.asarray(load_features(v), dtype=np.float32) for v in chunk]
                for v, f in zip(chunk, feats):
                    if f.ndim != 2:
                        raise DataFormatError(f"features must be (clips, dim), got shape {f.shape}", field=v)
                lmax = max(1, max(f.shape[0] for f in feats))
                x = np.zeros((len(chunk), lmax, feats[0].shape[1]), np.float32)
                m = np.zeros((len(chunk), lmax), np.float32)
                for i, f in enumerate(feats):
                    x[i, : f.shape[0]] = f
                    m[i, : f.shape[0]] = 1.0
                with torch.no_grad():
                    emb = model.encode_video(torch.from_numpy(x), torch.from_numpy(m))
                durs = None if durations is None else [durations.get(v) for v in chunk]
                self.add(chunk, emb, durs, update_ann=False)
        finally:
            model.train(was_training)
        if self._n > first_new:
            self._extend_ann(np.arange(first_new, self._n, dtype=np.int64))

    # ================================================================== removal / maintenance
    def remove(self, vids: Sequence[str], missing_ok: bool = False) -> int:
        """Mark videos removed; returns how many were removed."""
        rows = []
        for v in vids:
            r = self._row_of.get(str(v))
            if r is None:
                if not missing_ok:
                    raise KeyError(f"video id {v!r} is not in the index")
                continue
            rows.append(r)
        if not rows:
            return 0
        rows_a = np.asarray(sorted(set(rows)), np.int64)
        self._alive[rows_a] = False
        for r in rows_a.tolist():
            del self._row_of[self._vids[r]]
        if self._ann is not None:
            _, ids = self._ann_vectors(rows_a)
            removed = self._ann.remove(ids)
            self._ann_dead += len(ids) - removed
            if self._ann.ntotal and self._ann_dead / self._ann.ntotal > self.rebuild_fraction:
                logger.info("index: %d of %d FAISS entries are tombstones; rebuilding", self._ann_dead,
                            self._ann.ntotal)
                self.rebuild_ann()
        return len(rows_a)

    def rebuild_ann(self, config: Optional[AnnConfig] = None) -> None:
        """(Re)build the FAISS index from the alive rows (kind re-chosen by the size policy)."""
        if config is not None:
            self.ann_config = config
        rows = np.flatnonzero(self._alive[: self._n]).astype(np.int64)
        cfg = self.ann_config
        n_vec = self._num_vectors(rows)
        train = None
        if cfg.choose_kind(n_vec) == "ivf":
            # training sample: random rows until enough vectors (chunked, never all at once)
            n_train = min(n_vec, int(cfg.ivf_train_per_list) * cfg.nlist_for(n_vec))
            rng = np.random.default_rng(cfg.seed)
            pick = rows[np.sort(rng.permutation(len(rows))[: int(math.ceil(n_train / max(1, n_vec / len(rows))))])]
            train, _ = self._ann_vectors(pick)
            train = train[:n_train]
        self._ann = AnnIndex.create(cfg, n_vec, self.dim, train)
        for s in range(0, len(rows), 65536):
            vec, ids = self._ann_vectors(rows[s:s + 65536])
            self._ann.add(vec, ids)
        self._ann_dead = 0
        logger.info("index: built a %s pre-filter over %d videos (%d vectors) %s", self._ann.kind, len(rows), n_vec,
                    self._ann.params)

    def compact(self, work_dir: Optional[str] = None) -> None:
        """Rewrite all frames of alive rows into one new segment (drops removed rows' bytes and
        renumbers rows); the FAISS index is rebuilt. Save afterwards to persist."""
        alive = np.flatnonzero(self._alive[: self._n])
        new = _PendingSegment(self.dim, _DTYPES[self.frame_dtype], work_dir or self.work_dir, self.segments_per_video)
        offs = np.zeros(len(alive), np.int64)
        step = 4096
        for s in range(0, len(alive), step):
            rows = alive[s:s + step]
            blocks = [self._frames_of(int(r)) for r in rows]
            start = new.append(np.concatenate(blocks) if blocks else np.zeros((0, self.dim)),
                               self._prefilter_rows(rows))
            lens = self._len[rows].astype(np.int64)
            offs[s:s + len(rows)] = start + np.concatenate([[0], np.cumsum(lens)[:-1]])
        vids = [self._vids[r] for r in alive]
        lens, durs, segmask = self._len[alive].copy(), self._dur[alive].copy(), self._segmask[alive].copy()
        bias = None if self._bias is None else self._bias[alive].copy()
        if self._pending is not None:
            self._pending.discard()
        self._close_fds()
        self._segments, self._pending = [], new
        n = len(alive)
        self._vids, self._row_of = vids, {v: i for i, v in enumerate(vids)}
        self._seg, self._off, self._len = np.zeros(n, np.int32), offs, lens
        self._dur, self._alive, self._n, self._bias = durs, np.ones(n, bool), n, bias
        self._segmask = segmask
        self.rebuild_ann()

    # ================================================================== storage access
    def _segment_arrays(self, s: int) -> Tuple[np.ndarray, np.ndarray]:
        if s < len(self._segments):
            seg = self._segments[s]
            return seg.frames, seg.prefilter
        if s == len(self._segments) and self._pending is not None:
            return self._pending.frames_view(), self._pending.prefilter_array()
        raise IndexError(f"segment {s} does not exist")

    def _seg_row_base(self, s: int) -> int:
        return sum(seg.n_rows for seg in self._segments[:s])

    def _prefilter_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.zeros((len(rows), self.segments_per_video, self.dim), np.float32)
        if not len(rows):
            return out
        segs = self._seg[rows]
        for s in np.unique(segs):
            sel = np.flatnonzero(segs == s)
            _, pre = self._segment_arrays(int(s))
            out[sel] = pre[rows[sel] - self._seg_row_base(int(s))]
        return out

    def _frames_of(self, row: int) -> np.ndarray:
        frames, _ = self._segment_arrays(int(self._seg[row]))
        o, n = int(self._off[row]), int(self._len[row])
        return np.asarray(frames[o:o + n], dtype=np.float32)

    def gather(self, rows: Sequence[int]):
        """:class:`VideoEmbedding` of the given rows (in that order), read from the segments."""
        from lavis_c2f.models.retriever.embeddings import VideoEmbedding

        rows = np.asarray(rows, np.int64)
        m = len(rows)
        lens = self._len[rows].astype(np.int64)
        f = int(max(1, lens.max())) if m else 1
        valid = np.arange(f)[None, :] < lens[:, None]                          # (m, f)
        mask = valid.astype(np.float32)
        out = torch.zeros(m, f, self.dim, dtype=torch.float32)
        padded_by_take = False
        if m and lens.sum():
            # one row index per output slot (padding reads the video's first row and is zeroed),
            # one take per segment in file order, then a single conversion to float32
            src = self._off[rows][:, None] + np.minimum(np.arange(f)[None, :], np.maximum(lens - 1, 0)[:, None])
            segs = self._seg[rows]
            for s in np.unique(segs[lens > 0]):
                sel = np.flatnonzero((segs == s) & (lens > 0))                  # empty videos read nothing
                if s < len(self._segments) and self._segments[int(s)].fd is not None:
                    buf = self._pread_videos(self._segments[int(s)].fd, self._off[rows[sel]], lens[sel], f)
                    if len(sel) == m:                      # every row from this segment: one conversion pass
                        out = torch.from_numpy(buf).to(torch.float32)
                    else:
                        out[torch.from_numpy(sel)] = torch.from_numpy(buf).to(torch.float32)
                    continue                               # pread leaves padding slots at zero
                padded_by_take = True
                frames, _ = self._segment_arrays(int(s))
                idx = src[sel].reshape(-1)
                order = np.argsort(idx, kind="stable")
                vals = np.empty((len(idx), self.dim), dtype=frames.dtype)
                vals[order] = np.take(frames, idx[order], axis=0)
                out[torch.from_numpy(sel)] = torch.from_numpy(vals).view(len(sel), f, self.dim).to(torch.float32)
            if padded_by_take:
                out.mul_(torch.from_numpy(mask).unsqueeze(-1))
        mask_t = torch.from_numpy(mask)
        if self.model is not None and hasattr(self.model, "from_index_rows"):
            return self.model.from_index_rows(out, mask_t)
        from lavis_c2f.models.retriever.modules import l2norm, masked_mean

        pooled = l2norm(masked_mean(l2norm(out), mask_t, dim=1))
        return VideoEmbedding(out, mask_t, pooled)

    def _pread_videos(self, fd: int, offsets: np.ndarray, lengths: np.ndarray, f: int) -> np.ndarray:
        """(n, f, D) stored-dtype frames of n videos (``lengths`` valid rows from frame
        ``offsets``), one ``pread`` per video straight into a padded buffer, spread over
        ``io_threads`` threads (the GIL is released during the reads)."""
        dt = np.dtype(_DTYPES[self.frame_dtype])
        row_bytes = self.dim * dt.itemsize
        n = len(offsets)
        buf = np.zeros((n, f, self.dim), dt)
        flat = memoryview(buf.reshape(-1).view(np.uint8))
        order = np.argsort(offsets, kind="stable")          # ascending file offsets per worker

        def read(idx: np.ndarray) -> None:
            for i in idx.tolist():
                nbytes = int(lengths[i]) * row_bytes
                start = i * f * row_bytes
                got = os.preadv(fd, [flat[start:start + nbytes]], int(offsets[i]) * row_bytes)
                if got != nbytes:
                    raise IndexFormatError(f"short read ({got} of {nbytes} bytes) at frame {int(offsets[i])}",
                                           path=self.path)

        workers = min(self.io_threads, max(1, n // 16))
        if workers <= 1:
            read(order)
        else:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=self.io_threads, thread_name_prefix="c2f-index-io")
            list(self._pool.map(read, np.array_split(order, workers)))
        return buf

    def embeddings(self, vids: Sequence[str]):
        """:class:`VideoEmbedding` of the given video ids."""
        rows = [self._row_of[str(v)] for v in vids]
        return self.gather(rows)

    # ================================================================== Sinkhorn biases
    def set_video_bias(self, bias: np.ndarray, settings: Mapping[str, Any], vids: Optional[Sequence[str]] = None
                       ) -> None:
        """Store per-video, per-level Sinkhorn log scalings ((V, L), rows in ``vids`` order,
        default: :attr:`vids`) together with the model's :meth:`inference_settings` they were
        computed with. Rows not listed get 0."""
        model = self._require_model()
        vids = self.vids if vids is None else [str(v) for v in vids]
        bias = np.asarray(bias, np.float32)
        nl = len(model.levels)
        if bias.shape != (len(vids), nl):
            raise ValueError(f"bias must be ({len(vids)}, {nl}), got {bias.shape}")
        full = np.zeros((self._n, nl), np.float32)
        full[[self._row_of[v] for v in vids]] = bias
        self._bias = full
        self._bias_info = {"levels": list(model.levels), "settings": dict(settings)}

    def compute_video_bias(self, bank_text_emb, block_videos: int = 8192, progress: bool = False) -> np.ndarray:
        """UCoFiA's inference bias: Sinkhorn over a query bank (e.g. training queries) x every
        alive video, per level; stored in the index and returned ((alive V, L), row order).
        Memory: bank size x V x 4 bytes per level."""
        from lavis_c2f.models.retriever.modules import sinkhorn_video_bias

        model = self._require_model()
        rows = np.flatnonzero(self._alive[: self._n])
        raw = {lv: [] for lv in model.levels}
        it: Iterable = range(0, len(rows), block_videos)
        if progress:
            from lavis_c2f.common.progress import progress_bar

            it = progress_bar(it, desc="index: bank scores", unit="block", leave=True)
        for s in it:
            emb = self.gather(rows[s:s + block_videos])
            _, lv = model.score(bank_text_emb, emb, return_levels=True)
            for k in raw:
                raw[k].append(lv[k].cpu())
        if hasattr(model, "video_bias_from_levels"):      # the model's own SK-norm (UCoFiA)
            bias = model.video_bias_from_levels({k: torch.cat(v, 1) for k, v in raw.items()}).cpu().numpy()
        else:
            cols = [sinkhorn_video_bias(torch.cat(raw[k], 1), model.sinkhorn_temperature, model.sinkhorn_iters)
                    for k in model.levels]
            bias = torch.stack(cols, 1).numpy()
        bias = bias.astype(np.float32)
        self.set_video_bias(bias, model.inference_settings(), [self._vids[r] for r in rows])
        return bias

    def _bias_for(self, rows: np.ndarray) -> Optional[torch.Tensor]:
        """Per-level Sinkhorn biases of ``rows`` for the model's score, or None when Sinkhorn is
        off. Without stored biases the index uses zeros: a per-query candidate subset cannot be
        Sinkhorn-normalised (see C2FTMassRetriever), and every search path must score alike."""
        model = self.model
        if not model.sinkhorn:
            return None
        if self._bias is None:
            return torch.zeros(len(rows), len(model.levels))
        info = self._bias_info or {}
        cur = model.inference_settings()
        keys = ("sinkhorn_temperature", "sinkhorn_iters", "inference_mode", "num_trials", "trial_include_mean",
                "eval_seed")
        diff = [k for k in keys if info.get("settings", {}).get(k) != cur.get(k)]
        if diff or info.get("levels") != list(model.levels):
            raise IndexMismatchError(f"the stored Sinkhorn video biases were computed with other settings "
                                     f"({', '.join(diff) or 'levels'}); recompute them with compute_video_bias()")
        return torch.from_numpy(self._bias[rows])

    # ================================================================== search
    def _query_embedding(self, text_emb):
        return text_emb

    def search(self, text_emb, k: int = 10, m: Optional[int] = None, nprobe: Optional[int] = None,
               timings: Optional[Dict[str, float]] = None) -> List[List[Tuple[str, float]]]:
        """Top-k videos per query: FAISS pre-filter of ``m`` candidates (default
        ``max(256, 4 k)``), exact re-scoring with the model, best first.

        Args:
            text_emb: :class:`TextEmbedding` (Q queries) from the attached model.
            k: results per query.
            m: candidates re-ranked per query (``m >= len(index)`` re-ranks everything).
            nprobe: override the IVF ``nprobe`` for this call.
            timings: if given, ``prefilter_s`` and ``rerank_s`` (seconds) are added to it.
        Returns:
            Q lists of ``(vid, score)``.
        """
        t0 = time.perf_counter()
        model = self._require_model()
        if self._ann is None and self._n:
            self.rebuild_ann()
        nq = len(text_emb)
        if nq == 0 or len(self) == 0:
            return [[] for _ in range(nq)]
        m = max(int(k), int(m if m is not None else max(256, 4 * k)))
        qv = model.prefilter_query(text_emb).cpu().numpy()
        if nprobe is not None:
            old = self._ann.params.get("nprobe")
            self._ann.set_search_params(nprobe=nprobe)
        sv = self.segments_per_video
        try:
            fetch = min(self._ann.ntotal, m * sv + self._ann_dead)
            _, ids = self._ann.search(qv, fetch)
        finally:
            if nprobe is not None and old is not None:
                self._ann.set_search_params(nprobe=old)
        t1 = time.perf_counter()
        results = []
        for q in range(nq):
            hits = ids[q]
            rows = hits[hits >= 0] // sv                       # best segment first, per video
            _, first = np.unique(rows, return_index=True)
            cand = rows[np.sort(first)]
            cand = cand[self._alive[cand]][:m]
            results.append(self._rerank(text_emb[q], cand, k))
        if timings is not None:
            timings["prefilter_s"] = timings.get("prefilter_s", 0.0) + (t1 - t0)
            timings["rerank_s"] = timings.get("rerank_s", 0.0) + (time.perf_counter() - t1)
        return results

    def _rerank(self, text_one, rows: np.ndarray, k: int) -> List[Tuple[str, float]]:
        if len(rows) == 0:
            return []
        emb = self.gather(rows)
        scores = self.model.score(text_one, emb, video_bias=self._bias_for(rows))[0].cpu()
        return self._topk(rows, scores, k)

    def _topk(self, rows: np.ndarray, scores: torch.Tensor, k: int) -> List[Tuple[str, float]]:
        kk = min(k, len(rows))
        order = np.lexsort((rows, -scores.double().numpy()))[:kk]   # score desc, then row asc
        return [(self._vids[int(rows[i])], float(scores[i])) for i in order]

    def search_exhaustive(self, text_emb, k: int = 10, block_videos: int = 4096) -> List[List[Tuple[str, float]]]:
        """Exact top-k of every query against every alive video (the re-ranking baseline)."""
        model = self._require_model()
        nq = len(text_emb)
        rows_all = np.flatnonzero(self._alive[: self._n]).astype(np.int64)
        best_s = [np.zeros(0) for _ in range(nq)]
        best_r = [np.zeros(0, np.int64) for _ in range(nq)]
        for s in range(0, len(rows_all), block_videos):
            rows = rows_all[s:s + block_videos]
            emb = self.gather(rows)
            sc = model.score(text_emb, emb, video_bias=self._bias_for(rows)).cpu().double().numpy()
            for q in range(nq):
                cs = np.concatenate([best_s[q], sc[q]])
                cr = np.concatenate([best_r[q], rows])
                keep = np.lexsort((cr, -cs))[:k]
                best_s[q], best_r[q] = cs[keep], cr[keep]
        return [[(self._vids[int(r)], float(s)) for r, s in zip(best_r[q], best_s[q])] for q in range(nq)]

    # ================================================================== persistence
    def _manifest(self, files: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
        import lavis_c2f

        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "lavis_c2f_version": getattr(lavis_c2f, "__version__", "unknown"),
            "model": self.model_info, "dim": self.dim, "max_frames": self.max_frames,
            "frame_dtype": self.frame_dtype, "prefilter_segments": self.segments_per_video,
            "counts": {"rows": self._n, "alive": len(self)},
            "ann": {"kind": self._ann.kind if self._ann else None, "params": self._ann.params if self._ann else {},
                    "config": self.ann_config.to_dict(), "dead_entries": self._ann_dead},
            "segments": [{"name": s.name, "rows": s.n_rows, "frames": s.n_frames} for s in self._segments],
            "video_bias": self._bias_info,
            "files": files,
        }

    def save(self, path: str) -> str:
        """Write the index to folder ``path`` atomically (temp folder + rename); returns it.
        Saving onto the folder it was loaded from is supported."""
        if self._ann is None and self._n:
            self.rebuild_ann()
        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        try:
            files: Dict[str, Dict[str, Any]] = {}
            # existing segments: hard-link (immutable files), checksums from their manifest
            for seg in self._segments:
                for fname, meta in seg.files.items():
                    _link_or_copy(os.path.join(seg.path_dir, fname), os.path.join(tmp, fname))
                    files[fname] = dict(meta)
            new_seg = None
            if self._pending is not None and self._pending.n_rows:
                name = f"seg-{len(self._segments):05d}"
                done = self._pending.finish()
                fr_name, pf_name = f"{name}.frames", f"{name}.prefilter"
                for key, fname in (("frames", fr_name), ("prefilter", pf_name)):
                    src, sha = done[key]
                    _link_or_copy(src, os.path.join(tmp, fname))
                    files[fname] = {"sha256": sha, "bytes": os.path.getsize(src)}
                new_seg = _Segment(name, self._pending.n_rows, self._pending.n_frames,
                                   files={fr_name: files[fr_name], pf_name: files[pf_name]})
            # row table, ids, ANN, bias
            with open(os.path.join(tmp, "vids.json"), "w", encoding="utf-8") as fh:
                json.dump(self._vids, fh)
            n = self._n
            with open(os.path.join(tmp, "rows.npz"), "wb") as fh:
                np.savez(fh, seg=self._seg[:n], off=self._off[:n], length=self._len[:n], duration=self._dur[:n],
                         alive=self._alive[:n], segmask=self._segmask[:n])
            if self._ann is not None:
                self._ann.write(os.path.join(tmp, "ann.faiss"))
            if self._bias is not None:
                with open(os.path.join(tmp, "bias.f32"), "wb") as fh:
                    fh.write(np.ascontiguousarray(self._bias, np.float32).tobytes())
            for fname in ("vids.json", "rows.npz", "ann.faiss", "bias.f32"):
                p = os.path.join(tmp, fname)
                if os.path.exists(p):
                    _fsync_file(p)
                    files[fname] = {"sha256": _sha256_file(p), "bytes": os.path.getsize(p)}
            segs_after = list(self._segments) + ([new_seg] if new_seg is not None else [])
            segs_before = self._segments
            self._segments = segs_after
            try:
                manifest = self._manifest(files)
            finally:
                self._segments = segs_before
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
                json.dump(manifest, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            # swap into place
            if os.path.exists(path):
                old = tmp + ".old"
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # the index now lives in ``path``: reopen segments from there
        if self._pending is not None:
            self._pending.discard()
            self._pending = None
        self._segments = segs_after
        for seg in self._segments:
            seg.path_dir = path
        self._open_segments(path)
        self.path = path
        return path

    def _open_segments(self, path: str) -> None:
        dt = _DTYPES[self.frame_dtype]
        self._close_fds()
        for seg in self._segments:
            fr = os.path.join(path, f"{seg.name}.frames")
            pf = os.path.join(path, f"{seg.name}.prefilter")
            seg.frames = (np.memmap(fr, dtype=dt, mode="r", shape=(seg.n_frames, self.dim))
                          if seg.n_frames else np.zeros((0, self.dim), dt))
            seg.fd = os.open(fr, os.O_RDONLY) if seg.n_frames else None
            sv = self.segments_per_video
            seg.prefilter = (np.memmap(pf, dtype=np.float16, mode="r", shape=(seg.n_rows, sv, self.dim))
                             if seg.n_rows else np.zeros((0, sv, self.dim), np.float16))
            seg.path_dir = path

    @classmethod
    def load(cls, path: str, model=None, verify: bool = True, work_dir: Optional[str] = None) -> "CorpusIndex":
        """Open a saved index (memory-maps the frames; reads the FAISS index into memory).

        Args:
            model: retriever to attach (fingerprint checked); None for inspection only.
            verify: check every file's sha256 (sizes are always checked).
        Raises:
            IndexFormatError naming the file for missing, truncated, corrupt or
            unknown-version files; IndexMismatchError for another model.
        """
        path = os.path.abspath(path)
        man_path = os.path.join(path, MANIFEST)
        if not os.path.isdir(path):
            raise IndexFormatError("index folder not found", path=path)
        if not os.path.isfile(man_path):
            raise IndexFormatError("manifest missing: not a lavis-c2f corpus index", path=man_path)
        try:
            with open(man_path, "r", encoding="utf-8") as fh:
                man = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IndexFormatError(f"corrupt manifest: {e}", path=man_path) from None
        if not isinstance(man, dict) or man.get("format") != FORMAT_NAME:
            raise IndexFormatError(f"not a lavis-c2f corpus index (format {man.get('format') if isinstance(man, dict) else None!r})",
                                   path=man_path, field="format")
        ver = man.get("version")
        if ver != FORMAT_VERSION:
            raise IndexFormatError(f"index format version {ver!r} is not supported (this code reads version "
                                   f"{FORMAT_VERSION})", path=man_path, field="version")
        try:
            files = dict(man["files"])
            dim, max_frames, dtype = int(man["dim"]), int(man["max_frames"]), str(man["frame_dtype"])
            n_segv = int(man["prefilter_segments"])
            seg_meta = list(man["segments"])
            n_rows = int(man["counts"]["rows"])
        except (KeyError, TypeError, ValueError) as e:
            raise IndexFormatError(f"manifest lacks or mistypes a field: {e}", path=man_path) from None
        if dtype not in _DTYPES:
            raise IndexFormatError(f"unknown frame dtype {dtype!r}", path=man_path, field="frame_dtype")
        for fname, meta in files.items():
            p = os.path.join(path, fname)
            if not os.path.isfile(p):
                raise IndexFormatError("file listed in the manifest is missing", path=p)
            size = os.path.getsize(p)
            if size != int(meta["bytes"]):
                raise IndexFormatError(f"size {size} bytes, manifest says {meta['bytes']} (truncated or "
                                       "modified)", path=p)
            if verify and _sha256_file(p) != meta["sha256"]:
                raise IndexFormatError("sha256 checksum mismatch (corrupt or modified file)", path=p)
        ann_cfg = man.get("ann", {})
        try:
            index = cls(dim, max_frames, man.get("model", {}), frame_dtype=dtype, ann=ann_cfg.get("config"),
                        work_dir=work_dir, prefilter_segments=n_segv)
        except (ValueError, TypeError) as e:
            raise IndexFormatError(f"invalid index settings: {e}", path=man_path) from None
        index.path = path
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        for s in seg_meta:
            name = s.get("name")
            seg = _Segment(name, int(s["rows"]), int(s["frames"]), path_dir=path)
            for fname, want in ((f"{name}.frames", seg.n_frames * dim * itemsize),
                                (f"{name}.prefilter", seg.n_rows * n_segv * dim * 2)):
                if fname not in files:
                    raise IndexFormatError("segment file not listed in the manifest", path=os.path.join(path, fname))
                if int(files[fname]["bytes"]) != want:
                    raise IndexFormatError(f"holds {files[fname]['bytes']} bytes but the manifest's dims "
                                           f"(D={dim}, {dtype}) need {want}", path=os.path.join(path, fname))
                seg.files[fname] = files[fname]
            index._segments.append(seg)
        index._open_segments(path)
        rows_p = os.path.join(path, "rows.npz")
        vids_p = os.path.join(path, "vids.json")
        for p in (rows_p, vids_p):
            if os.path.basename(p) not in files:
                raise IndexFormatError("file not listed in the manifest", path=p)
        try:
            with np.load(rows_p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("seg", "off", "length", "duration", "alive", "segmask")}
        except Exception as e:  # noqa: BLE001 - any numpy/zip error means a corrupt file
            raise IndexFormatError(f"cannot read the row table: {type(e).__name__}: {e}", path=rows_p) from None
        try:
            with open(vids_p, "r", encoding="utf-8") as fh:
                vids = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IndexFormatError(f"corrupt id list: {e}", path=vids_p) from None
        if not isinstance(vids, list) or len(vids) != n_rows or any(len(a) != n_rows for a in arrays.values()):
            raise IndexFormatError(f"row table / id list do not have the manifest's {n_rows} rows", path=rows_p)
        seg_rows = [s.n_rows for s in index._segments]
        if sum(seg_rows) != n_rows:
            raise IndexFormatError(f"segments hold {sum(seg_rows)} rows, manifest counts {n_rows}", path=man_path,
                                   field="segments")
        if n_rows and (arrays["seg"].min() < 0 or arrays["seg"].max() >= len(index._segments)):
            raise IndexFormatError("row table points at a missing segment", path=rows_p, field="seg")
        ends = arrays["off"] + arrays["length"]
        seg_frames = np.asarray([s.n_frames for s in index._segments] or [0])
        if n_rows and (arrays["off"].min() < 0 or (ends > seg_frames[arrays["seg"]]).any()
                       or (arrays["length"] > max_frames).any()):
            raise IndexFormatError("row offsets/lengths exceed their segment's frames", path=rows_p, field="off")
        index._vids = [str(v) for v in vids]
        index._seg, index._off = arrays["seg"].astype(np.int32), arrays["off"].astype(np.int64)
        index._len, index._dur = arrays["length"].astype(np.int32), arrays["duration"].astype(np.float64)
        index._alive, index._n = arrays["alive"].astype(bool), n_rows
        index._segmask = arrays["segmask"].astype(np.uint8)
        index._row_of = {index._vids[r]: r for r in np.flatnonzero(index._alive).tolist()}
        if len(index._row_of) != int(index._alive.sum()):
            raise IndexFormatError("duplicate video ids among alive rows", path=vids_p)
        ann_p = os.path.join(path, "ann.faiss")
        if "ann.faiss" in files:
            try:
                index._ann = AnnIndex.read(ann_p, ann_cfg.get("kind"), dim, ann_cfg.get("params", {}))
            except Exception as e:  # noqa: BLE001 - FAISS raises RuntimeError with C++ text
                raise IndexFormatError(f"cannot read the FAISS index: {e}", path=ann_p) from None
            index._ann_dead = int(ann_cfg.get("dead_entries", 0))
            want = index._num_vectors() + index._ann_dead
            if index._ann.ntotal != want:
                raise IndexFormatError(f"FAISS index holds {index._ann.ntotal} entries, expected {want}", path=ann_p)
        if man.get("video_bias"):
            bias_p = os.path.join(path, "bias.f32")
            nl = len(man["video_bias"].get("levels", []))
            if "bias.f32" not in files or int(files["bias.f32"]["bytes"]) != n_rows * nl * 4:
                raise IndexFormatError(f"Sinkhorn bias file missing or not ({n_rows}, {nl}) float32", path=bias_p)
            index._bias = np.fromfile(bias_p, dtype=np.float32).reshape(n_rows, nl)
            index._bias_info = dict(man["video_bias"])
        if model is not None:
            index.attach(model)
        return index

    # ================================================================== info
    def info(self) -> Dict[str, Any]:
        """Counts, dims, FAISS kind/params, format version, size on disk (when saved)."""
        size = None
        if self.path and os.path.isdir(self.path):
            size = sum(os.path.getsize(os.path.join(self.path, f)) for f in os.listdir(self.path)
                       if os.path.isfile(os.path.join(self.path, f)))
        return {
            "path": self.path, "format": FORMAT_NAME, "version": FORMAT_VERSION,
            "videos": len(self), "rows": self._n, "removed_rows": self._n - len(self),
            "dim": self.dim, "max_frames": self.max_frames, "frame_dtype": self.frame_dtype,
            "prefilter_segments": self.segments_per_video,
            "frames_stored": int(self._len[: self._n].sum()),
            "ann": None if self._ann is None else {"kind": self._ann.kind, **self._ann.params,
                                                   "entries": self._ann.ntotal, "tombstones": self._ann_dead},
            "segments": len(self._segments) + (1 if self._pending is not None and self._pending.n_rows else 0),
            "model": {k: self.model_info.get(k) for k in ("arch", "config_hash", "weights_hash")},
            "video_bias": None if self._bias_info is None else self._bias_info.get("levels"),
            "size_bytes": size,
        }

    def _close_fds(self) -> None:
        for seg in self._segments:
            if seg.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(seg.fd)
                seg.fd = None

    def close(self) -> None:
        """Drop memory maps, file descriptors, reader threads and spill files (unsaved rows
        are lost)."""
        if self._pending is not None:
            self._pending.discard()
            self._pending = None
        self._close_fds()
        for seg in self._segments:
            seg.frames = seg.prefilter = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):  # spill files of an unsaved index are temporary
        with contextlib.suppress(Exception):
            if self._pending is not None:
                self._pending.discard()
            self._close_fds()
            if self._pool is not None:
                self._pool.shutdown(wait=False)


def search_shards(indexes: Sequence[CorpusIndex], text_emb, k: int = 10, m: Optional[int] = None
                  ) -> List[List[Tuple[str, float]]]:
    """Search several shard indexes with the same queries and merge their top-k exactly
    (scores are exact model scores; a vid present in several shards keeps its best score).
    Ties break by shard order, then by the shard's own order."""
    per = [idx.search(text_emb, k=k, m=m) for idx in indexes]
    out = []
    for q in range(len(text_emb)):
        best: Dict[str, Tuple[float, int, int]] = {}
        for si, res in enumerate(per):
            for rank, (vid, s) in enumerate(res[q]):
                key = (s, -si, -rank)
                if vid not in best or key > best[vid]:
                    best[vid] = key
        merged = sorted(best.items(), key=lambda kv: (-kv[1][0], -kv[1][1], -kv[1][2]))[:k]
        out.append([(vid, key[0]) for vid, key in merged])
    return out
