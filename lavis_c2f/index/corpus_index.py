"""Scalable stage-1 corpus index: FAISS pre-filter + exact T-MASS re-ranking.

T-MASS pools frames conditioned on the query, so exact scoring of Q queries against V
videos costs Q x V cross-attentions. :class:`CorpusIndex` is three parts, one job each:

* **storage and persistence** (:class:`~lavis_c2f.index.store.FrameStore`): per video, the
  encoded frames (by reference: memory-mapped float16/float32 segment files with row
  offsets) and its pre-filter vectors;
* **pre-filter** (:class:`~lavis_c2f.index.prefilter.Prefilter`): the ``m`` candidate videos
  of a query from a FAISS index of query-independent vectors (:mod:`lavis_c2f.index.ann`);
* **re-ranking search** (this module): the candidates re-scored exactly with the model
  (:meth:`C2FTMassRetriever.score`, Sinkhorn video biases included), the top ``k`` returned.

It implements :class:`~lavis_c2f.index.base.StageOneIndex` (``candidates`` / ``rerank`` /
``search`` / ``info``), the interface the coarse-to-fine engine searches through.

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

import datetime
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.common.progress import progress_bar
from lavis_c2f.index.ann import AnnConfig
from lavis_c2f.index.base import IndexMismatchError, StageOneBase, check_model, stored_rows_per_video
from lavis_c2f.index.exact import score_candidates
from lavis_c2f.index.prefilter import Prefilter
from lavis_c2f.index.store import FRAME_DTYPES, FrameStore, IndexFormatError, file_entry, rows_embedding, sha256_file
from lavis_c2f.models.retriever.modules import sinkhorn_video_bias
from lavis_c2f.version import __version__

logger = logging.getLogger(__name__)

FORMAT_NAME = "lavis_c2f.corpus_index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BIAS_FILE = "bias.f32"
_SINKHORN_SETTINGS = ("sinkhorn_temperature", "sinkhorn_iters", "inference_mode", "num_trials", "trial_include_mean",
                      "eval_seed")


def _to_stored(model, video_emb):
    """The video-terms hook: a model with ``to_index_rows(video_emb)`` packs its embedding into a
    :class:`VideoEmbedding` of (V, rows, D) (a prefix of valid rows) that the index stores as
    frames, and unpacks what :meth:`CorpusIndex.gather` reads with ``from_index_rows(rows,
    mask)``; other models store their frames as they are."""
    return model.to_index_rows(video_emb) if model is not None and hasattr(model, "to_index_rows") else video_emb


def model_info_of(model) -> Dict[str, Any]:
    """What an index records of its retriever: the :meth:`fingerprint` plus ``config``."""
    info = dict(model.fingerprint())
    info["config"] = dict(model.hparams)
    return info


def stored_rows(model, video_emb, dim: int, max_frames: int, segments: int,
                prefilter: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What an index stores of V encoded videos: ``frames`` (sum of lengths, D) float32, their
    valid frames back to back (the model's video terms, :func:`_to_stored`), ``lengths`` (V,)
    int32 and the pre-filter vectors (V, S, D) float32 (``prefilter`` as in
    :meth:`CorpusIndex.add`; default ``model.prefilter_segment_vectors(video_emb, S)``)."""
    model_emb, video_emb = video_emb, _to_stored(model, video_emb)
    if video_emb.dim != dim:
        raise IndexMismatchError(f"embeddings are {video_emb.dim}-d but the index is {dim}-d")
    if video_emb.frames.shape[1] > max_frames:
        raise IndexMismatchError(f"embeddings have {video_emb.frames.shape[1]} frames, index max {max_frames}")
    n, sv = len(video_emb), int(segments)
    if prefilter is None:
        if model is None:
            raise RuntimeError("no model attached to the index: pass model= to load() or call attach(model)")
        prefilter, _ = model.prefilter_segment_vectors(model_emb, sv)
    pre = prefilter.detach().cpu().float().numpy() if torch.is_tensor(prefilter) else np.asarray(prefilter, np.float32)
    if pre.ndim == 2 and sv == 1:
        pre = pre[:, None, :]
    if pre.shape != (n, sv, dim):
        raise ValueError(f"prefilter must be ({n}, {sv}, {dim}), got {pre.shape}")
    lengths = video_emb.lengths.cpu().numpy().astype(np.int32)
    mask = video_emb.mask.detach().cpu() > 0
    if not torch.equal(mask, torch.arange(mask.shape[1])[None, :] < torch.from_numpy(lengths)[:, None].long()):
        raise ValueError("video_emb.mask must mark a prefix of valid frames per video (as the encoders do)")
    frames = video_emb.frames.detach().cpu().float()[mask].numpy()   # valid frames, row-major = per video
    return frames, lengths, pre


