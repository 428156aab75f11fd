"""One video as the coarse-to-fine engine sees it: per-clip features of one encoder, in seconds.

:class:`EncodedVideo` is what :func:`encode_video` makes of a video file (decoded into clips of
``clip_length`` seconds, encoded by a feature backbone) and what the corpora of an index give
for an indexed video (:mod:`lavis_c2f.index.corpora`). ``weights_id`` names the encoder, so a
video is only ever compared with queries encoded by the same one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Union

import numpy as np

from lavis_c2f.video.captions import sidecar_captions
from lavis_c2f.video.decode import iter_clip_batches
from lavis_c2f.video.probe import probe, require_video

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class EncodedVideo:
    """A video ready for grounding.

    Attributes:
        vid: video id (file stem for :func:`encode_video`).
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


def encode_video(backbone: Any, path: PathLike, clip_length: float, frames_per_clip: int = 1, *,
                 vid: Optional[str] = None, captions: bool = True, decode_backend: str = "auto",
                 progress: Optional[Callable[[int, int], None]] = None) -> EncodedVideo:
    """Decode ``path`` into clips of ``clip_length`` seconds (``frames_per_clip`` frames each)
    and encode them with ``backbone`` (a :class:`~lavis_c2f.video.backbones.FeatureBackbone`).

    Each clip's frames are the backbone's (``backbone.sampler``: SlowFast samples its own grid).
    ``captions``: read ``<video>.srt`` (or ``.vtt``) beside it. ``progress(clips_done, clips_total)`` is called
    after each batch of clips. Raises :class:`~lavis_c2f.common.errors.VideoDecodeError` for
    unreadable files.
    """
    p = os.path.abspath(os.fspath(path))
    info = probe(p)
    require_video(info)
    total = info.n_clips(clip_length)
    feats = []
    offsets = backbone.sampler(frames_per_clip).offsets(clip_length, info.fps)  # the backbone's frames per clip
    for b in iter_clip_batches(info, clip_length, frames_per_clip, backbone.decode_size,
                               batch_clips=64 if progress is None else 16, backend=decode_backend,
                               offsets=offsets):
        feats.append(backbone.encode_clips(b.frames))
        if progress is not None:
            progress(min(int(b.start) + int(b.frames.shape[0]), total), total)
    f = np.concatenate(feats, 0).astype(np.float32) if feats else np.zeros((0, backbone.dim), np.float32)
    return EncodedVideo(vid=vid or os.path.splitext(os.path.basename(p))[0], features=f,
                        duration=float(info.duration), clip_length=float(clip_length),
                        weights_id=backbone.weights_id, backbone=backbone.name, path=p,
                        captions=sidecar_captions(p) if captions else None)


__all__ = ["EncodedVideo", "encode_video"]
