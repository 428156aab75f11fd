"""Storage of the stage-1 corpus index: the rows of encoded videos, and their files on disk.

A row holds one video: its valid encoded frames (stored by reference in an append-only
segment file, ``(n_frames, D)`` float16/float32, the frames of each video back to back) and
its ``S = prefilter_segments`` pre-filter vectors (``(rows, S, D)`` float16 beside them, zero
rows for empty segments, a bit mask of the valid ones). Removing a video marks its row dead
(a tombstone); :meth:`FrameStore.compact` rewrites the frames of the alive rows. Rows being
added go to spill files in ``work_dir`` (a build never holds the frames in memory) until the
index is saved.

Files (every one listed with its sha256 and size in the index's ``manifest.json``, which
:class:`~lavis_c2f.index.corpus_index.CorpusIndex` writes)::

    DIR/vids.json              video id of every row (row number = FAISS id // S)
    DIR/rows.npz               per row: segment, frame offset, frame count, duration
                               (NaN = unknown), alive, valid pre-filter vectors (bit mask)
    DIR/seg-00000.frames       (n_frames, D) raw little-endian float16/float32 (never rewritten)
    DIR/seg-00000.prefilter    (n_rows, S, D) float16 pre-filter vectors of that segment's rows

Reading the frames of candidate videos (:meth:`FrameStore.gather`) uses one ``pread`` per
video from saved segments, spread over ``io_threads`` threads, so a re-rank over a corpus
larger than the page cache waits for ``m / io_threads`` disk reads instead of ``m``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.models.retriever.embeddings import VideoEmbedding

FRAME_DTYPES = {"float16": np.float16, "float32": np.float32}
_HASH_CHUNK = 8 << 20
_ROW_FIELDS = ("seg", "off", "length", "duration", "alive", "segmask")


class IndexFormatError(DataFormatError):
    """A corrupt, truncated, unknown-version or inconsistent index file (names the file)."""


def rows_embedding(model, rows: torch.Tensor, mask: torch.Tensor):
    """What a re-ranker scores from stored rows ``(m, F, D)`` with their ``(m, F)`` mask: a model
    with the video-terms hook unpacks them (``model.from_index_rows(rows, mask)``); otherwise a
    :class:`VideoEmbedding` of the frames whose ``pooled`` (the normalised mean of the normalised
    valid frames, as the model pools) is computed only if read: re-scoring never reads it."""
    if model is not None and hasattr(model, "from_index_rows"):
        return model.from_index_rows(rows, mask)
    return VideoEmbedding(rows, mask)                 # pooled (unused by re-scoring) computed on access


def _scratch(scratch: Optional[Dict[str, Any]], key: str, shape: Tuple[int, ...], dtype) -> Optional[torch.Tensor]:
    """A tensor of ``shape`` viewing ``scratch[key]``'s reusable storage (grown when too small),
    or None without a scratch dict."""
    if scratch is None:
        return None
    dt = torch.from_numpy(np.zeros(0, dtype)).dtype
    n = int(np.prod(shape))
    buf = scratch.get(key)
    if buf is None or buf.dtype != dt or buf.numel() < n:
        buf = scratch[key] = torch.empty(n, dtype=dt)
    return buf[:n].view(shape)


# =========================================================================== files
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_HASH_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def file_entry(path: str) -> Dict[str, Any]:
    """``{"sha256", "bytes"}`` of a file just written (fsynced first), for the manifest."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def link_or_copy(src: str, dst: str) -> None:
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
    """A segment being written: frames and pre-filter vectors appended to spill files."""

    def __init__(self, dim: int, dtype: np.dtype, work_dir: Optional[str], segments: int):
        self.tmpdir = tempfile.mkdtemp(prefix=".c2f-index-spill-", dir=work_dir)
        self.frames = _SpillFile(os.path.join(self.tmpdir, "frames.bin"), dtype, (dim,))
        self.prefilter = _SpillFile(os.path.join(self.tmpdir, "prefilter.bin"), np.float16, (int(segments), dim))

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

    def finish(self) -> Dict[str, Tuple[str, str]]:
        """Close the spill files; returns {"frames"|"prefilter": (path, sha256)}."""
        return {"frames": (self.frames.path, self.frames.finish()),
                "prefilter": (self.prefilter.path, self.prefilter.finish())}

    def discard(self) -> None:
        self.frames.close()
        self.prefilter.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


