"""What a search runs over: the corpus adapters of the coarse-to-fine engine.

A :class:`Corpus` gives, per video id, its per-clip features, duration, clip count, file and
speech captions (an :class:`~lavis_c2f.video.encoded.EncodedVideo`), the annotated ground
truth of a query when there is some, and the stage-1 index searched with a trained retriever
(:meth:`Corpus.index_for`, a :class:`~lavis_c2f.index.base.StageOneIndex`).

* :class:`VideoIndexCorpus`: an index written by ``lavis-c2f index videos VIDEO_DIR --out
  INDEX`` (:mod:`lavis_c2f.index.build`): the index folder, the extracted features
  (``videos.jsonl`` + ``clip_features/{vid}.npz``) and the sidecar ``INDEX.c2f-video.json``::

      {"backbone": {"name", "weights_id", "dim", "text_dim",         # the encoder of the videos
                    "streams": [{"name", "dim"}, ...], "text_columns": [a, b], ...},
       "features_dir": str, "clip_length": float, "frames_per_clip": int,
       "model_cfg": str, "backbone_config": {...}, "retriever_checkpoint": str or null,
       "videos": int}

* :class:`DemoCorpus`: the embedded demo corpus; its ``clip_features/{vid}.npz`` are the videos
  (no decoding), its annotations the ground truth, and its stage-1 index is built in memory
  with the given retriever on first use (about a second for the default 300 videos).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.common.io import read_json, read_jsonl
from lavis_c2f.data import demo_corpus as dc
from lavis_c2f.data.features import NpzDirStore, VideoFeatureLoader
from lavis_c2f.data.readers import read_annotations
from lavis_c2f.index.corpus_index import CorpusIndex, IndexMismatchError
from lavis_c2f.index.locator import backend_of, locator_text, open_index
from lavis_c2f.index.milvus_index import DEFAULT_TIMEOUT_S
from lavis_c2f.video.backbones import short_backbone_name
from lavis_c2f.video.captions import sidecar_captions
from lavis_c2f.video.encoded import EncodedVideo
from lavis_c2f.video.extract import FEATURES_DIR, read_videos_jsonl

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
SIDECAR_SUFFIX = ".c2f-video.json"
DEMO_ZERO_SHOT = ("the demo corpus's text and video features live in unrelated spaces (by construction), so "
                  "zero-shot scoring is at chance level there: give trained checkpoints (the run directory of "
                  "'lavis-c2f quickstart', or retriever and grounder checkpoints)")


def sidecar_path(index: PathLike) -> str:
    """``INDEX.c2f-video.json`` of an index folder."""
    return os.path.abspath(os.fspath(index)).rstrip(os.sep) + SIDECAR_SUFFIX


def index_backbone_name(index: PathLike) -> Optional[str]:
    """Short name (``offline``, ``clip_hf``, ``slowfast+clip_hf``, ...) of the backbone an index
    of videos was built with, read from its sidecar (a Milvus index: its manifest's ``corpus``);
    None when there is no readable sidecar."""
    try:
        if backend_of(index) == "milvus":
            name = (open_index(index).manifest.get("corpus") or {})["backbone"]["name"]
        else:
            with open(sidecar_path(index), "r", encoding="utf-8") as f:
                name = json.load(f)["backbone"]["name"]
    except (OSError, ValueError, KeyError, TypeError):   # includes an unreachable / missing store
        return None
    return short_backbone_name(name)


def is_demo_corpus(path: PathLike) -> bool:
    """Whether ``path`` is a demo corpus folder (``corpus.json`` named ``c2f_demo``)."""
    return os.path.isdir(os.fspath(path)) and dc.read_corpus_meta(os.fspath(path)) is not None


def _norm_query(text: str) -> str:
    return " ".join("".join(c.lower() if c.isalnum() else " " for c in str(text)).split())


class Corpus:
    """The videos a search runs over (module docstring). Subclasses give :attr:`vids`,
    :meth:`features`, :meth:`duration` and :meth:`index_for`; ``kind``, ``weights_id``
    (the encoder of the features), ``clip_length`` and ``dim`` describe the features;
    ``stream_names`` / ``stream_dims`` their streams (None: one) and ``text_columns`` the
    ``[a, b)`` columns in the text space (None: all; see ``FeatureBackbone.text_columns``)."""

    kind = ""
    weights_id = ""
    clip_length: float
    dim = 0
    stream_names: Optional[List[str]] = None
    stream_dims: Optional[List[int]] = None
    text_columns: Optional[Tuple[int, int]] = None

    def __init__(self) -> None:
        self._gt: Optional[Dict[str, List[Tuple[str, List[List[float]]]]]] = None
        self._index_model = None

    # -- per video
    @property
    def vids(self) -> List[str]:
        raise NotImplementedError

    def features(self, vid: str) -> np.ndarray:
        raise NotImplementedError

    def duration(self, vid: str) -> float:
        raise NotImplementedError

    def n_clips(self, vid: str) -> Optional[int]:
        return None

    def path(self, vid: str) -> Optional[str]:
        return None

    def captions(self, vid: str) -> Optional[List[Any]]:
        return None

    def refresh(self) -> bool:
        """Catch up with changes made to the corpus by another process; whether anything
        changed (a corpus read once: never)."""
        return False

    def vids_seen(self) -> int:
        """How many videos :attr:`vids` listed last, without asking a store (what ``/health``
        reports while the store is down)."""
        return len(self.vids)

    def __contains__(self, vid: object) -> bool:
        return vid in set(self.vids)

    def encoded(self, vid: str) -> EncodedVideo:
        """The :class:`EncodedVideo` of an indexed video (``KeyError`` naming it otherwise)."""
        if vid not in self:
            raise KeyError(f"video {vid!r} is not in the {self.kind}")
        return EncodedVideo(vid=vid, features=self.features(vid), duration=self.duration(vid),
                            clip_length=self.clip_length, weights_id=self.weights_id, backbone=self.kind,
                            path=self.path(vid), captions=self.captions(vid))

    # -- ground truth
    def _annotation_files(self) -> List[str]:
        return []

    def ground_truth(self, query: str) -> List[Tuple[str, List[List[float]]]]:
        """``[(vid, [[st, ed], ...]), ...]`` of the annotations whose query text equals ``query``
        (case and punctuation ignored); empty without annotations."""
        if self._gt is None:
            self._gt = {}
            for f in self._annotation_files():
                for r in read_annotations(f, fmt="qvh"):
                    self._gt.setdefault(_norm_query(r.query), []).append(
                        (r.vid, [[float(a), float(b)] for a, b in r.relevant_windows]))
        return list(self._gt.get(_norm_query(query), []))

    # -- stage 1
    def index_for(self, retriever) -> CorpusIndex:
        """The stage-1 index searched with ``retriever`` (attached, fingerprint checked)."""
        raise NotImplementedError


class VideoIndexCorpus(Corpus):
    """An index of videos (module docstring).

    Args:
        index_dir: the index locator (:mod:`lavis_c2f.index.locator`): a FAISS index folder with
            its sidecar beside it, or a Milvus ``*.db`` / ``http(s)://`` locator whose manifest
            holds the sidecar (``corpus``).
        ann: optional QVHighlights annotation file (ground truth shown by ``--plot``).
        verify: check the index files' sha256 on load (FAISS).
        collection: the Milvus collection when the locator names none.
        timeout: seconds a Milvus store may take to answer (each call; an unreachable store
            raises :class:`~lavis_c2f.common.errors.IndexUnavailableError` naming it).
    """

    kind = "video index"

    def __init__(self, index_dir: PathLike, ann: Optional[PathLike] = None, verify: bool = True,
                 collection: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT_S):
        super().__init__()
        self.path_dir = locator_text(index_dir, collection)
        if backend_of(index_dir) == "milvus":
            index = open_index(self.path_dir, timeout=timeout)
            sidecar = f"{self.path_dir} (manifest)"
            if not index.manifest.get("corpus"):
                raise DataFormatError("the Milvus index records no corpus (built by 'index build', not 'index "
                                      "videos'): search needs an index built from videos ('lavis-c2f index videos "
                                      "VIDEO_DIR --out corpus.db')", path=sidecar, field="corpus")
            self.sidecar = dict(index.manifest["corpus"])
            self._init_from_sidecar(sidecar, index, ann)
            return
        sidecar = sidecar_path(self.path_dir)
        if not os.path.isdir(self.path_dir):
            raise FileNotFoundError(f"index folder not found: {self.path_dir}")
        if not os.path.isfile(sidecar):
            raise DataFormatError(f"no {os.path.basename(sidecar)} beside the index: search needs an index built "
                                  "from videos ('lavis-c2f index videos VIDEO_DIR --out INDEX') or a demo corpus "
                                  "(--demo-corpus)", path=sidecar)
        self.sidecar = read_json(sidecar)
        self._init_from_sidecar(sidecar, CorpusIndex.load(self.path_dir, verify=verify), ann)

    def _init_from_sidecar(self, sidecar: str, index, ann: Optional[PathLike]) -> None:
        """The corpus of the sidecar ``self.sidecar`` (read from ``sidecar``) over ``index``."""
        try:
            bb = dict(self.sidecar["backbone"])
            self.weights_id, self.backbone_name = str(bb["weights_id"]), str(bb.get("name", ""))
            self.dim = int(bb["dim"])
            self.text_dim = int(bb.get("text_dim") or bb["dim"])
            self.stream_names = [str(x["name"]) for x in bb.get("streams") or []] or [self.backbone_name]
            self.stream_dims = [int(x["dim"]) for x in bb.get("streams") or []] or [self.dim]
            cols = bb.get("text_columns")
            self.text_columns = (int(cols[0]), int(cols[1])) if cols and list(cols) != [0, self.dim] else None
            self.clip_length = float(self.sidecar["clip_length"])
            self.frames_per_clip = int(self.sidecar.get("frames_per_clip", 1))
            self.features_dir = str(self.sidecar["features_dir"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataFormatError(f"missing or invalid field: {e}", path=sidecar) from None
        self.model_cfg = self.sidecar.get("model_cfg")
        self.backbone_config = dict(self.sidecar.get("backbone_config") or {})
        self.retriever_checkpoint = self._resolve_ckpt(self.sidecar.get("retriever_checkpoint"), sidecar)
        self._rows: Dict[str, Dict[str, Any]] = {}
        self._rows_stamp: Optional[Tuple[int, int]] = None
        self._read_rows()
        self.store = NpzDirStore(os.path.join(self.features_dir, FEATURES_DIR), field="features")
        self.index = index
        self._live = backend_of(self.path_dir) == "milvus"
        self._refresh_lock = threading.Lock()
        self._count = len(index) if self._live else None
        self._vids: Optional[List[str]] = self._listed(self.index.vids)
        self._seen = len(self._vids)
        self.ann = os.fspath(ann) if ann else None

    def _read_rows(self) -> bool:
        """(Re-)read ``FEATURES/videos.jsonl`` (the extracted videos) when its mtime or size
        changed; whether it was read."""
        try:
            st = os.stat(os.path.join(self.features_dir, "videos.jsonl"))
            stamp: Optional[Tuple[int, int]] = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if self._rows_stamp is not None and stamp in (None, self._rows_stamp):
            return False
        rows = read_videos_jsonl(self.features_dir)
        self._rows = {r["vid"]: r for r in rows if r.get("status") == "ok" and r.get("weights_id") == self.weights_id}
        self._rows_stamp = stamp
        return True

    def _listed(self, vids: Sequence[str]) -> List[str]:
        """The indexed ``vids`` that have features (the others are skipped, with a warning)."""
        missing = [v for v in vids if v not in self._rows]
        if missing:
            logger.warning("%d indexed videos have no features of %s in %s (e.g. %s); they are skipped",
                           len(missing), self.weights_id, self.features_dir, missing[0])
        return [v for v in vids if v in self._rows]

    def refresh(self) -> bool:
        """Catch up with ``index add`` / ``index remove`` / a resumed ``index videos`` that another
        process made on a live Milvus collection (a FAISS index is read once: False). Cheap: one
        count of the collection's rows and a ``stat`` of ``videos.jsonl``; when either changed,
        the features' rows are read again and :attr:`vids` is listed again when next asked.
        Whether anything changed. Searches always ask the store, so this only keeps :attr:`vids`
        and the per-video rows current (docs/serve.md, "Consistency")."""
        if not self._live:
            return False
        with self._refresh_lock:
            count = len(self.index)
            rows_changed = self._read_rows()
            if count == self._count and not rows_changed:
                return False
            self._vids, self._count = None, count
        logger.info("corpus %s changed: %d rows in the store", self.path_dir, count)
        return True

    def _row(self, vid: str) -> Dict[str, Any]:
        """The ``videos.jsonl`` row of ``vid``, read again once on a miss (a video added since);
        ``KeyError`` naming the video and the features folder."""
        row = self._rows.get(vid)
        if row is None and self._read_rows():
            row = self._rows.get(vid)
        if row is None:
            raise KeyError(f"video {vid!r} has no features of {self.weights_id} in {self.features_dir} (add videos "
                           "with 'lavis-c2f index videos', which extracts them there)")
        return row

    @staticmethod
    def _resolve_ckpt(p: Optional[str], sidecar: str) -> Optional[str]:
        if not p:
            return None
        for cand in (p, os.path.join(os.path.dirname(sidecar.split("#", 1)[0]), p)):
            if os.path.isfile(cand):
                return os.path.abspath(cand)
        raise DataFormatError(f"the retriever checkpoint the index was built with is missing: {p}", path=sidecar,
                              field="retriever_checkpoint")

    @property
    def vids(self) -> List[str]:
        """The indexed videos that have features (listed from the store again after a change)."""
        with self._refresh_lock:
            if self._vids is None:
                self._vids = self._listed(self.index.vids)
                self._seen = len(self._vids)
            return list(self._vids)

    def vids_seen(self) -> int:
        return self._seen

    def __contains__(self, vid: object) -> bool:
        return isinstance(vid, str) and (vid in self._rows or (self._read_rows() and vid in self._rows)) \
            and vid in self.index

    def features(self, vid: str) -> np.ndarray:
        return np.asarray(self.store.get(vid), dtype=np.float32)

    def duration(self, vid: str) -> float:
        d = self._row(vid).get("duration")
        if d is None or not d > 0:
            d = self.index.duration(vid) or (self.n_clips(vid) or 1) * self.clip_length
        return float(d)

    def n_clips(self, vid: str) -> Optional[int]:
        n = self._row(vid).get("n_clips")
        return None if n is None else int(n)

    def path(self, vid: str) -> Optional[str]:
        return self._row(vid).get("path")

    def captions(self, vid: str) -> Optional[List[Any]]:
        p = self.path(vid)
        return sidecar_captions(p) if p else None

    def _annotation_files(self) -> List[str]:
        return [self.ann] if self.ann else []

    def index_for(self, retriever):
        """The FAISS or Milvus index (a :class:`~lavis_c2f.index.base.StageOneIndex`) with
        ``retriever`` attached."""
        if self._index_model is not retriever:
            try:
                self.index.attach(retriever)
            except IndexMismatchError as e:
                hint = ("the index was built without a trained retriever (zero-shot); rebuild it with "
                        "'lavis-c2f index videos ... --checkpoint CKPT'" if not self.retriever_checkpoint else
                        f"it was built with {self.retriever_checkpoint}")
                raise ConfigError(f"the retriever does not match the index {self.path_dir}: {e} ({hint})") from None
            self._index_model = retriever
        return self.index


class DemoCorpus(Corpus):
    """The embedded demo corpus as a searchable corpus (module docstring).

    Args:
        root: corpus folder (``corpus.json``).
        splits: restrict to the videos of these splits (default: all).
    """

    kind = "demo corpus"

    def __init__(self, root: PathLike, splits: Optional[Sequence[str]] = None):
        super().__init__()
        self.root = os.path.abspath(os.fspath(root))
        meta = dc.read_corpus_meta(self.root)
        if meta is None:
            raise DataFormatError("not a demo corpus (no corpus.json with name 'c2f_demo'; make one with "
                                  "'lavis-c2f make-demo-corpus' or 'lavis-c2f quickstart')",
                                  path=os.path.join(self.root, "corpus.json"))
        self.meta = meta
        self.clip_length = float(meta["clip_length"])
        self.dim = int(meta["video_dim"])
        self.text_dim = int(meta["text_dim"])
        self.weights_id = f"c2f_demo_text:{str((meta.get('content') or {}).get('sha256', ''))[:16]}"
        self.splits = list(splits) if splits else list(dc.SPLITS)
        bad = [s for s in self.splits if s not in meta["splits"]]
        if bad:
            raise ConfigError(f"unknown demo corpus split(s) {bad}; known: {sorted(meta['splits'])}")
        keep = {v for s in self.splits for v in meta["splits"][s]["vids"]}
        self._durations = {v: float(d) for v, d in meta["durations"].items() if v in keep}
        self._vids = sorted(self._durations)
        self.store = NpzDirStore(os.path.join(self.root, "clip_features"), field="features")
        self._index: Optional[CorpusIndex] = None
        self._workdir: Optional[tempfile.TemporaryDirectory] = None

    @property
    def vids(self) -> List[str]:
        return list(self._vids)

    def __contains__(self, vid: object) -> bool:
        return vid in self._durations

    def features(self, vid: str) -> np.ndarray:
        return np.asarray(self.store.get(vid), dtype=np.float32)

    def duration(self, vid: str) -> float:
        return self._durations[vid]

    def n_clips(self, vid: str) -> Optional[int]:
        return int(round(self._durations[vid] / self.clip_length))

    def _annotation_files(self) -> List[str]:
        return [os.path.join(self.root, "annotations", f"{s}.jsonl") for s in self.splits]

    def queries(self, split: Optional[str] = None) -> List[Dict[str, Any]]:
        """The corpus's annotation rows (``qid``, ``query``, ``vid``, ``relevant_windows``...)."""
        out = []
        for s in ([split] if split else self.splits):
            out.extend(read_jsonl(os.path.join(self.root, "annotations", f"{s}.jsonl")))
        return out

    def index_for(self, retriever) -> CorpusIndex:
        if self._index_model is not retriever:
            t0 = time.perf_counter()
            loader = VideoFeatureLoader([self.store], normalize=True, max_len=None, use_tef=False)
            self._workdir = tempfile.TemporaryDirectory(prefix="c2f-demo-index-")
            index = CorpusIndex.for_model(retriever, work_dir=self._workdir.name)
            index.add_features(self._vids, loader.load, self._durations, progress=False)
            self._index, self._index_model = index, retriever
            logger.info("demo corpus: stage-1 index of %d videos built in %.1f s", len(self._vids),
                        time.perf_counter() - t0)
        return self._index


__all__ = ["Corpus", "DEMO_ZERO_SHOT", "DemoCorpus", "SIDECAR_SUFFIX", "VideoIndexCorpus", "index_backbone_name",
           "is_demo_corpus", "sidecar_path"]
