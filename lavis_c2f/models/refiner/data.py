"""Refiner data: frame sources, the refiner datasets + collaters, and the ``c2f_refiner`` builder.

CALCE (``variant: calce``, :class:`CalceDataset`)
------------------------------------------------
Per query: ``n_frms`` frames of the **whole** video by CALCE's ``head`` sampling (frame indices
``linspace(0, vlen, n + 1).astype(int)[:n]``, ``n = min(n_frms, vlen)``; the ``train`` split
gets CALCE's random resized crop, ``train_crop``), their times (stage 1:
``idx / fps``; stage 2: rounded to 2 decimals, as CALCE's two datasets do), the query's
``items`` (``items: annotation``: every record must carry them, else an error naming the record;
``items: none``: the explicit no-items prompt ``Items: \n``), the ``.srt`` text of the video
(``captions/<vid>.srt``; none = no speech) and, in stage 2, the coarse windows: from
``stage2_predictions`` (official prediction rows, e.g. CALCE stage 1's or our grounder's,
merged by qid; ``n_coarse`` best windows, 0 = all, as integer seconds) or else from the
record's ``coarse_windows`` (CALCE json's ``stage1_result``). ``round_duration`` rounds the
duration to whole seconds (CALCE's Charades-STA preprocessing). With ``frames.type: video``
the frames are decoded with decord at ``image_size`` x ``image_size`` exactly as CALCE's
``load_video`` does (times ``idx / fps``); folder and feature sources use their own frame times.

Data path
---------
BLIP-2 consumes **images**, not pre-extracted clip features, so the refiner reads frames:

* ``video``: video files ``<path>/<vid><ext>`` decoded with :mod:`lavis_c2f.video.decode`
  at ``fps`` frames per second (frame ``k`` at ``(k + 0.5) / fps`` s, the decode module's
  clip-centre rule), resized on decode to ``image_size``; decoded videos are kept in an LRU
  cache (``cache_videos``) since several queries share a video.
* ``folder``: pre-extracted frames ``<path>/<vid>/*.jpg|png`` (sorted by name), frame ``k`` at
  ``(k + 0.5) / fps`` s (what ``ffmpeg -vf fps=F`` writes). The way to train at scale.
* ``feature_image``: no pixels at all: clip-feature rows (a :mod:`lavis_c2f.data.features`
  store, one row per ``clip_length`` s) drawn as images. Lets the refiner run end to end on the
  embedded demo corpus, which has no videos; it carries the features' information, not
  natural-image content.

Per sample (:class:`RefinerDataset`): the search region is the stage-2 windows widened by the
margins (:func:`~lavis_c2f.models.refiner.prompt.refine_region`; the whole video without
stage-2 predictions: CALCE's coarse stage); the candidate frames are the source's frames inside
the region (at most ``n_candidates``, spread uniformly); ``n_frames`` key frames are chosen by
k-means on thumbnail features (or uniformly); captions come from ``<captions>/<vid>.srt`` when
the file exists; the answer is the ground truth clipped to the region.

Stage-2 predictions: a jsonl of official prediction rows (``qid``, ``pred_relevant_windows``
``[[st, ed, score], ...]``, optional ``pred_saliency_scores``).

The batch format is documented in :mod:`lavis_c2f.models.refiner.model`.
"""
from __future__ import annotations

import collections
import glob
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from torch.utils.data import Dataset
from torchvision.transforms import RandomResizedCrop

from lavis_c2f.common.dist import barrier, is_main_process
from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.common.io import iter_jsonl
from lavis_c2f.data.cfg import check_keys, to_plain
from lavis_c2f.data.demo_corpus import default_demo_root, make_demo_corpus, read_corpus_meta
from lavis_c2f.data.features import open_store
from lavis_c2f.data.readers import read_annotations
from lavis_c2f.data.records import MomentRecord
from lavis_c2f.models.refiner.calce_text import calce_windows, read_srt_text
from lavis_c2f.models.refiner.keyframes import select_key_frames, thumbnail_features, uniform_key_frames
from lavis_c2f.models.refiner.prompt import refine_region, target_windows
from lavis_c2f.models.refiner.srt import Caption, load_captions
from lavis_c2f.paths import resolve_path, table_config_path
from lavis_c2f.video.decode import decode_clips

logger = logging.getLogger(__name__)

BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# =========================================================================== settings
@dataclass(frozen=True)
class SamplerConfig:
    """Region and frame selection (dataset ``sampler:`` and :class:`CaptionRefiner`).

    Attributes:
        margin_s, margin_ratio: the region is the hull of the ``n_ref_windows`` best stage-2
            windows widened by ``max(margin_s, margin_ratio * hull length)`` on both sides.
        n_candidates: at most this many source frames inside the region are considered.
        n_frames: key frames given to the model (k-means clusters).
        keyframes: ``kmeans`` (CALCE-style) or ``uniform``.
        seed: k-means seed. thumb_size: side of the clustering thumbnails.
    """

    margin_s: float = 4.0
    margin_ratio: float = 0.5
    n_ref_windows: int = 1
    n_candidates: int = 64
    n_frames: int = 12
    keyframes: str = "kmeans"
    seed: int = 0
    thumb_size: int = 8

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]], where: str = "sampler") -> "SamplerConfig":
        d = check_keys(cfg, {f.name for f in fields(cls)}, where)
        defaults = cls()
        for k, v in d.items():
            want = type(getattr(defaults, k))
            if want is float:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise ConfigError(f"{where}.{k}: expected a non-negative number, got {v!r}")
                d[k] = float(v)
            elif want is int:
                if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and k != "seed"):
                    raise ConfigError(f"{where}.{k}: expected a positive integer, got {v!r}")
        if d.get("keyframes", "kmeans") not in ("kmeans", "uniform"):
            raise ConfigError(f"{where}.keyframes: expected 'kmeans' or 'uniform', got {d['keyframes']!r}")
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CalceDataConfig:
    """CALCE sampling (dataset ``calce:`` node; module doc).

    Attributes:
        stage: 1 or 2 (stage 2 rounds frame times to 2 decimals and needs coarse windows).
        n_frms: frames per video (CALCE: 75 / 150 QVHighlights, 60 / 120 Charades-STA).
        items: ``annotation`` (required on every record) or ``none`` (explicit no-items prompt).
        n_coarse: coarse windows taken from a prediction row, best first (0 = all).
        round_duration: round durations to whole seconds (CALCE's Charades-STA files).
        seed: per-sample clustering seed in evaluation (``seed + index``).
        train_crop: the ``train`` split gets CALCE's training augmentation (``blip2_video_train``:
            one random resized crop per video, scale 0.5-1, aspect 3/4-4/3, bicubic back to
            ``image_size``; values clamped to 0-255).
    """

    stage: int = 1
    n_frms: int = 75
    items: str = "annotation"
    n_coarse: int = 0
    round_duration: bool = False
    seed: int = 0
    train_crop: bool = True

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]], where: str = "calce") -> "CalceDataConfig":
        d = check_keys(cfg, {f.name for f in fields(cls)}, where)
        for k in ("stage", "n_frms", "n_coarse", "seed"):
            v = d.get(k, getattr(cls, k))
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{where}.{k}: expected a non-negative integer, got {v!r}")
        out = cls(**d)
        if out.stage not in (1, 2):
            raise ConfigError(f"{where}.stage: expected 1 or 2, got {out.stage!r}")
        if out.n_frms < 1:
            raise ConfigError(f"{where}.n_frms: expected a positive integer, got {out.n_frms!r}")
        if out.items not in ("annotation", "none"):
            raise ConfigError(f"{where}.items: expected 'annotation' or 'none', got {out.items!r}")
        for k in ("round_duration", "train_crop"):
            if not isinstance(getattr(out, k), bool):
                raise ConfigError(f"{where}.{k}: expected true/false, got {getattr(out, k)!r}")
        return out