# =========================================================================== the store
class FrameStore:
    """The rows of a corpus index (module docstring).

    Args:
        dim: embedding width D.
        max_frames: frames per video at most.
        frame_dtype: ``float16`` (half the disk / page cache) or ``float32``.
        segments_per_video: pre-filter vectors per video, S (1..8).
        work_dir: folder of the spill files of rows not saved yet (default: the system temp dir;
            put it on the output's filesystem to make saving a rename).
        io_threads: threads reading candidate frames from saved segments; 0 reads in the caller.
    """

    def __init__(self, dim: int, max_frames: int, frame_dtype: str = "float16", segments_per_video: int = 3,
                 work_dir: Optional[str] = None, io_threads: int = 8):
        if frame_dtype not in FRAME_DTYPES:
            raise ValueError(f"frame_dtype must be one of {sorted(FRAME_DTYPES)}, got {frame_dtype!r}")
        if not 1 <= int(segments_per_video) <= 8:
            raise ValueError(f"prefilter_segments must be in 1..8, got {segments_per_video}")
        self.dim, self.max_frames, self.frame_dtype = int(dim), int(max_frames), frame_dtype
        self.segments_per_video = int(segments_per_video)
        self.work_dir = work_dir
        self.io_threads = max(0, int(io_threads))
        self._pool: Optional[ThreadPoolExecutor] = None
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

    # ------------------------------------------------------------------ rows
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

    def row_of(self, vid: str) -> int:
        """The row of an alive video (``KeyError`` naming it otherwise)."""
        try:
            return self._row_of[str(vid)]
        except KeyError:
            raise KeyError(f"video id {vid!r} is not in the index") from None

    def vid_of(self, row: int) -> str:
        return self._vids[int(row)]

    def alive_rows(self) -> np.ndarray:
        return np.flatnonzero(self._alive[: self._n]).astype(np.int64)

    def is_alive(self, rows: np.ndarray) -> np.ndarray:
        return self._alive[rows]

    def duration(self, vid: str) -> Optional[float]:
        d = float(self._dur[self._row_of[vid]])
        return None if np.isnan(d) else d

    @property
    def frames_stored(self) -> int:
        return int(self._len[: self._n].sum())

    @property
    def n_segments(self) -> int:
        return len(self._segments) + (1 if self._pending is not None and self._pending.n_rows else 0)

    # ------------------------------------------------------------------ pre-filter vectors
    def num_vectors(self, rows: Optional[np.ndarray] = None) -> int:
        """Valid pre-filter vectors of ``rows`` (default: every alive row)."""
        if rows is None:
            rows = self.alive_rows()
        bits = np.unpackbits(self._segmask[rows][:, None], axis=1, bitorder="little")
        return int(bits.sum())

    def vectors(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(vectors (n, D) float32, ids ``row * S + segment``) of the valid segments of ``rows``."""
        sv = self.segments_per_video
        rows = np.asarray(rows, np.int64)
        pre = self.prefilter_rows(rows)                                       # (R, S, D)
        valid = (self._segmask[rows][:, None] >> np.arange(sv)[None, :]) & 1  # (R, S)
        r_i, s_i = np.nonzero(valid)
        return pre[r_i, s_i], rows[r_i] * sv + s_i

    def vectors_of_ids(self, ids: np.ndarray) -> torch.Tensor:
        """(n, D) float32 pre-filter vectors of FAISS ids ``row * S + segment`` (in that order).

        Gathered as float16 and converted by torch (numpy's float16 -> float32 conversion is ~20x
        slower: 2.6 ms against 0.1 ms for the 4096 vectors a pq4 refine reads)."""
        sv = self.segments_per_video
        ids = np.asarray(ids, np.int64)
        rows, seg = ids // sv, ids % sv
        segs = self._seg[rows]
        uniq = np.unique(segs).tolist()
        if len(uniq) == 1:                                 # one segment file (the usual case): no scatter
            _, pre = self._segment_arrays(int(uniq[0]))
            return torch.from_numpy(pre[rows - self._seg_row_base(int(uniq[0])), seg]).float()
        out = np.empty((len(ids), self.dim), np.float16)
        for s in uniq:
            sel = np.flatnonzero(segs == s)
            _, pre = self._segment_arrays(int(s))
            out[sel] = pre[rows[sel] - self._seg_row_base(int(s)), seg[sel]]
        return torch.from_numpy(out).float()

    # ------------------------------------------------------------------ adding / removing
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

    def append(self, vids: Sequence[str], frames: np.ndarray, lengths: np.ndarray, prefilter: np.ndarray,
               durations: Optional[Sequence[Optional[float]]] = None) -> np.ndarray:
        """Append videos (ids new to the store): ``frames`` (sum of lengths, D) their valid frames
        back to back, ``lengths`` (V,), ``prefilter`` (V, S, D) with zero rows for empty
        segments, optional seconds. Returns the new rows."""
        n = len(vids)
        pre = np.asarray(prefilter, np.float32)
        segmask = ((np.abs(pre).sum(-1) > 0) * (1 << np.arange(self.segments_per_video))).sum(-1).astype(np.uint8)
        if self._pending is None:
            self._pending = _PendingSegment(self.dim, FRAME_DTYPES[self.frame_dtype], self.work_dir,
                                            self.segments_per_video)
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
        return rows

    def remove(self, vids: Sequence[str], missing_ok: bool = False) -> np.ndarray:
        """Mark videos removed; returns their (sorted) rows."""
        rows = []
        for v in vids:
            r = self._row_of.get(str(v))
            if r is None:
                if not missing_ok:
                    raise KeyError(f"video id {v!r} is not in the index")
                continue
            rows.append(r)
        rows_a = np.asarray(sorted(set(rows)), np.int64)
        self._alive[rows_a] = False
        for r in rows_a.tolist():
            del self._row_of[self._vids[r]]
        return rows_a

    def compact(self, work_dir: Optional[str] = None) -> np.ndarray:
        """Rewrite all frames of alive rows into one new segment (drops removed rows' bytes and
        renumbers rows 0..n-1 in row order). Returns the old rows of the new ones."""
        alive = self.alive_rows()
        new = _PendingSegment(self.dim, FRAME_DTYPES[self.frame_dtype], work_dir or self.work_dir,
                              self.segments_per_video)
        offs = np.zeros(len(alive), np.int64)
        step = 4096
        for s in range(0, len(alive), step):
            rows = alive[s:s + step]
            blocks = [self.frames_of(int(r)) for r in rows]
            start = new.append(np.concatenate(blocks) if blocks else np.zeros((0, self.dim)), self.prefilter_rows(rows))
            lens = self._len[rows].astype(np.int64)
            offs[s:s + len(rows)] = start + np.concatenate([[0], np.cumsum(lens)[:-1]])
        vids = [self._vids[r] for r in alive]
        lens, durs, segmask = self._len[alive].copy(), self._dur[alive].copy(), self._segmask[alive].copy()
        if self._pending is not None:
            self._pending.discard()
        self.close_fds()
        self._segments, self._pending = [], new
        n = len(alive)
        self._vids, self._row_of = vids, {v: i for i, v in enumerate(vids)}
        self._seg, self._off, self._len = np.zeros(n, np.int32), offs, lens
        self._dur, self._alive, self._n = durs, np.ones(n, bool), n
        self._segmask = segmask
        return alive

    # ------------------------------------------------------------------ reading
    def _segment_arrays(self, s: int) -> Tuple[np.ndarray, np.ndarray]:
        if s < len(self._segments):
            seg = self._segments[s]
            return seg.frames, seg.prefilter
        if s == len(self._segments) and self._pending is not None:
            return self._pending.frames.view(), self._pending.prefilter.view()
        raise IndexError(f"segment {s} does not exist")

    def _seg_row_base(self, s: int) -> int:
        return sum(seg.n_rows for seg in self._segments[:s])

    def prefilter_rows(self, rows: np.ndarray) -> np.ndarray:
        """(R, S, D) float32 pre-filter vectors of ``rows``."""
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

    def frames_of(self, row: int) -> np.ndarray:
        frames, _ = self._segment_arrays(int(self._seg[row]))
        o, n = int(self._off[row]), int(self._len[row])
        return np.asarray(frames[o:o + n], dtype=np.float32)

    def gather_rows(self, rows: Sequence[int], scratch: Optional[Dict[str, Any]] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The stored rows of the given videos (in that order): (m, F, D) float32, zero-padded to
        the longest, and the (m, F) float32 mask (1 = valid).

        ``scratch``: a dict the caller keeps across calls whose result it drops before the next
        one (a re-ranking loop): the read and float32 buffers are reused from it instead of
        being allocated (and page-faulted in) again for every query."""
        rows = np.asarray(rows, np.int64)
        m = len(rows)
        lens = self._len[rows].astype(np.int64)
        f = int(max(1, lens.max())) if m else 1
        valid = np.arange(f)[None, :] < lens[:, None]                          # (m, f)
        mask = valid.astype(np.float32)
        out: Optional[torch.Tensor] = None          # allocated below unless one segment's pread fills it

        def zeros_if_none(t: Optional[torch.Tensor]) -> torch.Tensor:
            return torch.zeros(m, f, self.dim, dtype=torch.float32) if t is None else t

        padded_by_take = False
        if m and lens.sum():
            # one row index per output slot (padding reads the video's first row and is zeroed),
            # one take per segment in file order, then a single conversion to float32
            src = self._off[rows][:, None] + np.minimum(np.arange(f)[None, :], np.maximum(lens - 1, 0)[:, None])
            segs = self._seg[rows]
            for s in np.unique(segs[lens > 0]):
                sel = np.flatnonzero((segs == s) & (lens > 0))                  # empty videos read nothing
                if s < len(self._segments) and self._segments[int(s)].fd is not None:
                    buf = self._pread_videos(self._segments[int(s)].fd, self._off[rows[sel]], lens[sel], f, scratch)
                    if len(sel) == m:                      # every row from this segment: one conversion pass
                        out = _scratch(scratch, "f32", (m, f, self.dim), np.float32)
                        out = out.copy_(torch.from_numpy(buf)) if out is not None else \
                            torch.from_numpy(buf).to(torch.float32)
                        continue
                    out = zeros_if_none(out)
                    out[torch.from_numpy(sel)] = torch.from_numpy(buf).to(torch.float32)
                    continue                               # pread leaves padding slots at zero
                out = zeros_if_none(out)
                padded_by_take = True
                frames, _ = self._segment_arrays(int(s))
                idx = src[sel].reshape(-1)
                order = np.argsort(idx, kind="stable")
                vals = np.empty((len(idx), self.dim), dtype=frames.dtype)
                vals[order] = np.take(frames, idx[order], axis=0)
                out[torch.from_numpy(sel)] = torch.from_numpy(vals).view(len(sel), f, self.dim).to(torch.float32)
            if padded_by_take:
                out.mul_(torch.from_numpy(mask).unsqueeze(-1))
        return zeros_if_none(out), torch.from_numpy(mask)   # None: nothing stored (no rows, or only empty videos)

    def gather(self, rows: Sequence[int]) -> VideoEmbedding:
        """:class:`VideoEmbedding` of the given rows (in that order): frames (m, F, D) padded with
        zeros, mask, and the normalised mean of the normalised frames as ``pooled`` (computed on
        first access, with the retriever's own ``l2norm`` / ``masked_mean``)."""
        return rows_embedding(None, *self.gather_rows(rows))

    def _pread_videos(self, fd: int, offsets: np.ndarray, lengths: np.ndarray, f: int,
                      scratch: Optional[Dict[str, Any]] = None) -> np.ndarray:
        """(n, f, D) stored-dtype frames of n videos (``lengths`` valid rows from frame
        ``offsets``), one ``pread`` per video straight into a padded buffer (from ``scratch`` when
        given, see :meth:`gather_rows`), spread over ``io_threads`` threads (the GIL is released
        during the reads)."""
        dt = np.dtype(FRAME_DTYPES[self.frame_dtype])
        row_bytes = self.dim * dt.itemsize
        n = len(offsets)
        reused = _scratch(scratch, "read", (n, f, self.dim), dt)
        buf = reused.numpy() if reused is not None else np.empty((n, f, self.dim), dt)
        for i in np.flatnonzero(lengths < f).tolist():      # padding slots are zero, the rest is read
            buf[i, int(lengths[i]):] = 0
        flat = memoryview(buf.reshape(-1).view(np.uint8))
        order = np.argsort(offsets, kind="stable")          # ascending file offsets per worker
        path = self._segments[0].path_dir if self._segments else None

        def read(idx: np.ndarray) -> None:
            for i in idx.tolist():
                nbytes = int(lengths[i]) * row_bytes
                start = i * f * row_bytes
                got = os.preadv(fd, [flat[start:start + nbytes]], int(offsets[i]) * row_bytes)
                if got != nbytes:
                    raise IndexFormatError(f"short read ({got} of {nbytes} bytes) at frame {int(offsets[i])}",
                                           path=path)

        workers = min(self.io_threads, max(1, n // 16))
        if workers <= 1:
            read(order)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.io_threads, thread_name_prefix="c2f-index-io")
            list(self._pool.map(read, np.array_split(order, workers)))
        return buf

    # ------------------------------------------------------------------ persistence
    def write(self, tmp: str) -> Tuple[Dict[str, Dict[str, Any]], List[_Segment]]:
        """Write the store's files into the folder ``tmp`` (saved segments hard-linked, the
        pending one finished). Returns (``{file: {sha256, bytes}}``, the segments after saving)."""
        files: Dict[str, Dict[str, Any]] = {}
        for seg in self._segments:                  # immutable files: link, checksums from the manifest
            for fname, meta in seg.files.items():
                link_or_copy(os.path.join(seg.path_dir, fname), os.path.join(tmp, fname))
                files[fname] = dict(meta)
        segments = list(self._segments)
        if self._pending is not None and self._pending.n_rows:
            name = f"seg-{len(self._segments):05d}"
            done = self._pending.finish()
            entries = {}
            for key, fname in (("frames", f"{name}.frames"), ("prefilter", f"{name}.prefilter")):
                src, sha = done[key]
                link_or_copy(src, os.path.join(tmp, fname))
                entries[fname] = {"sha256": sha, "bytes": os.path.getsize(src)}
            files.update(entries)
            segments.append(_Segment(name, self._pending.n_rows, self._pending.n_frames, files=entries))
        with open(os.path.join(tmp, "vids.json"), "w", encoding="utf-8") as fh:
            json.dump(self._vids, fh)
        n = self._n
        with open(os.path.join(tmp, "rows.npz"), "wb") as fh:
            np.savez(fh, seg=self._seg[:n], off=self._off[:n], length=self._len[:n], duration=self._dur[:n],
                     alive=self._alive[:n], segmask=self._segmask[:n])
        for fname in ("vids.json", "rows.npz"):
            files[fname] = file_entry(os.path.join(tmp, fname))
        return files, segments

    @staticmethod
    def manifest_segments(segments: Sequence[_Segment]) -> List[Dict[str, Any]]:
        return [{"name": s.name, "rows": s.n_rows, "frames": s.n_frames} for s in segments]

    def saved(self, path: str, segments: List[_Segment]) -> None:
        """The store now lives in ``path`` (after a save): reopen the segments from there."""
        if self._pending is not None:
            self._pending.discard()
            self._pending = None
        self._segments = segments
        self._open_segments(path)

    def _open_segments(self, path: str) -> None:
        dt = FRAME_DTYPES[self.frame_dtype]
        sv = self.segments_per_video
        self.close_fds()
        for seg in self._segments:
            fr = os.path.join(path, f"{seg.name}.frames")
            pf = os.path.join(path, f"{seg.name}.prefilter")
            seg.frames = (np.memmap(fr, dtype=dt, mode="r", shape=(seg.n_frames, self.dim))
                          if seg.n_frames else np.zeros((0, self.dim), dt))
            seg.fd = os.open(fr, os.O_RDONLY) if seg.n_frames else None
            seg.prefilter = (np.memmap(pf, dtype=np.float16, mode="r", shape=(seg.n_rows, sv, self.dim))
                             if seg.n_rows else np.zeros((0, sv, self.dim), np.float16))
            seg.path_dir = path

    def read(self, path: str, files: Mapping[str, Mapping[str, Any]], segments: Sequence[Mapping[str, Any]],
             n_rows: int, man_path: str) -> None:
        """Fill this (empty) store from a saved index folder whose manifest lists ``files``
        (sizes and checksums already verified), ``segments`` and ``n_rows``; every
        inconsistency raises :class:`IndexFormatError` naming the file."""
        itemsize = np.dtype(FRAME_DTYPES[self.frame_dtype]).itemsize
        sv, dim = self.segments_per_video, self.dim
        for s in segments:
            name = s.get("name")
            seg = _Segment(name, int(s["rows"]), int(s["frames"]), path_dir=path)
            for fname, want in ((f"{name}.frames", seg.n_frames * dim * itemsize),
                                (f"{name}.prefilter", seg.n_rows * sv * dim * 2)):
                if fname not in files:
                    raise IndexFormatError("segment file not listed in the manifest", path=os.path.join(path, fname))
                if int(files[fname]["bytes"]) != want:
                    raise IndexFormatError(f"holds {files[fname]['bytes']} bytes but the manifest's dims "
                                           f"(D={dim}, {self.frame_dtype}) need {want}", path=os.path.join(path, fname))
                seg.files[fname] = dict(files[fname])
            self._segments.append(seg)
        self._open_segments(path)
        rows_p, vids_p = os.path.join(path, "rows.npz"), os.path.join(path, "vids.json")
        for p in (rows_p, vids_p):
            if os.path.basename(p) not in files:
                raise IndexFormatError("file not listed in the manifest", path=p)
        try:
            with np.load(rows_p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in _ROW_FIELDS}
        except Exception as e:  # noqa: BLE001 - any numpy/zip error means a corrupt file
            raise IndexFormatError(f"cannot read the row table: {type(e).__name__}: {e}", path=rows_p) from None
        try:
            with open(vids_p, "r", encoding="utf-8") as fh:
                vids = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IndexFormatError(f"corrupt id list: {e}", path=vids_p) from None
        if not isinstance(vids, list) or len(vids) != n_rows or any(len(a) != n_rows for a in arrays.values()):
            raise IndexFormatError(f"row table / id list do not have the manifest's {n_rows} rows", path=rows_p)
        seg_rows = [s.n_rows for s in self._segments]
        if sum(seg_rows) != n_rows:
            raise IndexFormatError(f"segments hold {sum(seg_rows)} rows, manifest counts {n_rows}", path=man_path,
                                   field="segments")
        if n_rows and (arrays["seg"].min() < 0 or arrays["seg"].max() >= len(self._segments)):
            raise IndexFormatError("row table points at a missing segment", path=rows_p, field="seg")
        ends = arrays["off"] + arrays["length"]
        seg_frames = np.asarray([s.n_frames for s in self._segments] or [0])
        if n_rows and (arrays["off"].min() < 0 or (ends > seg_frames[arrays["seg"]]).any()
                       or (arrays["length"] > self.max_frames).any()):
            raise IndexFormatError("row offsets/lengths exceed their segment's frames", path=rows_p, field="off")
        self._vids = [str(v) for v in vids]
        self._seg, self._off = arrays["seg"].astype(np.int32), arrays["off"].astype(np.int64)
        self._len, self._dur = arrays["length"].astype(np.int32), arrays["duration"].astype(np.float64)
        self._alive, self._n = arrays["alive"].astype(bool), n_rows
        self._segmask = arrays["segmask"].astype(np.uint8)
        self._row_of = {self._vids[r]: r for r in np.flatnonzero(self._alive).tolist()}
        if len(self._row_of) != int(self._alive.sum()):
            raise IndexFormatError("duplicate video ids among alive rows", path=vids_p)

    # ------------------------------------------------------------------ resources
    def warm(self, chunk_bytes: int = 1 << 24) -> int:
        """Read every saved segment file once, sequentially, so that the page cache holds it
        (a service before its first queries; a benchmark before timing). Searches read random
        rows of these files: from a cold cache each row is a disk read. Returns the bytes read;
        rows not saved yet live in the spill files, which were just written (cached)."""
        total = 0
        for seg in self._segments:
            if seg.path_dir is None:
                continue
            for fname in (f"{seg.name}.frames", f"{seg.name}.prefilter"):
                path = os.path.join(seg.path_dir, fname)
                if not os.path.exists(path):
                    continue
                with open(path, "rb", buffering=0) as fh:
                    while True:
                        n = len(fh.read(chunk_bytes))
                        if not n:
                            break
                        total += n
        return total

    def close_fds(self) -> None:
        """Close the segments' read descriptors (reads then go through the memory maps)."""
        for seg in self._segments:
            if seg.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(seg.fd)
                seg.fd = None

    def close(self) -> None:
        """Drop memory maps, file descriptors, reader threads and spill files (unsaved rows are lost)."""
        if self._pending is not None:
            self._pending.discard()
            self._pending = None
        self.close_fds()
        for seg in self._segments:
            seg.frames = seg.prefilter = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):  # spill files of an unsaved index are temporary
        with contextlib.suppress(Exception):
            if self._pending is not None:
                self._pending.discard()
            self.close_fds()
            if self._pool is not None:
                self._pool.shutdown(wait=False)


__all__ = ["FRAME_DTYPES", "FrameStore", "IndexFormatError", "file_entry", "link_or_copy", "rows_embedding",
           "sha256_file"]
