"""User-facing coarse-to-fine predictor: from typed queries to moments in your videos.

    from lavis_c2f.predictor import C2FPredictor

    # your videos, indexed with `lavis-c2f index videos VIDEO_DIR --out INDEX`
    p = C2FPredictor.from_checkpoints(index="INDEX", backbone="offline")        # zero-shot mode
    p = C2FPredictor.from_checkpoints(retriever_ckpt="tmass.pth", grounder_ckpt="qd_detr.pth",
                                      backbone="clip_hf", backbone_cfg={"clip_path": "clip-vit-b32"},
                                      index="INDEX")                             # trained mode
    for m in p.search("a man opens the fridge", top_k=10):
        print(m.vid, m.start, m.end, m.score)

    video = p.encode_video("clip.mp4")              # features + duration (+ captions of clip.srt)
    moments = p.predict("a man opens the fridge", video, top_k=5)
    moments.windows, moments.saliency               # [[st, ed, score], ...] seconds, (L,) per clip

    # the embedded demo corpus with the checkpoints of `lavis-c2f quickstart --out RUN`
    p = C2FPredictor.for_demo_corpus("RUN")
    p.search("a tired chef washes the bucket in the garage")

Stages
------
1. **Retrieval** of the ``stage1_top_k`` best videos of the index: the trained T-MASS retriever
   (:class:`~lavis_c2f.index.CorpusIndex` pre-filter + exact re-ranking) when a retriever
   checkpoint is configured (or recorded in the index by ``lavis-c2f index videos --checkpoint``),
   else **zero-shot**: the cosine of the backbone's pooled text embedding with each clip feature,
   ``max`` or top-k mean over the video's clips (:mod:`lavis_c2f.search.zero_shot`).
2. **Grounding** in each retrieved video: a trained QD-DETR / MESM grounder
   (:class:`~lavis_c2f.models.grounder.predictor.GrounderPredictor`, all videos of a query in
   one batched call) when a grounder checkpoint is configured, else **zero-shot**: the
   smoothed similarity curve is the saliency and windows are its thresholded runs (scores are
   in-video contrasts; see :mod:`lavis_c2f.search.zero_shot`). Videos longer than the
   grounder's ``max_v_l`` clips are covered by overlapping chunks of ``max_v_l`` clips (stride
   half of it; windows merged by NMS, saliency averaged where chunks overlap). Empty windows
   (start = end after snapping to clips) and repeated spans are left out.
3. **Refinement** (optional) of the best videos' windows by the caption-assisted refiner
   (:class:`~lavis_c2f.models.refiner.hook.CaptionRefiner`, imported only when enabled; it
   needs the video files).

Stage-1 and stage-2 scores are fused with the pipeline's fusion
(:func:`lavis_c2f.pipeline.fusion.fuse_candidates`; default ``s2 * exp(w * zscore(s1))``).
The active mode is logged and given by :attr:`C2FPredictor.mode` / :meth:`describe_mode`.

Checks (clear errors instead of silent nonsense): searching without an index; a video encoded by
another backbone than the predictor's (``weights_id``); an index built with another backbone;
checkpoints whose input widths differ from the backbone's; an empty query; zero-shot scoring on
the demo corpus (its text and video features live in unrelated spaces by construction).

The predictor holds no per-query state: ``search`` and ``predict`` may be called in any order.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from lavis_c2f.common import dist as c2f_dist
from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.pipeline.fusion import FusionConfig, fuse_candidates, load_fusion_choice
from lavis_c2f.search import zero_shot as zs

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
SIDECAR_SUFFIX = ".c2f-video.json"
ZERO_SHOT_BANK_BYTES = 1 << 30  # keep normalised clip features in memory up to this size


def index_backbone_name(index: PathLike) -> Optional[str]:
    """Short name (``offline``, ``clip_hf``, ...) of the backbone an index of videos was built
    with, read from its ``INDEX.c2f-video.json``; None when there is no readable sidecar."""
    import json

    from lavis_c2f.video.backbones import SHORT_NAMES

    side = os.path.abspath(os.fspath(index)).rstrip(os.sep) + SIDECAR_SUFFIX
    try:
        with open(side, "r", encoding="utf-8") as f:
            name = json.load(f)["backbone"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {v: k for k, v in SHORT_NAMES.items()}.get(name)


def resolve_device(device: Optional[str] = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; an explicit ``cuda`` request without a
    GPU raises :class:`ConfigError` (see :func:`lavis_c2f.common.dist.resolve_device`)."""
    return str(c2f_dist.resolve_device(device, fallback=False))


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-5)


# =========================================================================== results


@dataclass
class EncodedVideo:
    """A video ready for :meth:`C2FPredictor.predict`.

    Attributes:
        vid: video id (file stem for :meth:`C2FPredictor.encode_video`).
        features: (L, D) float32 per-clip features of the backbone (not normalised, no TEF).
        duration: seconds.
        clip_length: seconds per clip.
        weights_id: the encoder that produced ``features`` (checked against the predictor's).
        backbone: encoder name.
        path: the video file, when there is one.
        captions: speech captions (``lavis_c2f.video.captions.Caption``) from an ``.srt`` beside
            the video, or None.
    """

    vid: str
    features: np.ndarray
    duration: float
    clip_length: float
    weights_id: str
    backbone: str = ""
    path: Optional[str] = None
    captions: Optional[List[Any]] = None

    @property
    def n_clips(self) -> int:
        return int(self.features.shape[0])


@dataclass
class Moments:
    """Moments of one query in one video.

    Attributes:
        windows: ``[[start, end, score], ...]`` seconds, best first.
        saliency: (L,) float32 per-clip saliency (grounder saliency, or the smoothed
            similarity curve in zero-shot mode).
        mode: ``trained`` or ``zero-shot`` (stage 2).
        refined: whether stage 3 rewrote the windows.
    """

    query: str
    vid: str
    duration: float
    clip_length: float
    windows: List[List[float]]
    saliency: np.ndarray
    mode: str
    refined: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {"query": self.query, "vid": self.vid, "duration": float(self.duration),
                "clip_length": float(self.clip_length), "mode": self.mode, "refined": self.refined,
                "windows": [[float(a), float(b), float(s)] for a, b, s in self.windows],
                "saliency": [round(float(x), 4) for x in np.asarray(self.saliency).reshape(-1)]}


@dataclass
class Moment:
    """One moment of a corpus search: ``vid``, ``start`` / ``end`` seconds, fused ``score``,
    its ``rank`` (1 = best), the stage scores it came from, the video's duration and file."""

    vid: str
    start: float
    end: float
    score: float
    rank: int = 0
    stage1_score: Optional[float] = None
    stage2_score: Optional[float] = None
    duration: Optional[float] = None
    path: Optional[str] = None
    refined: bool = False

    def to_dict(self) -> Dict[str, Any]:
        from lavis_c2f.search.format import format_time

        return {"rank": self.rank, "vid": self.vid, "start": float(self.start), "end": float(self.end),
                "start_hms": format_time(self.start), "end_hms": format_time(self.end),
                "score": float(self.score), "stage1_score": self.stage1_score, "stage2_score": self.stage2_score,
                "duration": self.duration, "path": self.path, "refined": self.refined}