def random_resized_crop(frames: np.ndarray, size: int, scale: Tuple[float, float] = (0.5, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """One random resized crop for the whole clip (CALCE's ``RandomResizedCropVideo``), bicubic
    to ``size`` x ``size``, clamped to uint8. (T, H, W, 3) uint8 -> (T, size, size, 3) uint8;
    draws from the global torch generator."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    i, j, h, w = RandomResizedCrop.get_params(x, scale=list(scale), ratio=list(ratio))
    x = torch.nn.functional.interpolate(x[:, :, i:i + h, j:j + w], size=(size, size), mode="bicubic",
                                        align_corners=False)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def calce_frame_indices(vlen: int, n_frms: int) -> np.ndarray:
    """CALCE's ``head`` sampling: ``linspace(0, vlen, n + 1).astype(int)[:n]``, ``n = min(n_frms,
    vlen)``. (n,) int64."""
    if vlen < 1:
        raise ValueError("video has no frames")
    n = min(int(n_frms), int(vlen))
    return np.linspace(0, vlen, n + 1).astype(int)[:n].astype(np.int64)


class FrameProcessor:
    """uint8 frames (T, H, W, 3) -> float (T, 3, S, S): bicubic resize to ``image_size`` (when
    needed), [0, 1], BLIP mean/std normalisation (LAVIS's ``blip_image_eval``)."""

    def __init__(self, image_size: int = 224, mean: Sequence[float] = BLIP_MEAN,
                 std: Sequence[float] = BLIP_STD):
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                                                align_corners=False, antialias=True).clamp(0, 1)
        return (x - self.mean) / self.std


# =========================================================================== frame sources
class FrameSource:
    """Frames of a video on a fixed time grid. Subclasses implement :meth:`grid`."""

    def grid(self, vid: str) -> Tuple[np.ndarray, Any]:
        """``(times (N,) seconds increasing, handle)``; ``handle`` is passed to :meth:`load`."""
        raise NotImplementedError

    def load(self, vid: str, handle: Any, indices: np.ndarray) -> np.ndarray:
        """(len(indices), H, W, 3) uint8 frames at grid ``indices``."""
        raise NotImplementedError

    def frames_in(self, vid: str, start: float, end: float, max_frames: int
                  ) -> Tuple[np.ndarray, np.ndarray]:
        """Grid frames with ``start <= t <= end`` (at most ``max_frames``, spread uniformly;
        the frame nearest to the span centre when none lies inside).

        Returns ``(frames (T, H, W, 3) uint8, times (T,) seconds)``.
        """
        times, handle = self.grid(vid)
        if len(times) == 0:
            raise DataFormatError("video has no frames", path=str(vid))
        inside = np.flatnonzero((times >= start) & (times <= end))
        if inside.size == 0:
            inside = np.array([int(np.argmin(np.abs(times - 0.5 * (start + end))))])
        if inside.size > max_frames:
            inside = inside[uniform_key_frames(inside.size, max_frames)]
        return self.load(vid, handle, inside), times[inside]

    def calce_frames(self, vid: str, n_frms: int) -> Tuple[np.ndarray, np.ndarray]:
        """CALCE's ``head`` sampling of the whole video over the source's frame grid.

        Returns ``(frames (T, H, W, 3) uint8, times (T,) seconds)``."""
        times, handle = self.grid(vid)
        idx = calce_frame_indices(len(times), n_frms)
        return self.load(vid, handle, idx), times[idx]


class ArrayFrameSource(FrameSource):
    """In-memory frames: ``{vid: (frames (N, H, W, 3) uint8, times (N,))}``."""

    def __init__(self, videos: Mapping[str, Tuple[np.ndarray, np.ndarray]]):
        self.videos = {}
        for vid, (frames, times) in videos.items():
            frames, times = np.asarray(frames), np.asarray(times, dtype=np.float64)
            if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) != len(times):
                raise ValueError(f"video {vid}: expected frames (N, H, W, 3) and times (N,), got "
                                 f"{frames.shape} and {times.shape}")
            order = np.argsort(times, kind="stable")
            self.videos[vid] = (frames[order], times[order])

    def grid(self, vid):
        if vid not in self.videos:
            raise DataFormatError(f"no frames for video {vid!r}", field="vid")
        return self.videos[vid][1], None

    def load(self, vid, handle, indices):
        return self.videos[vid][0][indices]


class VideoFileFrameSource(FrameSource):
    """Video files decoded with :mod:`lavis_c2f.video.decode` at ``fps`` (see module doc)."""

    def __init__(self, root: str, ext: str = ".mp4", fps: float = 1.0, image_size: int = 224,
                 cache_videos: int = 4):
        self.root, self.ext, self.fps, self.size = root, ext, float(fps), int(image_size)
        self.cache: "collections.OrderedDict[str, Tuple[np.ndarray, np.ndarray]]" = collections.OrderedDict()
        self.cache_videos = int(cache_videos)

    def path(self, vid: str) -> str:
        return os.path.join(self.root, f"{vid}{self.ext}")

    def _decode(self, vid: str) -> Tuple[np.ndarray, np.ndarray]:
        if vid in self.cache:
            self.cache.move_to_end(vid)
            return self.cache[vid]
        path = self.path(vid)
        if not os.path.isfile(path):
            raise DataFormatError("video file not found", path=path)
        clips = decode_clips(path, clip_length=1.0 / self.fps, frames_per_clip=1, size=(self.size, self.size))
        out = (clips.frames[:, 0], clips.targets[:, 0].astype(np.float64))
        if self.cache_videos > 0:
            self.cache[vid] = out
            while len(self.cache) > self.cache_videos:
                self.cache.popitem(last=False)
        return out

    def grid(self, vid):
        frames, times = self._decode(vid)
        return times, frames

    def calce_frames(self, vid: str, n_frms: int) -> Tuple[np.ndarray, np.ndarray]:
        """CALCE's ``load_video`` (decord, resized to ``image_size`` on decode, ``head``
        sampling, times ``idx / fps``)."""
        import decord

        path = self.path(vid)
        if not os.path.isfile(path):
            raise DataFormatError("video file not found", path=path)
        try:
            vr = decord.VideoReader(path, height=self.size, width=self.size)
            idx = calce_frame_indices(len(vr), n_frms)
            fps = float(vr.get_avg_fps())
            batch = vr.get_batch(idx.tolist())      # LAVIS sets decord's torch bridge
            frames = batch.asnumpy() if hasattr(batch, "asnumpy") else batch.numpy()
        except (decord.DECORDError, RuntimeError) as e:
            raise DataFormatError(f"cannot decode video: {e}", path=path) from None
        return frames, np.array([float(i / fps) for i in idx], dtype=np.float64)

    def load(self, vid, handle, indices):
        return handle[indices]