def video_bias_of(model, bank_text_emb, blocks: Iterable[Any], n_blocks: Optional[int] = None,
                  progress: bool = False) -> np.ndarray:
    """Per-video, per-level Sinkhorn log scalings (V, L) float32 of UCoFiA's inference: the
    scores of a query bank (Q queries) x every video (``blocks``: the videos' embeddings in
    order, any block sizes; ``n_blocks`` of them, for the progress bar) per level ``l``,
    ``b_l = log r`` with ``r`` the video-side scaling of Sinkhorn over ``exp(S_l / tau)`` (Q, V)
    (the model's own ``video_bias_from_levels`` when it has one). Both index backends store what
    this returns, so they score alike."""
    if progress:
        blocks = progress_bar(blocks, total=n_blocks, desc="index: bank scores", unit="block", leave=True)
    raw: Dict[str, List[torch.Tensor]] = {lv: [] for lv in model.levels}
    for emb in blocks:
        _, lv = model.score(bank_text_emb, emb, return_levels=True)
        for k in raw:
            raw[k].append(lv[k].cpu())
    if hasattr(model, "video_bias_from_levels"):      # the model's own SK-norm (UCoFiA)
        bias = model.video_bias_from_levels({k: torch.cat(v, 1) for k, v in raw.items()}).cpu().numpy()
    else:
        cols = [sinkhorn_video_bias(torch.cat(raw[k], 1), model.sinkhorn_temperature, model.sinkhorn_iters)
                for k in model.levels]
        bias = torch.stack(cols, 1).numpy()
    return bias.astype(np.float32)


def video_bias_array(model, bias, n_videos: int) -> np.ndarray:
    """``bias`` as (n_videos, L) float32 for ``model``'s L score levels (``ValueError`` otherwise)."""
    bias = np.asarray(bias, np.float32)
    if bias.shape != (n_videos, len(model.levels)):
        raise ValueError(f"bias must be ({n_videos}, {len(model.levels)}), got {bias.shape}")
    return bias


def check_bias_settings(model, info: Mapping[str, Any]) -> None:
    """Stored Sinkhorn biases (``info``: ``{"levels", "settings"}``) fit ``model``'s current
    levels and :meth:`inference_settings`; :class:`IndexMismatchError` naming what differs."""
    cur = model.inference_settings()
    diff = [k for k in _SINKHORN_SETTINGS if info.get("settings", {}).get(k) != cur.get(k)]
    if diff or info.get("levels") != list(model.levels):
        raise IndexMismatchError(f"the stored Sinkhorn video biases were computed with other settings "
                                 f"({', '.join(diff) or 'levels'}); recompute them with compute_video_bias()")


def encode_features(model, vids: Sequence[str], load_features: Callable[[str], np.ndarray]):
    """``model``'s :class:`VideoEmbedding` of one batch of videos given a feature loader
    (``vid -> (L, Dv)``), zero-padded to the batch's longest (eval mode, no gradients)."""
    feats = [np.asarray(load_features(v), dtype=np.float32) for v in vids]
    for v, f in zip(vids, feats):
        if f.ndim != 2:
            raise DataFormatError(f"features must be (clips, dim), got shape {f.shape}", field=v)
    lmax = max(1, max(f.shape[0] for f in feats))
    x = np.zeros((len(vids), lmax, feats[0].shape[1]), np.float32)
    m = np.zeros((len(vids), lmax), np.float32)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
        m[i, : f.shape[0]] = 1.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.encode_video(torch.from_numpy(x), torch.from_numpy(m))
    finally:
        model.train(was_training)