class SearchResults(list):
    """``list[Moment]`` (best first) with the search's context: ``query``, ``mode``, ``stage1``
    (``[(vid, score), ...]`` of the retrieved videos), ``details`` (vid -> :class:`Moments` of
    each grounded video, saliency included) and ``timings`` (seconds per stage)."""

    def __init__(self, moments: Sequence[Moment], *, query: str, mode: Dict[str, str],
                 stage1: Sequence[Tuple[str, float]], details: Dict[str, Moments], timings: Dict[str, float]):
        super().__init__(moments)
        self.query, self.mode = query, dict(mode)
        self.stage1 = [(str(v), float(s)) for v, s in stage1]
        self.details, self.timings = details, timings

    def to_dict(self) -> Dict[str, Any]:
        return {"query": self.query, "mode": self.mode, "stage1": [[v, s] for v, s in self.stage1],
                "moments": [m.to_dict() for m in self], "timings": {k: round(v, 4) for k, v in self.timings.items()}}


# =========================================================================== corpora


def _norm_query(text: str) -> str:
    return " ".join("".join(c.lower() if c.isalnum() else " " for c in str(text)).split())


class _Corpus:
    """What :meth:`C2FPredictor.search` runs over: video ids, per-clip features, durations."""

    kind = ""
    weights_id = ""
    clip_length = 2.0
    dim = 0

    def __init__(self) -> None:
        self._gt: Optional[Dict[str, List[Tuple[str, List[List[float]]]]]] = None
        self._bank: Optional[Tuple[np.ndarray, np.ndarray, List[str]]] = None
        self._index = None
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

    def __contains__(self, vid: object) -> bool:
        return vid in set(self.vids)

    def encoded(self, vid: str) -> EncodedVideo:
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
            from lavis_c2f.data.readers import read_annotations

            self._gt = {}
            for f in self._annotation_files():
                for r in read_annotations(f, fmt="qvh"):
                    self._gt.setdefault(_norm_query(r.query), []).append(
                        (r.vid, [[float(a), float(b)] for a, b in r.relevant_windows]))
        return list(self._gt.get(_norm_query(query), []))

    # -- stage 1
    def stage1_index(self, retriever):
        """The :class:`CorpusIndex` searched with ``retriever`` (attached, fingerprint checked)."""
        raise NotImplementedError

    def zero_shot_rank(self, text_pooled: np.ndarray, k: int, config: zs.ZeroShotConfig
                       ) -> List[Tuple[str, float]]:
        """Top-``k`` videos by zero-shot score (exhaustive: every clip of every video)."""
        vids = self.vids
        if not vids:
            return []
        t = zs.l2_normalize(np.asarray(text_pooled, np.float32).reshape(-1))
        if t.shape[0] != self.dim:
            raise ConfigError(f"the text embedding is {t.shape[0]}-d but the {self.kind}'s clip features are "
                              f"{self.dim}-d")
        scores = np.empty(len(vids), np.float64)
        bank = self._zero_shot_bank()
        if bank is not None:
            flat, offsets, _ = bank
            sims = flat @ t
            for i in range(len(vids)):
                scores[i] = zs.video_score(sims[offsets[i]:offsets[i + 1]], config)
        else:
            block = 256
            for s in range(0, len(vids), block):
                feats = [self.features(v) for v in vids[s:s + block]]
                scores[s:s + len(feats)] = zs.video_scores(t, feats, config)
        order = sorted(range(len(vids)), key=lambda i: (-scores[i], i))[:k]
        return [(vids[i], float(scores[i])) for i in order if np.isfinite(scores[i])]

    def _zero_shot_bank(self) -> Optional[Tuple[np.ndarray, np.ndarray, List[str]]]:
        if self._bank is None:
            vids = self.vids
            counts = [self.n_clips(v) for v in vids]
            if any(c is None for c in counts) or sum(counts) * self.dim * 4 > ZERO_SHOT_BANK_BYTES:
                return None
            feats = [zs.l2_normalize(self.features(v)) for v in vids]
            offsets = np.zeros(len(vids) + 1, np.int64)
            offsets[1:] = np.cumsum([f.shape[0] for f in feats])
            flat = np.concatenate(feats, 0) if feats else np.zeros((0, self.dim), np.float32)
            self._bank = (flat.astype(np.float32), offsets, list(vids))
        return self._bank