class FolderFrameSource(FrameSource):
    """Pre-extracted frames ``<root>/<vid>/*.{jpg,png,...}`` at ``fps`` (see module doc)."""

    def __init__(self, root: str, fps: float = 1.0):
        self.root, self.fps = root, float(fps)

    def grid(self, vid):
        d = os.path.join(self.root, vid)
        if not os.path.isdir(d):
            raise DataFormatError("frame folder not found", path=d)
        files = sorted(f for f in glob.glob(os.path.join(d, "*")) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise DataFormatError(f"no image files ({', '.join(IMAGE_EXTS)})", path=d)
        return (np.arange(len(files), dtype=np.float64) + 0.5) / self.fps, files

    def load(self, vid, handle, indices):
        from PIL import Image

        out = []
        for i in indices:
            try:
                with Image.open(handle[i]) as im:
                    out.append(np.asarray(im.convert("RGB")))
            except OSError as e:
                raise DataFormatError(f"unreadable image: {e}", path=handle[i]) from None
        shapes = {a.shape for a in out}
        if len(shapes) > 1:
            h, w = out[0].shape[:2]
            resized = []
            for a in out:
                resized.append(a if a.shape[:2] == (h, w) else
                               np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC)))
            out = resized
        return np.stack(out)


class FeatureImageFrameSource(FrameSource):
    """Clip-feature rows drawn as images (see module doc): row ``k`` (time ``(k + 0.5) *
    clip_length``) is z-scored, zero-padded to ``3 * s * s`` values (``s = ceil(sqrt(D / 3))``),
    mapped to ``clip(128 + 48 z, 0, 255)`` and enlarged to ``image_size`` (nearest)."""

    def __init__(self, store: Any, clip_length: float, image_size: int = 224):
        self.store = open_store(store)
        self.clip_length, self.size = float(clip_length), int(image_size)

    def grid(self, vid):
        try:
            feats = np.asarray(self.store.get(vid), dtype=np.float64)
        except KeyError:
            raise DataFormatError(f"no features for video {vid!r}", field="vid") from None
        if feats.ndim != 2:
            raise DataFormatError(f"features of {vid!r} must be (L, D), got {feats.shape}", field="vid")
        return (np.arange(len(feats), dtype=np.float64) + 0.5) * self.clip_length, feats

    def load(self, vid, handle, indices):
        rows = handle[indices]
        n, d = rows.shape
        s = int(math.ceil(math.sqrt(d / 3.0)))
        z = (rows - rows.mean(1, keepdims=True)) / np.maximum(rows.std(1, keepdims=True), 1e-8)
        pix = np.zeros((n, 3 * s * s), dtype=np.float64)
        pix[:, :d] = z
        img = np.clip(128.0 + 48.0 * pix, 0, 255).astype(np.uint8).reshape(n, 3, s, s).transpose(0, 2, 3, 1)
        rep = int(math.ceil(self.size / s))
        img = img.repeat(rep, axis=1).repeat(rep, axis=2)[:, :self.size, :self.size]
        return np.ascontiguousarray(img)


def make_frame_source(cfg: Mapping[str, Any], base: str, image_size: int, where: str = "frames") -> FrameSource:
    """A :class:`FrameSource` from ``{type: video|folder|feature_image, path, ...}``."""
    d = to_plain(cfg)
    if not isinstance(d, Mapping) or "type" not in d:
        raise ConfigError(f"{where}: expected a mapping with 'type' (video, folder or feature_image)")
    kind = d["type"]
    allowed = {"video": {"type", "path", "ext", "fps", "cache_videos"},
               "folder": {"type", "path", "fps"},
               "feature_image": {"type", "path", "field", "key_format", "cache_size", "clip_length"}}
    if kind not in allowed:
        raise ConfigError(f"{where}.type: expected one of {sorted(allowed)}, got {kind!r}")
    d = check_keys(d, allowed[kind], where)
    if not d.get("path"):
        raise ConfigError(f"{where}.path: missing")
    path = resolve_path(d["path"], base)
    if not os.path.exists(path):
        raise ConfigError(f"{where}.path: not found: {path}")
    if kind == "video":
        return VideoFileFrameSource(path, ext=d.get("ext", ".mp4"), fps=float(d.get("fps", 1.0)),
                                    image_size=image_size, cache_videos=int(d.get("cache_videos", 4)))
    if kind == "folder":
        return FolderFrameSource(path, fps=float(d.get("fps", 1.0)))
    if "clip_length" not in d:
        raise ConfigError(f"{where}.clip_length: missing (seconds per feature row)")
    spec = {"type": "npz", "path": path, "field": d.get("field", "features"),
            "key_format": d.get("key_format", "{key}.npz"), "cache_size": int(d.get("cache_size", 0))}
    return FeatureImageFrameSource(spec, clip_length=float(d["clip_length"]), image_size=image_size)