class CorpusIndex(StageOneBase):
    """Video corpus index for stage-1 search (see the module docstring).

    Args:
        dim: embedding width D (the model's ``embed_dim``).
        max_frames: frames per video (the model's ``num_frames``).
        model_info: the model's :meth:`fingerprint` plus ``config`` (stored in the manifest).
        frame_dtype: ``float16`` (default, half the disk/page-cache) or ``float32``.
        ann: :class:`AnnConfig` or a dict of its fields.
        model: the retriever used to encode queries, compute pre-filter vectors and re-rank
            (may be attached later with :meth:`attach`).
        work_dir: folder for spill files of not-yet-saved rows (:class:`FrameStore`).
        rebuild_fraction: rebuild an HNSW index once this fraction of its entries are dead.
        prefilter_segments: pre-filter vectors per video (see the module docstring).
        io_threads: threads reading candidate frames from saved segments (:class:`FrameStore`).
    """

    def __init__(self, dim: int, max_frames: int, model_info: Mapping[str, Any], frame_dtype: str = "float16",
                 ann: Optional[Any] = None, model=None, work_dir: Optional[str] = None,
                 rebuild_fraction: float = 0.3, prefilter_segments: int = 3, io_threads: int = 8):
        self.store = FrameStore(dim, max_frames, frame_dtype, prefilter_segments, work_dir, io_threads)
        self.prefilter = Prefilter(ann, rebuild_fraction)
        self.model_info = dict(model_info)
        self.model = None
        self._bias: Optional[np.ndarray] = None
        self._bias_info: Optional[Dict[str, Any]] = None
        self.path: Optional[str] = None
        if model is not None:
            self.attach(model)

    # ================================================================== construction
    @classmethod
    def for_model(cls, model, **kwargs: Any) -> "CorpusIndex":
        """An empty index matching ``model`` (a :class:`C2FTMassRetriever`, or any retriever with
        the video-terms hook, see :func:`stored_rows_per_video`)."""
        return cls(int(model.embed_dim), stored_rows_per_video(model), model_info_of(model), model=model, **kwargs)

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

    def _manifest_name(self) -> str:
        return os.path.join(self.path, MANIFEST) if self.path else "index"

    # ================================================================== properties
    dim = property(lambda self: self.store.dim)
    max_frames = property(lambda self: self.store.max_frames)
    frame_dtype = property(lambda self: self.store.frame_dtype)
    segments_per_video = property(lambda self: self.store.segments_per_video)
    ann_config = property(lambda self: self.prefilter.config)

    @property
    def io_threads(self) -> int:
        return self.store.io_threads

    @io_threads.setter
    def io_threads(self, n: int) -> None:
        self.store.io_threads = max(0, int(n))

    def __len__(self) -> int:
        return len(self.store)

    @property
    def num_rows(self) -> int:
        return self.store.num_rows

    @property
    def vids(self) -> List[str]:
        """Alive video ids in row order."""
        return self.store.vids

    def __contains__(self, vid: object) -> bool:
        return vid in self.store

    def duration(self, vid: str) -> Optional[float]:
        return self.store.duration(vid)

    @property
    def ann_kind(self) -> Optional[str]:
        return self.prefilter.kind

    # ================================================================== adding / removing
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
        stored = self.video_rows(video_emb, prefilter) if n else None   # checked before anything is removed
        if len(set(vids)) != n:
            dup = next(v for i, v in enumerate(vids) if v in vids[:i])
            raise ValueError(f"video id {dup!r} appears twice in one add()")
        dup = [v for v in vids if v in self.store]
        if dup:
            if not replace:
                raise ValueError(f"{len(dup)} video id(s) already indexed (e.g. {dup[0]!r}); remove them or pass "
                                 "replace=True")
            self.remove(dup)
        if durations is not None and len(durations) != n:
            raise ValueError(f"{n} vids but {len(durations)} durations")
        if stored is None:
            return
        self.add_rows(vids, *stored, durations, update_ann=update_ann)

    def video_rows(self, video_emb, prefilter: Optional[np.ndarray] = None
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the index stores of V encoded videos (:func:`stored_rows` with the attached model)."""
        return stored_rows(self.model, video_emb, self.dim, self.max_frames, self.segments_per_video, prefilter)

    def add_rows(self, vids: Sequence[str], frames: np.ndarray, lengths: np.ndarray, prefilter: np.ndarray,
                 durations: Optional[Sequence[Optional[float]]] = None, update_ann: bool = True) -> None:
        """Append videos new to the index given what it stores of them (:meth:`video_rows`):
        :meth:`add` after encoding, and the merge of rows encoded elsewhere (the parts of a
        build across processes, :mod:`lavis_c2f.index.build`)."""
        vids = [str(v) for v in vids]
        dup = [v for v in vids if v in self.store]
        if dup:
            raise ValueError(f"{len(dup)} video id(s) already indexed (e.g. {dup[0]!r})")
        rows = self.store.append(vids, frames, lengths, prefilter, durations)
        n = len(vids)
        if self._bias is not None:
            self._bias = np.concatenate([self._bias, np.zeros((n, self._bias.shape[1]), np.float32)])
            logger.warning("added videos get zero Sinkhorn bias; recompute it with compute_video_bias()")
        if update_ann:
            self.prefilter.extend(self.store, rows)

    def encode_features(self, vids: Sequence[str], load_features: Callable[[str], np.ndarray]):
        """The attached model's :class:`VideoEmbedding` of one batch (:func:`encode_features`)."""
        return encode_features(self._require_model(), vids, load_features)

    def add_features(self, vids: Sequence[str], load_features: Callable[[str], np.ndarray],
                     durations: Optional[Mapping[str, float]] = None, batch_size: int = 64,
                     progress: bool = True) -> None:
        """Encode and add videos given a feature loader (``vid -> (L, Dv)``) in batches of
        ``batch_size``; the FAISS index is (re)built or extended once at the end."""
        self._require_model()
        vids = [str(v) for v in vids]
        it: Iterable = range(0, len(vids), batch_size)
        if progress:
            it = progress_bar(it, total=(len(vids) + batch_size - 1) // batch_size, desc="index: encode videos",
                              unit="batch", leave=True)

        def batches():
            for s in it:
                chunk = vids[s:s + batch_size]
                emb = self.encode_features(chunk, load_features)
                yield chunk, *self.video_rows(emb), (None if durations is None else [durations.get(v) for v in chunk])

        self.add_row_batches(batches())

    def add_row_batches(self, batches: Iterable[Tuple[Sequence[str], np.ndarray, np.ndarray, np.ndarray,
                                                      Optional[Sequence[Optional[float]]]]]) -> None:
        """:meth:`add_rows` of each ``(vids, frames, lengths, prefilter, durations)`` batch in
        order; the FAISS index is (re)built or extended once at the end (a bulk build)."""
        first_new = self.num_rows
        for vids, frames, lengths, pre, durs in batches:
            self.add_rows(vids, frames, lengths, pre, durs, update_ann=False)
        if self.num_rows > first_new:
            self.prefilter.extend(self.store, np.arange(first_new, self.num_rows, dtype=np.int64))

    def remove(self, vids: Sequence[str], missing_ok: bool = False) -> int:
        """Mark videos removed; returns how many were removed."""
        rows = self.store.remove(vids, missing_ok=missing_ok)
        self.prefilter.remove(self.store, rows)
        return len(rows)

    def rebuild_ann(self, config: Optional[AnnConfig] = None) -> None:
        """(Re)build the FAISS index from the alive rows (kind re-chosen by the size policy)."""
        self.prefilter.rebuild(self.store, config)

    def compact(self, work_dir: Optional[str] = None) -> None:
        """Rewrite all frames of alive rows into one new segment (drops removed rows' bytes and
        renumbers rows); the FAISS index is rebuilt. Save afterwards to persist."""
        old_rows = self.store.compact(work_dir)
        if self._bias is not None:
            self._bias = self._bias[old_rows].copy()
        self.rebuild_ann()

    # ================================================================== frames
    def gather(self, rows: Sequence[int], scratch: Optional[Dict[str, Any]] = None):
        """The model's video embedding of the given rows (in that order), read from the segments:
        the stored frames as a :class:`VideoEmbedding`, or what a model with the video-terms hook
        unpacks from its stored rows (``from_index_rows(rows (m, F, D), mask (m, F))``).
        ``scratch``: reused buffers of a loop that drops each result before the next call
        (:meth:`FrameStore.gather_rows`)."""
        return rows_embedding(self.model, *self.store.gather_rows(rows, scratch))

    def embeddings(self, vids: Sequence[str]):
        """The video embedding of the given video ids (:meth:`gather`)."""
        return self.gather([self.store.row_of(v) for v in vids])

    # ================================================================== Sinkhorn biases
    def set_video_bias(self, bias: np.ndarray, settings: Mapping[str, Any], vids: Optional[Sequence[str]] = None
                       ) -> None:
        """Store per-video, per-level Sinkhorn log scalings ((V, L), rows in ``vids`` order,
        default: :attr:`vids`) together with the model's :meth:`inference_settings` they were
        computed with. Rows not listed get 0."""
        model = self._require_model()
        vids = self.vids if vids is None else [str(v) for v in vids]
        bias = video_bias_array(model, bias, len(vids))
        nl = len(model.levels)
        full = np.zeros((self.num_rows, nl), np.float32)
        full[[self.store.row_of(v) for v in vids]] = bias
        self._bias = full
        self._bias_info = {"levels": list(model.levels), "settings": dict(settings)}

    def compute_video_bias(self, bank_text_emb, block_videos: int = 8192, progress: bool = False) -> np.ndarray:
        """UCoFiA's inference bias: Sinkhorn over a query bank (e.g. training queries) x every
        alive video, per level (:func:`video_bias_of`); stored in the index and returned
        ((alive V, L), row order). Memory: bank size x V x 4 bytes per level."""
        model = self._require_model()
        rows = self.store.alive_rows()
        starts = range(0, len(rows), block_videos)
        bias = video_bias_of(model, bank_text_emb, (self.gather(rows[s:s + block_videos]) for s in starts),
                             len(starts), progress)
        self.set_video_bias(bias, model.inference_settings(), [self.store.vid_of(r) for r in rows])
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
        check_bias_settings(model, self._bias_info or {})
        return torch.from_numpy(self._bias[rows])

    # ================================================================== search
    def _candidate_rows(self, text_emb, m: int, nprobe: Optional[int] = None) -> List[np.ndarray]:
        if self.prefilter.ann is None and self.num_rows:
            self.rebuild_ann()
        qv = self._require_model().prefilter_query(text_emb).cpu().numpy()
        return self.prefilter.candidates(self.store, qv, m, nprobe=nprobe)

    def candidates(self, text_emb, m: int, nprobe: Optional[int] = None) -> List[List[str]]:
        """Pre-filter: per query of ``text_emb`` (:class:`TextEmbedding` of the attached model),
        at most ``m`` video ids, best pre-filter score first."""
        if len(text_emb) == 0 or len(self) == 0:
            return [[] for _ in range(len(text_emb))]
        return [[self.store.vid_of(r) for r in rows] for rows in self._candidate_rows(text_emb, int(m), nprobe)]

    def rerank(self, text_emb, candidates: Sequence[Sequence[str]], k: int) -> List[List[Tuple[str, float]]]:
        """Exact scores of each query's candidate videos; the ``k`` best ``(vid, score)`` per
        query, best first (ties: earlier row first)."""
        self._require_model()
        if len(candidates) != len(text_emb):
            raise ValueError(f"{len(candidates)} candidate lists for {len(text_emb)} queries")
        rows = [np.asarray([self.store.row_of(v) for v in cand], np.int64) for cand in candidates]
        return self._rerank_many(text_emb, rows, k)

    def search(self, text_emb, k: int = 10, m: Optional[int] = None, nprobe: Optional[int] = None,
               timings: Optional[Dict[str, float]] = None) -> List[List[Tuple[str, float]]]:
        """Top-k videos per query: FAISS pre-filter of ``m`` candidates (default
        ``max(256, 4 k)``), exact re-scoring with the model, best first.

        A batch of Q queries is searched in one FAISS call, then each query's candidates are
        re-ranked (:meth:`_rerank_many`); every query's result is identical to searching it alone.

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
        self._require_model()
        if self.prefilter.ann is None and self.num_rows:
            self.rebuild_ann()
        nq = len(text_emb)
        if nq == 0 or len(self) == 0:
            return [[] for _ in range(nq)]
        m = max(int(k), int(m if m is not None else max(256, 4 * k)))
        cands = self._candidate_rows(text_emb, m, nprobe)
        t1 = time.perf_counter()
        results = self._rerank_many(text_emb, cands, k)
        if timings is not None:
            timings["prefilter_s"] = timings.get("prefilter_s", 0.0) + (t1 - t0)
            timings["rerank_s"] = timings.get("rerank_s", 0.0) + (time.perf_counter() - t1)
        return results

    def _rerank_many(self, text_emb, cands: Sequence[np.ndarray], k: int) -> List[List[Tuple[str, float]]]:
        """Exact scores of each query's candidate rows (``cands[q]``), the ``k`` best per query;
        each query on its own (:func:`~lavis_c2f.index.exact.score_candidates`: identical alone and
        in a batch). Blocks of several queries were measured no faster (the exact score costs the
        same per pair; bench/stage1_search.py) and BLAS's small-matrix kernels round differently
        with the block's size."""
        out: List[List[Tuple[str, float]]] = []
        scratch: Dict[str, Any] = {}                       # one query's frames at a time
        for q, rows in enumerate(cands):
            if not len(rows):
                out.append([])
                continue
            out.append(self._top(rows, score_candidates(self.model, text_emb, q, self.gather(rows, scratch),
                                                        self._bias_for(rows)), k))
        return out

    def _top(self, rows: np.ndarray, scores: np.ndarray, k: int) -> List[Tuple[str, float]]:
        """The ``k`` best ``(vid, score)`` of ``rows`` (score desc, then row asc)."""
        order = np.lexsort((rows, -scores))[:min(k, len(rows))]
        return [(self.store.vid_of(rows[i]), float(np.float32(scores[i]))) for i in order]

    def search_exhaustive(self, text_emb, k: int = 10, block_videos: int = 4096) -> List[List[Tuple[str, float]]]:
        """Exact top-k of every query against every alive video (the re-ranking baseline)."""
        model = self._require_model()
        nq = len(text_emb)
        rows_all = self.store.alive_rows()
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
        return [[(self.store.vid_of(r), float(s)) for r, s in zip(best_r[q], best_s[q])] for q in range(nq)]

    # ================================================================== persistence
    def save(self, path: str) -> str:
        """Write the index to folder ``path`` atomically (temp folder + rename); returns it.
        Saving onto the folder it was loaded from is supported."""
        if self.prefilter.ann is None and self.num_rows:
            self.rebuild_ann()
        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        try:
            files, segments = self.store.write(tmp)
            ann_file = self.prefilter.write(tmp)
            if ann_file is not None:
                files[ann_file] = file_entry(os.path.join(tmp, ann_file))
            if self._bias is not None:
                with open(os.path.join(tmp, BIAS_FILE), "wb") as fh:
                    fh.write(np.ascontiguousarray(self._bias, np.float32).tobytes())
                files[BIAS_FILE] = file_entry(os.path.join(tmp, BIAS_FILE))
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
                json.dump(self._manifest(files, FrameStore.manifest_segments(segments)), fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            if os.path.exists(path):         # swap into place
                old = tmp + ".old"
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.store.saved(path, segments)
        self.path = path
        return path

    def _manifest(self, files: Dict[str, Dict[str, Any]], segments: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "lavis_c2f_version": __version__,
            "model": self.model_info, "dim": self.dim, "max_frames": self.max_frames,
            "frame_dtype": self.frame_dtype, "prefilter_segments": self.segments_per_video,
            "counts": {"rows": self.num_rows, "alive": len(self)},
            "ann": self.prefilter.manifest(),
            "segments": segments,
            "video_bias": self._bias_info,
            "files": files,
        }

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
        man = _read_manifest(path, man_path)
        try:
            files = dict(man["files"])
            dim, max_frames, dtype = int(man["dim"]), int(man["max_frames"]), str(man["frame_dtype"])
            n_segv = int(man["prefilter_segments"])
            seg_meta = list(man["segments"])
            n_rows = int(man["counts"]["rows"])
        except (KeyError, TypeError, ValueError) as e:
            raise IndexFormatError(f"manifest lacks or mistypes a field: {e}", path=man_path) from None
        if dtype not in FRAME_DTYPES:
            raise IndexFormatError(f"unknown frame dtype {dtype!r}", path=man_path, field="frame_dtype")
        _check_files(path, files, verify)
        ann_cfg = man.get("ann", {})
        try:
            index = cls(dim, max_frames, man.get("model", {}), frame_dtype=dtype, ann=ann_cfg.get("config"),
                        work_dir=work_dir, prefilter_segments=n_segv)
        except (ValueError, TypeError) as e:
            raise IndexFormatError(f"invalid index settings: {e}", path=man_path) from None
        index.path = path
        index.store.read(path, files, seg_meta, n_rows, man_path)
        index.prefilter = Prefilter.read(path, files, ann_cfg, index.store)
        if man.get("video_bias"):
            bias_p = os.path.join(path, BIAS_FILE)
            nl = len(man["video_bias"].get("levels", []))
            if BIAS_FILE not in files or int(files[BIAS_FILE]["bytes"]) != n_rows * nl * 4:
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
            "videos": len(self), "rows": self.num_rows, "removed_rows": self.num_rows - len(self),
            "dim": self.dim, "max_frames": self.max_frames, "frame_dtype": self.frame_dtype,
            "prefilter_segments": self.segments_per_video,
            "frames_stored": self.store.frames_stored,
            "ann": self.prefilter.info(),
            "segments": self.store.n_segments,
            "model": {k: self.model_info.get(k) for k in ("arch", "config_hash", "weights_hash")},
            "video_bias": None if self._bias_info is None else self._bias_info.get("levels"),
            "size_bytes": size,
        }

    def warm(self) -> int:
        """Read the stored frames and pre-filter vectors once into the page cache
        (:meth:`FrameStore.warm`); returns the bytes read. A cold 1e5-video index re-ranks
        each query from disk reads."""
        return self.store.warm()

    def close(self) -> None:
        """Drop memory maps, file descriptors, reader threads and spill files (unsaved rows
        are lost)."""
        self.store.close()


def _read_manifest(path: str, man_path: str) -> Dict[str, Any]:
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
    return man


def _check_files(path: str, files: Mapping[str, Mapping[str, Any]], verify: bool) -> None:
    """Every file the manifest lists exists with its size (and sha256 when ``verify``)."""
    for fname, meta in files.items():
        p = os.path.join(path, fname)
        if not os.path.isfile(p):
            raise IndexFormatError("file listed in the manifest is missing", path=p)
        size = os.path.getsize(p)
        if size != int(meta["bytes"]):
            raise IndexFormatError(f"size {size} bytes, manifest says {meta['bytes']} (truncated or modified)", path=p)
        if verify and sha256_file(p) != meta["sha256"]:
            raise IndexFormatError("sha256 checksum mismatch (corrupt or modified file)", path=p)


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


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "CorpusIndex", "IndexFormatError", "IndexMismatchError", "check_model",
           "encode_features", "model_info_of", "search_shards", "stored_rows"]