class VideoIndexCorpus(_Corpus):
    """An index written by ``lavis-c2f index videos VIDEO_DIR --out INDEX``: the stage-1 index
    folder, its ``INDEX.c2f-video.json`` (backbone id, features folder, retriever) and the
    extracted per-clip features (``videos.jsonl`` + ``clip_features/{vid}.npz``).

    Args:
        index_dir: the index folder.
        ann: optional QVHighlights annotation file (ground truth shown by ``--plot``).
        verify: check the index files' sha256 on load.
    """

    kind = "video index"

    def __init__(self, index_dir: PathLike, ann: Optional[PathLike] = None, verify: bool = True):
        super().__init__()
        from lavis_c2f.common.io import read_json
        from lavis_c2f.data.features import NpzDirStore
        from lavis_c2f.index.corpus_index import CorpusIndex
        from lavis_c2f.video.extract import FEATURES_DIR, read_videos_jsonl

        self.path_dir = os.path.abspath(os.fspath(index_dir))
        sidecar = self.path_dir.rstrip(os.sep) + SIDECAR_SUFFIX
        if not os.path.isdir(self.path_dir):
            raise FileNotFoundError(f"index folder not found: {self.path_dir}")
        if not os.path.isfile(sidecar):
            raise DataFormatError(f"no {os.path.basename(sidecar)} beside the index: search needs an index built "
                                  "from videos ('lavis-c2f index videos VIDEO_DIR --out INDEX') or a demo corpus "
                                  "(--demo-corpus)", path=sidecar)
        self.sidecar = read_json(sidecar)
        try:
            bb = dict(self.sidecar["backbone"])
            self.weights_id, self.backbone_name = str(bb["weights_id"]), str(bb.get("name", ""))
            self.dim = int(bb["dim"])
            self.text_dim = int(bb.get("text_dim") or bb["dim"])
            self.clip_length = float(self.sidecar["clip_length"])
            self.frames_per_clip = int(self.sidecar.get("frames_per_clip", 1))
            self.features_dir = str(self.sidecar["features_dir"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataFormatError(f"missing or invalid field: {e}", path=sidecar) from None
        self.model_cfg = self.sidecar.get("model_cfg")
        self.backbone_config = dict(self.sidecar.get("backbone_config") or {})
        self.retriever_checkpoint = self._resolve_ckpt(self.sidecar.get("retriever_checkpoint"), sidecar)
        rows = read_videos_jsonl(self.features_dir)
        self._rows = {r["vid"]: r for r in rows if r.get("status") == "ok" and r.get("weights_id") == self.weights_id}
        self.store = NpzDirStore(os.path.join(self.features_dir, FEATURES_DIR), field="features")
        self.index = CorpusIndex.load(self.path_dir, verify=verify)
        self._vids = [v for v in self.index.vids if v in self._rows]
        missing = [v for v in self.index.vids if v not in self._rows]
        if missing:
            logger.warning("%d indexed videos have no features of %s in %s (e.g. %s); they are skipped",
                           len(missing), self.weights_id, self.features_dir, missing[0])
        self.ann = os.fspath(ann) if ann else None

    @staticmethod
    def _resolve_ckpt(p: Optional[str], sidecar: str) -> Optional[str]:
        if not p:
            return None
        for cand in (p, os.path.join(os.path.dirname(sidecar), p)):
            if os.path.isfile(cand):
                return os.path.abspath(cand)
        raise DataFormatError(f"the retriever checkpoint the index was built with is missing: {p}", path=sidecar,
                              field="retriever_checkpoint")

    @property
    def vids(self) -> List[str]:
        return list(self._vids)

    def __contains__(self, vid: object) -> bool:
        return vid in self._rows and vid in self.index

    def features(self, vid: str) -> np.ndarray:
        return np.asarray(self.store.get(vid), dtype=np.float32)

    def duration(self, vid: str) -> float:
        d = self._rows[vid].get("duration")
        if d is None or not d > 0:
            d = self.index.duration(vid) or (self.n_clips(vid) or 1) * self.clip_length
        return float(d)

    def n_clips(self, vid: str) -> Optional[int]:
        n = self._rows[vid].get("n_clips")
        return None if n is None else int(n)

    def path(self, vid: str) -> Optional[str]:
        return self._rows[vid].get("path")

    def captions(self, vid: str) -> Optional[List[Any]]:
        p = self.path(vid)
        return _sidecar_captions(p) if p else None

    def _annotation_files(self) -> List[str]:
        return [self.ann] if self.ann else []

    def stage1_index(self, retriever):
        if self._index_model is not retriever:
            from lavis_c2f.index.corpus_index import IndexMismatchError

            try:
                self.index.attach(retriever)
            except IndexMismatchError as e:
                hint = ("the index was built without a trained retriever (zero-shot); rebuild it with "
                        "'lavis-c2f index videos ... --checkpoint CKPT'" if not self.retriever_checkpoint else
                        f"it was built with {self.retriever_checkpoint}")
                raise ConfigError(f"the retriever does not match the index {self.path_dir}: {e} ({hint})") from None
            self._index_model = retriever
        return self.index


class DemoCorpus(_Corpus):
    """The embedded demo corpus as a searchable corpus: its ``clip_features/{vid}.npz`` are the
    videos (no decoding), its annotations the ground truth. The stage-1 index is built in memory
    with the given retriever on first use (about a second for the default 300 videos).

    Args:
        root: corpus folder (``corpus.json``).
        splits: restrict to the videos of these splits (default: all).
    """

    kind = "demo corpus"

    def __init__(self, root: PathLike, splits: Optional[Sequence[str]] = None):
        super().__init__()
        from lavis_c2f.data import demo_corpus as dc
        from lavis_c2f.data.features import NpzDirStore

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
        from lavis_c2f.common.io import read_jsonl

        out = []
        for s in ([split] if split else self.splits):
            out.extend(read_jsonl(os.path.join(self.root, "annotations", f"{s}.jsonl")))
        return out

    def zero_shot_rank(self, text_pooled, k, config):
        raise ConfigError(_DEMO_ZERO_SHOT)

    def stage1_index(self, retriever):
        if self._index_model is not retriever:
            from lavis_c2f.data.features import VideoFeatureLoader
            from lavis_c2f.index.corpus_index import CorpusIndex

            t0 = time.perf_counter()
            loader = VideoFeatureLoader([self.store], normalize=True, max_len=None, use_tef=False)
            self._workdir = tempfile.TemporaryDirectory(prefix="c2f-demo-index-")
            index = CorpusIndex.for_model(retriever, work_dir=self._workdir.name)
            index.add_features(self._vids, loader.load, self._durations, progress=False)
            self._index, self._index_model = index, retriever
            logger.info("demo corpus: stage-1 index of %d videos built in %.1f s", len(self._vids),
                        time.perf_counter() - t0)
        return self._index


_DEMO_ZERO_SHOT = ("the demo corpus's text and video features live in unrelated spaces (by construction), so "
                   "zero-shot scoring is at chance level there: give trained checkpoints (the run directory of "
                   "'lavis-c2f quickstart', or retriever and grounder checkpoints)")


def _sidecar_captions(video_path: str) -> Optional[List[Any]]:
    """Captions of ``<video>.srt`` / ``<stem>.srt`` beside the video (bad cues skipped), or None."""
    from lavis_c2f.video.captions import read_srt, sidecar_srt

    srt = sidecar_srt(video_path)
    if srt is None:
        return None
    return read_srt(srt, errors="skip")


def is_demo_corpus(path: PathLike) -> bool:
    """Whether ``path`` is a demo corpus folder (``corpus.json`` named ``c2f_demo``)."""
    from lavis_c2f.data.demo_corpus import read_corpus_meta

    return os.path.isdir(os.fspath(path)) and read_corpus_meta(os.fspath(path)) is not None


# =========================================================================== checkpoints


def _model_node(cfg: Any, where: str) -> Dict[str, Any]:
    """A model config from a YAML path (``model:`` node or bare) or a mapping."""
    from lavis_c2f.data.cfg import to_plain

    if isinstance(cfg, (str, os.PathLike)):
        from omegaconf import OmegaConf

        from lavis_c2f.paths import config_path, resolve_path

        path = resolve_path(cfg)
        if not os.path.isfile(path):
            try:
                path = config_path(cfg)
            except FileNotFoundError:
                raise FileNotFoundError(f"{where}: model YAML not found: {cfg}") from None
        node = to_plain(OmegaConf.load(path))
    else:
        node = to_plain(cfg)
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where}: expected a model mapping, got {type(node).__name__}")
    if isinstance(node.get("model"), Mapping):
        node = node["model"]
    return dict(node)


def load_retriever(checkpoint: Optional[PathLike], model_cfg: Any = None, device: str = "cpu",
                   where: str = "retriever_cfg"):
    """A T-MASS retriever in eval mode: built from ``model_cfg`` (a YAML path or mapping, merged
    over its ``model_type`` defaults) or else from the config stored in ``checkpoint`` (ours / the
    runner's), then the checkpoint's weights loaded strictly. ``checkpoint=None`` (``model_cfg``
    required) gives the freshly built model. ``where`` names ``model_cfg`` in errors."""
    import lavis_c2f.models.retriever  # noqa: F401  (registers c2f_tmass_retriever)
    from lavis_c2f.models.checkpoint_utils import load_checkpoint_file, load_checkpoint_weights
    from lavis_c2f.registry_utils import get, with_model_defaults

    path = os.fspath(checkpoint) if checkpoint is not None else None
    ck = load_checkpoint_file(path) if path is not None else None
    if model_cfg is not None:
        node = with_model_defaults(_model_node(model_cfg, where), "c2f_tmass_retriever")
    elif ck is None:
        raise ConfigError(f"{where}: a retriever needs a model YAML or a checkpoint that stores its config")
    else:
        stored = ck.get("config")
        if not isinstance(stored, Mapping):
            raise ConfigError(f"{path}: the checkpoint stores no model config; pass {where} (the model YAML "
                              "it was trained with)")
        node = dict(stored["model"]) if isinstance(stored.get("model"), Mapping) else dict(stored)
    arch = node.get("arch", "c2f_tmass_retriever")
    cls = get("model", arch)
    if not hasattr(cls, "fingerprint"):
        raise ConfigError(f"{path or where}: arch '{arch}' is not a stage-1 retriever")
    model = cls.from_config(node)
    if ck is not None:
        load_checkpoint_weights(model, ck, source=path, strict=True)
    return model.to(device).eval()


GROUNDER_ARCHS = ("c2f_qd_detr", "c2f_mesm_qd_detr")


def load_grounder(checkpoint: PathLike, model_cfg: Any = None, device: str = "cpu", trusted: bool = False):
    """A stage-2 grounder from a checkpoint: ours / the runner's (config stored with the
    weights), an official QD-DETR or MESM one (``{"model", "opt"}``, told apart by
    :func:`~lavis_c2f.models.grounder.checkpoint.grounder_checkpoint_kind` and built with
    :func:`~lavis_c2f.models.grounder.checkpoint.load_official_grounder`), or a bare state dict
    with ``model_cfg``. Returns ``(model, postprocess)`` in eval mode."""
    from lavis_c2f.models.grounder.checkpoint import load_official_grounder, read_checkpoint
    from lavis_c2f.models.grounder.postprocess import PostProcessConfig
    from lavis_c2f.registry_utils import get

    path = os.fspath(checkpoint)
    _state, config, kind = read_checkpoint(path, trusted=trusted)
    if kind.startswith("official_"):
        detr = load_official_grounder(path, trusted=trusted)
        # user videos have any length: clamp to the duration (not the official 150 s), NMS duplicates
        return detr.to(device).eval(), PostProcessConfig(nms_threshold=0.7)
    if model_cfg is not None:
        node = _model_node(model_cfg, "grounder_cfg")
        arch = node.get("arch", "c2f_qd_detr")
    elif kind == "ours":
        node = None
        arch = config.get("arch") or "c2f_qd_detr"
    else:
        raise ConfigError(f"{path}: a bare state dict without a model config; pass grounder_cfg (the model YAML)")
    if arch not in GROUNDER_ARCHS:
        raise ConfigError(f"{path}: arch '{arch}' is not a stage-2 grounder (expected one of {GROUNDER_ARCHS})")
    cls = get("model", arch)
    if node is None:
        model = cls.from_checkpoint(path, trusted=trusted)
    else:
        model = cls.from_config({k: v for k, v in node.items()})
        model.load_checkpoint(path, strict=True, trusted=trusted)
    return model.to(device).eval(), model.postprocess


# =========================================================================== predictor


@dataclass
class _Query:
    text: str
    tokens: np.ndarray   # (T, Dt)
    pooled: np.ndarray   # (D,)


class C2FPredictor:
    """Coarse-to-fine moment search over an index, and grounding in single videos (module doc).

    Build it with :meth:`from_checkpoints`, :meth:`from_config` or :meth:`for_demo_corpus`.

    Args:
        text_encoder: ``encode_text(list[str]) -> [obj with tokens (T, Dt), pooled (D,)]`` with
            ``weights_id`` (a feature backbone or the demo text encoder).
        backbone: the :class:`~lavis_c2f.video.backbones.FeatureBackbone` that encodes video
            files (None for the demo corpus, whose videos are feature files).
        corpus: what :meth:`search` searches (a :class:`VideoIndexCorpus` / :class:`DemoCorpus`).
        retriever: trained stage-1 model (None: zero-shot stage 1).
        grounder: trained stage-2 model (None: zero-shot stage 2).
        grounder_postprocess: post-processing of the grounder (default: the model's).
        refiner: stage 3: a ``CaptionRefiner``, its config (mapping or YAML path), or None.
        fusion: :class:`FusionConfig` (or mapping) of stage-1/stage-2 fusion.
        zero_shot: :class:`~lavis_c2f.search.zero_shot.ZeroShotConfig` (or mapping).
        stage1_top_k: videos grounded per query in :meth:`search`.
        clip_length, frames_per_clip: clip sampling of :meth:`encode_video`.
        refine_videos: videos whose windows stage 3 refines per search (the best ones).
        decode_backend: decoder of :meth:`encode_video`.
        device: where the models run.
    """

    def __init__(self, *, text_encoder, backbone=None, corpus: Optional[_Corpus] = None, retriever=None,
                 grounder=None, grounder_postprocess=None, refiner: Any = None, fusion: Any = None,
                 zero_shot: Any = None, stage1_top_k: int = 10, clip_length: float = 2.0, frames_per_clip: int = 1,
                 refine_videos: int = 3, decode_backend: str = "auto", device: str = "cpu",
                 sources: Optional[Dict[str, Any]] = None):
        if text_encoder is None:
            raise ConfigError("C2FPredictor needs a text encoder (a feature backbone or the demo text encoder)")
        if int(stage1_top_k) < 1:
            raise ConfigError(f"stage1_top_k must be >= 1, got {stage1_top_k}")
        if not clip_length > 0 or int(frames_per_clip) < 1:
            raise ConfigError(f"clip_length must be > 0 and frames_per_clip >= 1, got {clip_length}, {frames_per_clip}")
        self.text_encoder, self.backbone, self.corpus = text_encoder, backbone, corpus
        self.retriever, self.grounder = retriever, grounder
        self.fusion = fusion if isinstance(fusion, FusionConfig) else FusionConfig.from_mapping(fusion)
        self.zero_shot = (zero_shot if isinstance(zero_shot, zs.ZeroShotConfig)
                          else zs.ZeroShotConfig.from_mapping(zero_shot))
        self.stage1_top_k = int(stage1_top_k)
        self.clip_length, self.frames_per_clip = float(clip_length), int(frames_per_clip)
        self.refine_videos = int(refine_videos)
        self.decode_backend = decode_backend
        self.device = device
        self.sources = dict(sources or {})
        self._refiner_cfg, self._refiner = (None, refiner) if _is_refiner(refiner) else (refiner, None)
        self._grounder_postprocess = grounder_postprocess
        self._gpreds: Dict[float, Any] = {}
        self._text_cache: Dict[str, _Query] = {}
        self.features_id = corpus.weights_id if backbone is None and corpus is not None else text_encoder.weights_id
        self.video_dim = int(backbone.dim) if backbone is not None else int(getattr(corpus, "dim", 0))
        self._check_dims()
        if corpus is not None and retriever is not None:
            corpus.stage1_index(retriever)
        logger.info("C2FPredictor: %s", self.describe_mode())

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoints(cls, retriever_ckpt: Optional[PathLike] = None, grounder_ckpt: Optional[PathLike] = None,
                         backbone: Any = "offline", backbone_cfg: Optional[Mapping[str, Any]] = None,
                         index: Optional[PathLike] = None, refiner: Any = None, device: str = "auto", *,
                         retriever_cfg: Any = None, grounder_cfg: Any = None, fusion: Any = None,
                         zero_shot: Any = None, stage1_top_k: int = 10, clip_length: Optional[float] = None,
                         frames_per_clip: Optional[int] = None, ann: Optional[PathLike] = None,
                         verify_index: bool = True, trusted: bool = False, refine_videos: int = 3,
                         decode_backend: str = "auto") -> "C2FPredictor":
        """A predictor for video files (and an index of them).

        Args:
            retriever_ckpt: trained T-MASS checkpoint (default: the one the index was built with,
                if any; else zero-shot stage 1).
            grounder_ckpt: trained grounder checkpoint (ours, the runner's, or official
                QD-DETR); None: zero-shot stage 2.
            backbone: ``offline`` | ``clip_hf`` | ``clip_lavis`` | ``random`` or a built
                :class:`~lavis_c2f.video.backbones.FeatureBackbone`.
            backbone_cfg: its config (``clip_path``, ``checkpoint``, ``dim``...).
            index: an index folder of ``lavis-c2f index videos`` (needed by :meth:`search`).
            refiner: stage 3 (a ``CaptionRefiner`` or its config); None: off.
            retriever_cfg / grounder_cfg: model YAMLs when a checkpoint stores no config.
            fusion: :class:`FusionConfig` or mapping (default: product, w = 1, z-score).
            clip_length, frames_per_clip: clip sampling (default: the index's, else 2 s / 1).
            ann: annotation file of the indexed videos (ground truth for plots).
            trusted: allow full unpickling of checkpoints (only for files you trust).
        """
        from lavis_c2f.video.backbones import FeatureBackbone, build_backbone

        dev = resolve_device(device)
        corpus = None
        if index is not None:
            if is_demo_corpus(index):
                raise ConfigError(f"{index} is a demo corpus: use C2FPredictor.for_demo_corpus (CLI: --demo-corpus)")
            corpus = VideoIndexCorpus(index, ann=ann, verify=verify_index)
        if isinstance(backbone, FeatureBackbone):
            if backbone_cfg:
                raise ConfigError("backbone_cfg is only used when the backbone is given by name")
            bb = backbone
        else:
            if backbone_cfg is None and corpus is not None and corpus.backbone_name in (
                    str(backbone), f"c2f_feature_{backbone}"):
                backbone_cfg = corpus.backbone_config  # the index's own encoder settings (clip_path, ...)
            bb = build_backbone(str(backbone), config={**dict(backbone_cfg or {}), "device": dev})
        if corpus is not None:
            if bb.weights_id != corpus.weights_id:
                raise ConfigError(f"the index {corpus.path_dir} was built with the {corpus.backbone_name} backbone "
                                  f"({corpus.weights_id}) but the predictor's backbone is {bb.name} ({bb.weights_id}):"
                                  " queries must be encoded by the encoder of the index (same backbone, weights and "
                                  "settings)")
            for name, given, have in (("clip_length", clip_length, corpus.clip_length),
                                      ("frames_per_clip", frames_per_clip, corpus.frames_per_clip)):
                if given is not None and float(given) != float(have):
                    raise ConfigError(f"{name}={given} but the index was extracted with {name}={have}")
            clip_length, frames_per_clip = corpus.clip_length, corpus.frames_per_clip
            if retriever_ckpt is None and corpus.retriever_checkpoint:
                retriever_ckpt = corpus.retriever_checkpoint
                logger.info("using the retriever the index was built with: %s", retriever_ckpt)
            if (retriever_cfg is None and corpus.model_cfg and corpus.retriever_checkpoint and retriever_ckpt
                    and os.path.exists(os.fspath(retriever_ckpt))
                    and os.path.samefile(os.fspath(retriever_ckpt), corpus.retriever_checkpoint)):
                retriever_cfg = corpus.model_cfg  # the model YAML the index was built with
        retriever = load_retriever(retriever_ckpt, retriever_cfg, dev) if retriever_ckpt else None
        grounder, post = load_grounder(grounder_ckpt, grounder_cfg, dev, trusted) if grounder_ckpt else (None, None)
        return cls(text_encoder=bb, backbone=bb, corpus=corpus, retriever=retriever, grounder=grounder,
                   grounder_postprocess=post, refiner=refiner, fusion=fusion, zero_shot=zero_shot,
                   stage1_top_k=stage1_top_k, clip_length=clip_length if clip_length is not None else 2.0,
                   frames_per_clip=frames_per_clip if frames_per_clip is not None else 1,
                   refine_videos=refine_videos, decode_backend=decode_backend, device=dev,
                   sources={"retriever": retriever_ckpt and os.fspath(retriever_ckpt),
                            "grounder": grounder_ckpt and os.fspath(grounder_ckpt),
                            "index": index and os.fspath(index)})

    @classmethod
    def for_demo_corpus(cls, run: Any = None, corpus_root: Optional[PathLike] = None, *,
                        retriever_ckpt: Optional[PathLike] = None, grounder_ckpt: Optional[PathLike] = None,
                        retriever_cfg: Any = None, grounder_cfg: Any = None, fusion: Any = None,
                        splits: Optional[Sequence[str]] = None, stage1_top_k: int = 10, refiner: Any = None,
                        device: str = "auto", trusted: bool = False) -> "C2FPredictor":
        """A predictor over the embedded demo corpus with trained checkpoints.

        Args:
            run: the run directory of ``lavis-c2f quickstart`` (its ``summary.json`` names the
                checkpoints, ``fusion.json`` the tuned fusion, ``corpus/`` the corpus), or a
                mapping ``{"stage1": ckpt, "stage2": ckpt}``, or None (then pass the checkpoints).
            corpus_root: the demo corpus (default: ``RUN/corpus``, else the default demo root).
            retriever_ckpt, grounder_ckpt: override the run's checkpoints.
            fusion: override the run's tuned fusion.
            splits: search only the videos of these splits (default: all).
        The text encoder is :class:`~lavis_c2f.data.demo_text.DemoTextEncoder`; the "videos"
        are the corpus's feature files. Zero-shot mode is refused (see the module docstring).
        """
        from lavis_c2f.data.demo_corpus import default_demo_root
        from lavis_c2f.data.demo_text import DemoTextEncoder

        dev = resolve_device(device)
        ckpts: Dict[str, Optional[str]] = {"stage1": None, "stage2": None}
        run_dir = None
        if isinstance(run, Mapping):
            ckpts.update({k: run.get(k) for k in ("stage1", "stage2")})
        elif run is not None:
            run_dir = os.path.abspath(os.fspath(run))
            ckpts.update(_quickstart_checkpoints(run_dir))
        ckpts["stage1"] = os.fspath(retriever_ckpt) if retriever_ckpt else ckpts["stage1"]
        ckpts["stage2"] = os.fspath(grounder_ckpt) if grounder_ckpt else ckpts["stage2"]
        missing = [k for k, v in ckpts.items() if not v]
        if missing:
            raise ConfigError(f"demo corpus search needs trained checkpoints (missing {' and '.join(missing)}): "
                              + _DEMO_ZERO_SHOT)
        if corpus_root is None:
            cand = os.path.join(run_dir, "corpus") if run_dir else None
            corpus_root = cand if cand and os.path.isdir(cand) else default_demo_root()
        if fusion is None and run_dir and os.path.isfile(os.path.join(run_dir, "fusion.json")):
            fusion = load_fusion_choice(os.path.join(run_dir, "fusion.json"))
        corpus = DemoCorpus(corpus_root, splits=splits)
        enc = DemoTextEncoder.from_corpus(corpus.root)
        retriever = load_retriever(ckpts["stage1"], retriever_cfg, dev)
        grounder, post = load_grounder(ckpts["stage2"], grounder_cfg, dev, trusted)
        return cls(text_encoder=enc, backbone=None, corpus=corpus, retriever=retriever, grounder=grounder,
                   grounder_postprocess=post, refiner=refiner, fusion=fusion, stage1_top_k=stage1_top_k,
                   clip_length=corpus.clip_length, device=dev,
                   sources={"retriever": ckpts["stage1"], "grounder": ckpts["stage2"], "demo_corpus": corpus.root,
                            "run": run_dir})

    CONFIG_KEYS = ("retriever_ckpt", "grounder_ckpt", "retriever_cfg", "grounder_cfg", "backbone", "backbone_cfg",
                   "index", "ann", "demo_corpus", "run_dir", "splits", "refiner", "device", "fusion", "zero_shot",
                   "stage1_top_k", "clip_length", "frames_per_clip", "trusted", "verify_index", "refine_videos",
                   "decode_backend")

    @classmethod
    def from_config(cls, cfg: Optional[Mapping[str, Any]]) -> "C2FPredictor":
        """From a mapping with the keys of :attr:`CONFIG_KEYS` (unknown keys raise
        :class:`ConfigError`). ``demo_corpus`` / ``run_dir`` select :meth:`for_demo_corpus`
        (then the backbone keys must be absent); otherwise :meth:`from_checkpoints`."""
        from lavis_c2f.data.cfg import check_keys

        d = check_keys(cfg, cls.CONFIG_KEYS, "predictor")
        if d.get("demo_corpus") or d.get("run_dir"):
            bad = sorted(k for k in ("backbone", "backbone_cfg", "index", "ann", "zero_shot", "clip_length",
                                     "frames_per_clip", "verify_index", "decode_backend", "refine_videos") if k in d)
            if bad:
                raise ConfigError(f"predictor: {bad} are not used with demo_corpus / run_dir")
            return cls.for_demo_corpus(d.get("run_dir"), d.get("demo_corpus"), retriever_ckpt=d.get("retriever_ckpt"),
                                       grounder_ckpt=d.get("grounder_ckpt"), retriever_cfg=d.get("retriever_cfg"),
                                       grounder_cfg=d.get("grounder_cfg"), fusion=d.get("fusion"),
                                       splits=d.get("splits"), stage1_top_k=int(d.get("stage1_top_k", 10)),
                                       refiner=d.get("refiner"), device=d.get("device", "auto"),
                                       trusted=bool(d.get("trusted", False)))
        if "splits" in d:
            raise ConfigError("predictor.splits is only used with demo_corpus")
        return cls.from_checkpoints(d.get("retriever_ckpt"), d.get("grounder_ckpt"), d.get("backbone", "offline"),
                                    d.get("backbone_cfg"), d.get("index"), d.get("refiner"), d.get("device", "auto"),
                                    retriever_cfg=d.get("retriever_cfg"), grounder_cfg=d.get("grounder_cfg"),
                                    fusion=d.get("fusion"), zero_shot=d.get("zero_shot"),
                                    stage1_top_k=int(d.get("stage1_top_k", 10)), clip_length=d.get("clip_length"),
                                    frames_per_clip=d.get("frames_per_clip"), ann=d.get("ann"),
                                    verify_index=bool(d.get("verify_index", True)),
                                    trusted=bool(d.get("trusted", False)),
                                    refine_videos=int(d.get("refine_videos", 3)),
                                    decode_backend=d.get("decode_backend", "auto"))

    # ------------------------------------------------------------------ checks and mode
    def _check_dims(self) -> None:
        enc = self.text_encoder
        who = f"the {getattr(enc, 'name', type(enc).__name__)} encoder"
        pooled_dim = int(getattr(enc, "dim", 0))
        token_dim = int(getattr(enc, "text_dim", pooled_dim))
        if self.retriever is not None:
            r = self.retriever
            if int(r.video_input_dim) != self.video_dim:
                raise ConfigError(f"the retriever expects {r.video_input_dim}-d clip features (video_input_dim) but "
                                  f"{self._video_source()} gives {self.video_dim}-d features: use a retriever trained "
                                  "on features of this backbone")
            if int(r.text_input_dim) != pooled_dim:
                raise ConfigError(f"the retriever expects {r.text_input_dim}-d query features (text_input_dim) but "
                                  f"{who} gives {pooled_dim}-d sentence embeddings")
            if r.use_frame_word and token_dim != int(r.text_input_dim):
                raise ConfigError(f"the retriever's frame-word level needs {r.text_input_dim}-d token features but "
                                  f"{who} gives {token_dim}-d tokens")
        if self.grounder is not None:
            detr = getattr(self.grounder, "detr", self.grounder)
            vd, td = int(detr.vid_dim), int(detr.txt_dim)
            if vd not in (self.video_dim, self.video_dim + 2):
                raise ConfigError(f"the grounder expects {vd}-d clip features (vid_dim, TEF columns included) but "
                                  f"{self._video_source()} gives {self.video_dim}-d features (+2 TEF = "
                                  f"{self.video_dim + 2}): use a grounder trained on features of this backbone")
            if getattr(detr, "text_encoder", None) is None and td != token_dim:
                raise ConfigError(f"the grounder expects {td}-d query token features (txt_dim) but {who} gives "
                                  f"{token_dim}-d tokens")

    def _video_source(self) -> str:
        if self.backbone is not None:
            return f"the {self.backbone.name} backbone"
        return f"the {getattr(self.corpus, 'kind', 'corpus')}"

    @property
    def mode(self) -> Dict[str, str]:
        """``{"stage1": "trained" | "zero-shot", "stage2": ..., "stage3": "on" | "off"}``."""
        return {"stage1": "trained" if self.retriever is not None else "zero-shot",
                "stage2": "trained" if self.grounder is not None else "zero-shot",
                "stage3": "on" if (self._refiner is not None or self._refiner_cfg is not None) else "off"}

    def describe_mode(self, stages: Sequence[str] = ("stage1", "stage2", "stage3")) -> str:
        """One line saying what each stage runs (``stages``: which of stage1, stage2, stage3)."""
        name = getattr(self.text_encoder, "name", "encoder")
        if self.retriever is not None:
            s1 = f"trained T-MASS retriever ({self.sources.get('retriever') or 'given model'})"
        else:
            how = "max" if self.zero_shot.video_score == "max" else f"top-{self.zero_shot.video_topk} mean"
            s1 = f"ZERO-SHOT (cosine of the {name} text embedding with each clip, {how} per video)"
        if self.grounder is not None:
            arch = (getattr(self.grounder, "config", {}) or {}).get("arch") or type(self.grounder).__name__
            s2 = f"trained {arch} ({self.sources.get('grounder') or 'given model'})"
        else:
            s2 = "ZERO-SHOT (smoothed similarity curve, thresholded into windows)"
        s3 = "caption refiner" if self.mode["stage3"] == "on" else "off"
        parts = {"stage1": f"stage 1: {s1}", "stage2": f"stage 2: {s2}", "stage3": f"stage 3: {s3}"}
        return " | ".join(parts[k] for k in stages)

    # ------------------------------------------------------------------ encoders
    def encode_query(self, query: str) -> _Query:
        """Token features (T, Dt) and pooled embedding (D,) of a query (cached)."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        q = " ".join(query.split())
        if not q:
            raise ValueError("the query is empty")
        if q not in self._text_cache:
            tf = self.text_encoder.encode_text([q])[0]
            if len(self._text_cache) > 256:
                self._text_cache.clear()
            self._text_cache[q] = _Query(q, np.asarray(tf.tokens, np.float32), np.asarray(tf.pooled, np.float32))
        return self._text_cache[q]

    def encode_video(self, path: PathLike, vid: Optional[str] = None, captions: bool = True,
                     progress: Optional[Callable[[int, int], None]] = None) -> EncodedVideo:
        """Decode ``path`` into clips of :attr:`clip_length` seconds (``frames_per_clip`` frames
        each) and encode them with the backbone. ``captions``: read ``<video>.srt`` beside it.
        ``progress(clips_done, clips_total)`` is called after each batch of clips (the web demo's
        progress bar). Raises :class:`~lavis_c2f.video.decode.VideoDecodeError` for unreadable files."""
        from lavis_c2f.video.decode import _require_video, iter_clip_batches, probe

        if self.backbone is None:
            raise ConfigError("this predictor has no video backbone (its videos are the demo corpus's feature "
                              "files): use predictor.video(vid)")
        p = os.path.abspath(os.fspath(path))
        info = probe(p)
        _require_video(info)
        total = info.n_clips(self.clip_length)
        feats = []
        for b in iter_clip_batches(info, self.clip_length, self.frames_per_clip, self.backbone.decode_size,
                                   batch_clips=64 if progress is None else 16, backend=self.decode_backend):
            feats.append(self.backbone.encode_clips(b.frames))
            if progress is not None:
                progress(min(int(b.start) + int(b.frames.shape[0]), total), total)
        f = np.concatenate(feats, 0).astype(np.float32) if feats else np.zeros((0, self.backbone.dim), np.float32)
        return EncodedVideo(vid=vid or os.path.splitext(os.path.basename(p))[0], features=f,
                            duration=float(info.duration), clip_length=self.clip_length,
                            weights_id=self.backbone.weights_id, backbone=self.backbone.name, path=p,
                            captions=_sidecar_captions(p) if captions else None)

    def video(self, vid: str) -> EncodedVideo:
        """An :class:`EncodedVideo` of the searched corpus (features read from the index's
        feature folder or the demo corpus)."""
        if self.corpus is None:
            raise ConfigError("this predictor has no index: pass index=... (or use encode_video)")
        return self.corpus.encoded(vid)

    # ------------------------------------------------------------------ stage 2
    def _grounder_predictor(self, clip_length: float):
        key = float(clip_length)
        if key not in self._gpreds:
            from lavis_c2f.models.grounder.predictor import GrounderPredictor

            self._gpreds[key] = GrounderPredictor(self.grounder, clip_length=key, postprocess=self._grounder_postprocess,
                                                  stream_dims=[self.video_dim], device=None)
        return self._gpreds[key]

    def _grounder_query(self, q: _Query):
        detr = getattr(self.grounder, "detr", self.grounder)
        if getattr(detr, "text_encoder", None) is not None:
            return q.text
        # the datasets cut queries to max_q_l tokens; SS-MESM appends one reconstruction token
        limit = int(getattr(detr, "max_q_l", 0) or q.tokens.shape[0]) - (1 if getattr(detr, "rec_ss", False) else 0)
        return q.tokens[: max(1, limit)]

    def _ground_trained(self, q: _Query, videos: Sequence[Tuple[np.ndarray, float]], clip_length: float
                        ) -> List[Dict[str, Any]]:
        """Windows + saliency of one query in several videos, chunking long ones (module doc)."""
        gp = self._grounder_predictor(clip_length)
        max_len = int(gp.max_v_l)
        chunks, durs, owner = [], [], []
        for vi, (feats, duration) in enumerate(videos):
            n = feats.shape[0]
            if n == 0:
                raise ValueError("a video has no clips")
            starts = [0]
            if n > max_len:
                stride = max(1, max_len // 2)
                starts = list(range(0, n - max_len + 1, stride))
                if starts[-1] + max_len < n:
                    starts.append(n - max_len)
            for s in starts:
                part = feats[s:s + max_len]
                chunks.append(part)
                durs.append(max(1e-3, min(part.shape[0] * clip_length, duration - s * clip_length)))
                owner.append((vi, s))
        preds = gp.predict_many(self._grounder_query(q), chunks, durs)
        nms = gp.postprocess.nms_threshold if gp.postprocess.nms_threshold is not None else 0.7
        out = []
        for vi, (feats, duration) in enumerate(videos):
            n = feats.shape[0]
            sal_sum, sal_cnt = np.zeros(n, np.float64), np.zeros(n, np.float64)
            rows: List[List[float]] = []
            parts = [(s, p) for (o, s), p in zip(owner, preds) if o == vi]
            for s, p in parts:
                off = s * clip_length
                rows.extend([min(a + off, duration), min(b + off, duration), float(sc)] for a, b, sc in p["windows"])
                sal = np.asarray(p["saliency"], np.float64)
                sal_sum[s:s + len(sal)] += sal
                sal_cnt[s:s + len(sal)] += 1
            rows.sort(key=lambda r: -r[2])
            rows = _distinct_windows(rows)
            if len(parts) > 1:
                rows = zs.nms_rows(rows, float(nms), max_keep=max(10, len(rows)))
            sal = np.where(sal_cnt > 0, sal_sum / np.maximum(sal_cnt, 1), 0.0).astype(np.float32)
            out.append({"windows": rows, "saliency": sal})
        return out

    def _ground(self, q: _Query, videos: Sequence[EncodedVideo]) -> List[Dict[str, Any]]:
        if not videos:
            return []
        if self.grounder is not None:
            res: List[Optional[Dict[str, Any]]] = [None] * len(videos)
            by_cl: Dict[float, List[int]] = {}
            for i, v in enumerate(videos):
                by_cl.setdefault(float(v.clip_length), []).append(i)
            for cl, idx in by_cl.items():
                for i, r in zip(idx, self._ground_trained(q, [(videos[i].features, videos[i].duration) for i in idx], cl)):
                    res[i] = r
            return res  # type: ignore[return-value]
        self._require_zero_shot()
        return [zs.ground(q.pooled, v.features, v.clip_length, v.duration, self.zero_shot) for v in videos]

    def _require_zero_shot(self) -> None:
        if isinstance(self.corpus, DemoCorpus) or self.backbone is None:
            raise ConfigError(_DEMO_ZERO_SHOT)

    # ------------------------------------------------------------------ stage 3
    def _get_refiner(self):
        if self._refiner is None and self._refiner_cfg is not None:
            from lavis_c2f.models.refiner.hook import CaptionRefiner

            cfg = self._refiner_cfg
            if isinstance(cfg, (str, os.PathLike)):
                from omegaconf import OmegaConf

                from lavis_c2f.data.cfg import to_plain
                from lavis_c2f.paths import resolve_path

                path = resolve_path(cfg)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"refiner config not found: {path}")
                node = to_plain(OmegaConf.load(path))
                cfg = node.get("refiner", node) if isinstance(node, Mapping) else node
            self._refiner = CaptionRefiner.from_config(cfg)
        return self._refiner

    def _refine(self, q: _Query, video: EncodedVideo, windows: List[List[float]]) -> List[List[float]]:
        refiner = self._get_refiner()
        if refiner is None:
            raise ConfigError("stage 3 is not configured: pass refiner=... (a CaptionRefiner or its config)")
        if not video.path:
            raise ConfigError(f"stage 3 needs the video file of {video.vid} (the refiner looks at frames); "
                              f"the {getattr(self.corpus, 'kind', 'video')} has none")
        return refiner.refine(q.text, float(video.duration), windows, video_path=video.path,
                              captions=video.captions or None, vid=video.vid)

    # ------------------------------------------------------------------ API
    def predict(self, query: str, video: EncodedVideo, top_k: int = 5, refine: Optional[bool] = None) -> Moments:
        """Moments of ``query`` in one video (stage 2, then stage 3 when enabled).

        Args:
            query: text.
            video: from :meth:`encode_video` (same backbone) or :meth:`video`.
            top_k: windows returned.
            refine: run stage 3 (default: when a refiner is configured).
        """
        if not isinstance(video, EncodedVideo):
            raise TypeError(f"video must be an EncodedVideo (from encode_video or video()), got {type(video).__name__}")
        if video.weights_id != self.features_id:
            raise ValueError(f"video {video.vid!r} was encoded by {video.backbone or 'another encoder'} "
                             f"({video.weights_id}) but this predictor uses {self.features_id}: encode it with "
                             "this predictor's encode_video")
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if video.n_clips == 0:
            raise ValueError(f"video {video.vid!r} has no clips")
        q = self.encode_query(query)
        r = self._ground(q, [video])[0]
        windows = [list(map(float, w)) for w in r["windows"]][: int(top_k)]
        refined = False
        if refine or (refine is None and self.mode["stage3"] == "on"):
            windows = [list(map(float, w)) for w in self._refine(q, video, windows)][: int(top_k)]
            refined = True
        return Moments(query=q.text, vid=video.vid, duration=float(video.duration), clip_length=video.clip_length,
                       windows=windows, saliency=np.asarray(r["saliency"], np.float32), mode=self.mode["stage2"],
                       refined=refined)

    def stage1(self, query: str, k: Optional[int] = None) -> List[Tuple[str, float]]:
        """Stage 1 alone: the ``k`` best videos of the index ``[(vid, score), ...]``."""
        if self.corpus is None:
            raise ConfigError("search needs an index: build one with 'lavis-c2f index videos VIDEO_DIR --out INDEX' "
                              "and pass index=INDEX (or use C2FPredictor.for_demo_corpus)")
        q = self.encode_query(query)
        return self._stage1(q, int(k or self.stage1_top_k))

    def _stage1(self, q: _Query, k: int) -> List[Tuple[str, float]]:
        if self.retriever is None:
            self._require_zero_shot()
            return self.corpus.zero_shot_rank(q.pooled, k, self.zero_shot)
        r = self.retriever
        tok = _l2(q.tokens) if q.tokens.shape[-1] == int(r.text_input_dim) else None
        with torch.no_grad():
            emb = r.encode_text(None if tok is None else torch.from_numpy(tok)[None],
                                None if tok is None else torch.ones(1, tok.shape[0]),
                                torch.from_numpy(_l2(q.pooled))[None])
        return self.corpus.stage1_index(r).search(emb, k=k)[0]

    def search(self, query: str, top_k: int = 10, stage1_top_k: Optional[int] = None,
               refine: Optional[bool] = None) -> SearchResults:
        """Moments of ``query`` in the whole index, best first (``list[Moment]`` with context).

        Args:
            top_k: moments returned.
            stage1_top_k: videos grounded (default :attr:`stage1_top_k`).
            refine: run stage 3 on the best :attr:`refine_videos` videos (default: when a
                refiner is configured).
        """
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        t0 = time.perf_counter()
        if self.corpus is None:
            raise ConfigError("search needs an index: build one with 'lavis-c2f index videos VIDEO_DIR --out INDEX' "
                              "and pass index=INDEX (or use C2FPredictor.for_demo_corpus)")
        q = self.encode_query(query)
        t1 = time.perf_counter()
        ranked = self._stage1(q, int(stage1_top_k or self.stage1_top_k))
        t2 = time.perf_counter()
        videos = [self.corpus.encoded(v) for v, _ in ranked]
        grounded = self._ground(q, videos)
        t3 = time.perf_counter()
        windows = {v.vid: [list(map(float, w)) for w in g["windows"]] for v, g in zip(videos, grounded)}
        cands = [[vid, s1, windows[vid]] for vid, s1 in ranked]
        fused = fuse_candidates(cands, self.fusion)
        refined: set = set()
        timings = {"encode_query_s": t1 - t0, "stage1_s": t2 - t1, "stage2_s": t3 - t2}
        if refine or (refine is None and self.mode["stage3"] == "on"):
            order = list(dict.fromkeys(m[0] for m in fused))[: self.refine_videos]
            by_vid = {v.vid: v for v in videos}
            for vid in order:
                windows[vid] = [list(map(float, w)) for w in self._refine(q, by_vid[vid], windows[vid])]
                refined.add(vid)
            fused = fuse_candidates([[vid, s1, windows[vid]] for vid, s1 in ranked], self.fusion)
            timings["stage3_s"] = time.perf_counter() - t3
        s1_of = dict(ranked)
        s2_of = {(vid, round(w[0], 6), round(w[1], 6)): w[2] for vid, ws in windows.items() for w in ws}
        moments = []
        for rank, (vid, st, ed, score) in enumerate(fused[: int(top_k)], start=1):
            moments.append(Moment(vid=vid, start=float(st), end=float(ed), score=float(score), rank=rank,
                                  stage1_score=float(s1_of[vid]), stage2_score=s2_of.get((vid, round(st, 6), round(ed, 6))),
                                  duration=float(self.corpus.duration(vid)), path=self.corpus.path(vid),
                                  refined=vid in refined))
        details = {v.vid: Moments(query=q.text, vid=v.vid, duration=float(v.duration), clip_length=v.clip_length,
                                  windows=windows[v.vid], saliency=np.asarray(g["saliency"], np.float32),
                                  mode=self.mode["stage2"], refined=v.vid in refined)
                   for v, g in zip(videos, grounded)}
        timings["total_s"] = time.perf_counter() - t0
        return SearchResults(moments, query=q.text, mode=self.mode, stage1=ranked, details=details, timings=timings)

    def ground_truth(self, query: str) -> List[Tuple[str, List[List[float]]]]:
        """Annotated ``[(vid, windows), ...]`` of a query of the corpus (exact text match), if any."""
        return [] if self.corpus is None else self.corpus.ground_truth(query)


def _distinct_windows(rows: List[List[float]]) -> List[List[float]]:
    """Rows (best first) without empty windows (``end <= start``, which clip snapping can
    produce) and without repeats of a span already listed."""
    seen, out = set(), []
    for r in rows:
        key = (round(r[0], 6), round(r[1], 6))
        if r[1] > r[0] and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _is_refiner(obj: Any) -> bool:
    return obj is not None and hasattr(obj, "refine") and callable(getattr(obj, "refine"))


def _quickstart_checkpoints(run_dir: str) -> Dict[str, Optional[str]]:
    """Stage-1 / stage-2 checkpoints of a quickstart run directory (``summary.json``, else the
    runs' ``checkpoint_best.pth``)."""
    from lavis_c2f.common.io import read_json

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"quickstart run directory not found: {run_dir}")
    summary = os.path.join(run_dir, "summary.json")
    out: Dict[str, Optional[str]] = {"stage1": None, "stage2": None}
    if os.path.isfile(summary):
        ck = read_json(summary).get("checkpoints") or {}
        out.update({k: ck.get(k) for k in out})
    for key, job in (("stage1", "stage1"), ("stage2", "stage2")):
        if not out[key]:
            cand = os.path.join(run_dir, "runs", job, "checkpoint_best.pth")
            out[key] = cand if os.path.isfile(cand) else None
    for key, p in out.items():
        if p and not os.path.isfile(p):
            raise FileNotFoundError(f"{summary}: the {key} checkpoint {p} does not exist")
    return out


__all__ = ["C2FPredictor", "DemoCorpus", "EncodedVideo", "Moment", "Moments", "SearchResults", "VideoIndexCorpus",
           "is_demo_corpus", "load_grounder", "load_retriever", "resolve_device"]