# =========================================================================== stage-2 predictions
def load_stage2_predictions(path: str) -> Dict[Any, Dict[str, Any]]:
    """``{qid: row}`` of a stage-2 prediction jsonl (official rows). Rows must have ``qid`` and
    a list ``pred_relevant_windows`` of ``[st, ed(, score)]``; errors name file, line, field."""
    out: Dict[Any, Dict[str, Any]] = {}
    for line, row in iter_jsonl(path):
        if not isinstance(row, dict) or "qid" not in row:
            raise DataFormatError("expected an object with 'qid'", path=path, line=line, field="qid")
        wins = row.get("pred_relevant_windows")
        if not isinstance(wins, list):
            raise DataFormatError("expected a list of [st, ed, score]", path=path, line=line,
                                  field="pred_relevant_windows")
        clean = []
        for w in wins:
            if (not isinstance(w, (list, tuple)) or len(w) < 2
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w[:3])):
                raise DataFormatError(f"bad window {w!r}", path=path, line=line, field="pred_relevant_windows")
            clean.append([float(x) for x in w[:3]])
        if row["qid"] in out:
            raise DataFormatError(f"duplicate qid {row['qid']!r}", path=path, line=line, field="qid")
        out[row["qid"]] = {"windows": clean, "saliency": row.get("pred_saliency_scores")}
    return out


# =========================================================================== dataset
class RefinerDataset(Dataset):
    """Records + frames (+ captions, + stage-2 predictions) -> refiner samples.

    Args:
        records: annotation records (seconds).
        frames: a :class:`FrameSource`.
        sampler: region / key-frame settings.
        image_size: model input size.
        captions_dir: folder of ``<vid>.srt`` (None: no speech). A missing file means no speech.
        stage2: ``{qid: {"windows", "saliency"}}`` (:func:`load_stage2_predictions`) or None
            (coarse stage: the region is the whole video).
        on_missing_stage2: ``error`` (DataFormatError naming the qid) or ``whole_video``.
        max_windows: answer windows kept per sample.
    """

    def __init__(self, records: Sequence[MomentRecord], frames: FrameSource, sampler: SamplerConfig,
                 image_size: int = 224, captions_dir: Optional[str] = None,
                 stage2: Optional[Mapping[Any, Mapping[str, Any]]] = None, on_missing_stage2: str = "error",
                 max_windows: int = 5, name: str = "c2f_refiner", stage2_source: Optional[str] = None):
        if on_missing_stage2 not in ("error", "whole_video"):
            raise ConfigError(f"on_missing_stage2: expected 'error' or 'whole_video', got {on_missing_stage2!r}")
        self.records = list(records)
        self.frames, self.sampler = frames, sampler
        self.processor = FrameProcessor(image_size)
        self.captions_dir = captions_dir
        self.stage2 = stage2
        self.on_missing_stage2 = on_missing_stage2
        self.max_windows = max_windows
        self.name = name
        self.stage2_source = stage2_source
        self._caption_cache: "collections.OrderedDict[str, List[Caption]]" = collections.OrderedDict()
        if stage2 is not None and on_missing_stage2 == "error":
            missing = [r.qid for r in self.records if r.qid not in stage2]
            if missing:
                raise DataFormatError(f"no stage-2 prediction for {len(missing)} queries, e.g. qid "
                                      f"{missing[:5]}", path=stage2_source, field="qid")

    def __len__(self) -> int:
        return len(self.records)

    def captions(self, vid: str) -> List[Caption]:
        if not self.captions_dir:
            return []
        if vid in self._caption_cache:
            return self._caption_cache[vid]
        path = os.path.join(self.captions_dir, f"{vid}.srt")
        caps = load_captions(path) if os.path.isfile(path) else []
        self._caption_cache[vid] = caps
        while len(self._caption_cache) > 256:
            self._caption_cache.popitem(last=False)
        return caps

    def __getitem__(self, index: int) -> Dict[str, Any]:
        rec = self.records[index]
        pred = self.stage2.get(rec.qid) if self.stage2 is not None else None
        windows = pred["windows"] if pred else []
        region = refine_region(windows, rec.duration, self.sampler.margin_s, self.sampler.margin_ratio,
                               self.sampler.n_ref_windows)
        sample = build_sample(rec.query, rec.vid, rec.duration, region, self.frames, self.sampler,
                              self.processor, captions=self.captions(rec.vid))
        sample.update(qid=rec.qid, stage2_windows=windows,
                      stage2_saliency=pred.get("saliency") if pred else None,
                      target_windows=target_windows(rec.relevant_windows, region, self.max_windows),
                      relevant_windows=[list(w) for w in rec.relevant_windows],
                      n_ref_windows=self.sampler.n_ref_windows)
        return sample

    @staticmethod
    def collater(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        return collate_refiner(samples)


class CalceDataset(Dataset):
    """Records + frames (+ ``.srt``, + coarse windows) -> CALCE samples (module doc).

    Sample keys: ``qid, query, vid, duration, frames (T, 3, S, S), timestamps (T,) float32,
    items, srt_text, srt_path, coarse_windows (stage 2) , stage2_windows (the prediction row's
    scored windows, for fallback and scores), stage2_saliency, target_windows,
    relevant_windows, region [0, duration], calce_seed``.
    """

    def __init__(self, records: Sequence[MomentRecord], frames: FrameSource, cfg: CalceDataConfig,
                 image_size: int = 224, captions_dir: Optional[str] = None,
                 coarse: Optional[Mapping[Any, Mapping[str, Any]]] = None, on_missing_coarse: str = "error",
                 name: str = "c2f_refiner", coarse_source: Optional[str] = None, augment: bool = False):
        if on_missing_coarse not in ("error", "whole_video"):
            raise ConfigError(f"on_missing_stage2: expected 'error' or 'whole_video', got {on_missing_coarse!r}")
        self.records, self.frames, self.cfg = list(records), frames, cfg
        self.processor = FrameProcessor(image_size)
        self.captions_dir, self.coarse, self.on_missing = captions_dir, coarse, on_missing_coarse
        self.name, self.coarse_source = name, coarse_source
        self.augment, self.image_size = bool(augment), int(image_size)
        if cfg.items == "annotation":
            bad = [r for r in self.records if r.items is None]
            if bad:
                raise DataFormatError(f"{len(bad)} records have no 'items' (CALCE's query noun phrases), e.g. qid "
                                      f"{bad[0].qid!r}; use annotations that carry them (format calce, or an "
                                      "'items' field) or set calce.items: none", path=bad[0].source, field="items")
        if cfg.stage == 2 and on_missing_coarse == "error":
            missing = [r.qid for r in self.records if self._coarse(r) is None]
            if missing:
                raise DataFormatError(f"no coarse windows (stage-1 results) for {len(missing)} queries, e.g. qid "
                                      f"{missing[:5]}", path=coarse_source, field="qid")

    def __len__(self) -> int:
        return len(self.records)

    def _coarse(self, rec: MomentRecord) -> Optional[Tuple[List[List[int]], List[List[float]], Any]]:
        """``(coarse windows, scored windows, saliency)`` of a record, or None."""
        if self.coarse is not None and rec.qid in self.coarse:
            row = self.coarse[rec.qid]
            wins = row["windows"][:self.cfg.n_coarse] if self.cfg.n_coarse else row["windows"]
            return (calce_windows(wins) or None), row["windows"], row.get("saliency")
        if "coarse_windows" in rec.extra:
            wins = rec.extra["coarse_windows"]
            return calce_windows(wins), [[float(a), float(b), 1.0] for a, b in wins], None
        return None

    def __getitem__(self, index: int) -> Dict[str, Any]:
        rec = self.records[index]
        duration = float(round(rec.duration)) if self.cfg.round_duration else float(rec.duration)
        raw, times = self.frames.calce_frames(rec.vid, self.cfg.n_frms)
        if self.augment:
            raw = random_resized_crop(raw, self.image_size)
        if self.cfg.stage == 2:
            stamps = torch.tensor([round(float(t), 2) for t in times], dtype=torch.float32)
        else:
            stamps = torch.tensor([float(t) for t in times], dtype=torch.float32)
        srt_path = os.path.join(self.captions_dir, f"{rec.vid}.srt") if self.captions_dir else None
        coarse = self._coarse(rec) if self.cfg.stage == 2 else None
        if self.cfg.stage == 2 and (coarse is None or not coarse[0]):
            coarse = ([[0, int(round(duration))]], [], None)      # on_missing_stage2: whole_video
        return {"qid": rec.qid, "query": rec.query, "vid": rec.vid, "duration": duration,
                "frames": self.processor(raw), "timestamps": stamps,
                "items": list(rec.items) if self.cfg.items == "annotation" else [],
                "srt_text": read_srt_text(srt_path), "srt_path": srt_path,
                "coarse_windows": coarse[0] if coarse else None,
                "stage2_windows": coarse[1] if coarse else [], "stage2_saliency": coarse[2] if coarse else None,
                "target_windows": [list(w) for w in rec.relevant_windows],
                "relevant_windows": [list(w) for w in rec.relevant_windows],
                "region": [0.0, duration], "calce_seed": self.cfg.seed + index}

    @staticmethod
    def collater(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        return collate_calce(samples)


def collate_calce(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """A CALCE batch: one list per key (frame counts may differ; durations stay Python floats,
    as CALCE computes with them)."""
    if not samples:
        raise ValueError("empty batch")
    return {k: [s.get(k) for s in samples] for k in samples[0]}


def build_sample(query: str, vid: str, duration: float, region: Tuple[float, float], frames: FrameSource,
                 sampler: SamplerConfig, processor: FrameProcessor,
                 captions: Optional[Sequence[Caption]] = None) -> Dict[str, Any]:
    """Frames + prompt inputs of one query (shared by the dataset and :class:`CaptionRefiner`):
    ``{query, vid, duration, region, frames (T, 3, S, S), frame_times [T], captions}``."""
    raw, times = frames.frames_in(vid, region[0], region[1], sampler.n_candidates)
    if sampler.keyframes == "kmeans":
        idx = select_key_frames(thumbnail_features(raw, sampler.thumb_size), sampler.n_frames, sampler.seed)
    else:
        idx = uniform_key_frames(len(raw), sampler.n_frames)
    return {"query": query, "vid": vid, "duration": float(duration), "region": [float(region[0]), float(region[1])],
            "frames": processor(raw[idx]), "frame_times": [float(t) for t in times[idx]],
            "captions": list(captions or [])}


def collate_refiner(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack samples into the refiner batch (format in :mod:`lavis_c2f.models.refiner.model`)."""
    if not samples:
        raise ValueError("empty batch")
    b = len(samples)
    t = max(s["frames"].shape[0] for s in samples)
    c, h, w = samples[0]["frames"].shape[1:]
    frames = torch.zeros(b, t, c, h, w, dtype=samples[0]["frames"].dtype)
    mask = torch.zeros(b, t, dtype=torch.float32)
    for i, s in enumerate(samples):
        n = s["frames"].shape[0]
        frames[i, :n] = s["frames"]
        mask[i, :n] = 1.0
    batch: Dict[str, Any] = {
        "frames": frames, "frame_mask": mask,
        "frame_times": [list(s["frame_times"]) for s in samples],
        "duration": torch.tensor([s["duration"] for s in samples], dtype=torch.float32),
        "region": torch.tensor([s["region"] for s in samples], dtype=torch.float32),
    }
    for key in ("qid", "query", "vid", "captions", "stage2_windows", "stage2_saliency", "target_windows",
                "relevant_windows", "n_ref_windows"):
        if key in samples[0]:
            batch[key] = [s.get(key) for s in samples]
    return batch


# =========================================================================== builder
BUILDER_KEYS = {"type", "variant", "calce", "data_root", "annotations", "reader", "frames", "captions",
                "stage2_predictions", "on_missing_stage2", "sampler", "image_size", "max_windows", "splits",
                "demo_corpus"}


@registry.register_builder("c2f_refiner")
class RefinerDatasetBuilder(BaseDatasetBuilder):
    """``c2f_refiner`` datasets (``{split: CalceDataset | RefinerDataset}``) from a
    ``datasets.c2f_refiner`` node::

        variant: calce                 # calce (CalceDataset) | interleaved (RefinerDataset)
        calce: {stage, n_frms, items: annotation|none, n_coarse, round_duration, seed}   # calce
        data_root: DIR                 # base of relative paths (demo_corpus: the demo root)
        demo_corpus: false             # true: data_root defaults to the demo corpus (made if missing)
        annotations: {train: {path, format: auto|qvh|charades_sta|tacos|calce}, val: ..., test: ...}
        reader: {tolerance, clamp, swap_reversed, on_error}
        frames: {type: video, path: videos, ext: .mp4, fps: 1, cache_videos: 4}
              | {type: folder, path: frames, fps: 1}
              | {type: feature_image, path: clip_features, clip_length: 2, field: features}
        captions: srts | null          # folder of <vid>.srt
        stage2_predictions: {train: P, val: P, test: P} | null   # official rows (jsonl); calce
                                       # stage 2: the coarse windows (e.g. CALCE stage 1's rows)
        on_missing_stage2: error | whole_video
        sampler: {margin_s, margin_ratio, n_ref_windows, n_candidates, n_frames, keyframes, seed}
                                       # interleaved only
        image_size: 224
        max_windows: 5
        splits: null                   # subset of the annotation splits
    """

    NAME = "c2f_refiner"
    DATASET_CONFIG_DICT = {"default": "models/c2f_caption_refiner_data_defaults.yaml"}

    @classmethod
    def default_config_path(cls, type: str = "default") -> str:  # noqa: A002 - LAVIS signature
        return table_config_path(cls.NAME, cls.DATASET_CONFIG_DICT, type)

    def __init__(self, cfg: Any = None):  # noqa: D401 - LAVIS signature
        # BaseDatasetBuilder.__init__ expects LAVIS's build_info: not called on purpose.
        if cfg is None:
            raise ConfigError("datasets.c2f_refiner: a config node is required (no default data)")
        self.config = cfg
        where = f"datasets.{self.NAME}"
        d = check_keys(cfg, BUILDER_KEYS, where)
        self.where, self.d = where, d
        root = d.get("data_root")
        demo = bool(d.get("demo_corpus", False))
        if root in (None, "", "null"):
            if demo:
                root = default_demo_root()
            else:
                root = os.getcwd()
        self.data_root = resolve_path(root)
        self.demo = demo
        anns = to_plain(d.get("annotations"))
        if not isinstance(anns, Mapping) or not anns:
            raise ConfigError(f"{where}.annotations: expected a mapping split -> {{path, format}}")
        self.annotations = {}
        for split, a in anns.items():
            a = {"path": a} if isinstance(a, str) else check_keys(a, {"path", "format", "require_windows"},
                                                                  f"{where}.annotations.{split}")
            if not a.get("path"):
                raise ConfigError(f"{where}.annotations.{split}.path: missing")
            self.annotations[split] = {"path": resolve_path(a["path"], self.data_root),
                                       "format": a.get("format", "auto"),
                                       "require_windows": bool(a.get("require_windows", False))}
        self.splits = list(d.get("splits") or self.annotations)
        for s in self.splits:
            if s not in self.annotations:
                raise ConfigError(f"{where}.splits: {s!r} has no entry in {where}.annotations")
        self.variant = d.get("variant", "calce")
        if self.variant not in ("calce", "interleaved"):
            raise ConfigError(f"{where}.variant: expected 'calce' or 'interleaved', got {self.variant!r}")
        self.calce = CalceDataConfig.from_mapping(d.get("calce"), f"{where}.calce")
        self.sampler = SamplerConfig.from_mapping(d.get("sampler"), f"{where}.sampler")
        self.image_size = int(d.get("image_size", 224))
        self.max_windows = int(d.get("max_windows", 5))
        self.on_missing = d.get("on_missing_stage2", "error")
        if "frames" not in d:
            raise ConfigError(f"{where}.frames: missing (video, folder or feature_image source)")
        s2 = to_plain(d.get("stage2_predictions")) or {}
        if not isinstance(s2, Mapping):
            raise ConfigError(f"{where}.stage2_predictions: expected a mapping split -> path")
        self.stage2_paths = {k: resolve_path(v, self.data_root) for k, v in s2.items() if v}

    def _prepare(self) -> None:
        if not self.demo:
            return
        if read_corpus_meta(self.data_root) is None:
            if is_main_process():
                make_demo_corpus(self.data_root)
            barrier()

    def build_datasets(self) -> Dict[str, RefinerDataset]:
        self._prepare()
        frames = make_frame_source(self.d["frames"], self.data_root, self.image_size, f"{self.where}.frames")
        cap = self.d.get("captions")
        captions_dir = resolve_path(cap, self.data_root) if cap else None
        if captions_dir and not os.path.isdir(captions_dir):
            raise ConfigError(f"{self.where}.captions: folder not found: {captions_dir}")
        reader = check_keys(self.d.get("reader"), {"tolerance", "clamp", "swap_reversed", "on_error"},
                            f"{self.where}.reader")
        out = {}
        for split in self.splits:
            a = self.annotations[split]
            if not os.path.isfile(a["path"]):
                raise ConfigError(f"{self.where}.annotations.{split}.path: annotation file not found: {a['path']}")
            kw = dict(reader)
            if a["format"] == "calce" or (a["format"] in ("qvh", "auto") and a["path"].endswith(".jsonl")):
                kw["require_windows"] = a["require_windows"]
            records = read_annotations(a["path"], fmt=a["format"], **kw)
            stage2, src = None, None
            if split in self.stage2_paths:
                src = self.stage2_paths[split]
                if not os.path.isfile(src):
                    raise ConfigError(f"{self.where}.stage2_predictions.{split}: file not found: {src}")
                stage2 = load_stage2_predictions(src)
            if self.variant == "calce":
                out[split] = CalceDataset(records, frames, self.calce, self.image_size, captions_dir, stage2,
                                          self.on_missing, name=f"{self.NAME}/{split}", coarse_source=src,
                                          augment=self.calce.train_crop and split == "train")
            else:
                out[split] = RefinerDataset(records, frames, self.sampler, self.image_size, captions_dir, stage2,
                                            self.on_missing, self.max_windows, name=f"{self.NAME}/{split}",
                                            stage2_source=src)
            out[split].ann_path = a["path"]
        return out

    def build(self) -> Dict[str, RefinerDataset]:
        return self.build_datasets()
