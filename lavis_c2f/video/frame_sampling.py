"""Which frames of a video an end-to-end retriever sees (frame indices; numpy only).

Two published rules, both over the ``n`` decodable frames of a video in presentation order
(index ``i`` = the i-th frame; :func:`lavis_c2f.video.decode.decode_frames` decodes them):

``tmass`` -- T-MASS / X-Pool (``VideoCapture.load_frames_from_video``)::

    m = min(F, n)
    b = linspace(0, n, m + 1).astype(int)           # m intervals [b_j, b_{j+1} - 1]
    uniform:  i_j = (b_j + b_{j+1} - 1) // 2         # middle frame of interval j
    rand:     i_j uniform in [b_j, b_{j+1} - 2]      # random.choice(range(b_j, b_{j+1} - 1))

  then the last frame is repeated up to ``F`` frames (all of them count as valid). The
  official code raises on a one-frame interval in ``rand`` mode (an empty range); here such
  an interval takes its only frame. Both official recipes sample ``uniform`` in training and
  evaluation (``--video_sample_type`` default).

``fps`` -- CLIP4Clip / UCoFiA (``RawVideoExtractorCV2.video_to_tensor`` + ``slice_framepos``)::

    r = int(fps_of_the_video); step = max(1, r // sample_fps)
    frames at s * r + k * step  for s = 0, 1, ... and k < sample_fps, while < n
    if more than F:  uniform: linspace(0, count - 1, F, dtype=int) | head: first F | tail: last F

  i.e. one frame per second at ``sample_fps = 1`` (the frame at each whole second). Videos
  with fewer frames keep them all; the remaining slots are padding (mask 0), as CLIP4Clip's
  zero-filled ``video`` array with its ``video_mask``.

``int(fps)`` truncates as OpenCV's ``int(cap.get(CAP_PROP_FPS))`` (29.97 -> 29); the rate is
nudged by 1e-6 first so that a 30 fps stream measured as 29.999999 stays 30.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

KINDS = ("tmass", "fps")
PICKS = ("uniform", "rand")
SLICES = ("uniform", "head", "tail")


def tmass_frame_indices(n_frames: int, num_frames: int, pick: str = "uniform",
                        rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """(num_frames,) int64 frame indices by T-MASS's rule (module docstring), last one repeated."""
    if n_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {n_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
    m = min(num_frames, n_frames)
    b = np.linspace(0, n_frames, m + 1).astype(int)
    lo, hi = b[:-1], b[1:] - 1                              # interval j = [lo_j, hi_j]
    if pick == "uniform":
        idx = (lo + hi) // 2
    else:
        rng = rng if rng is not None else np.random.default_rng()
        top = np.maximum(hi - 1, lo)                        # range(lo, hi) excludes hi
        idx = lo + np.floor(rng.random(m) * (top - lo + 1)).astype(np.int64)
    idx = np.asarray(idx, dtype=np.int64)
    if m < num_frames:
        idx = np.concatenate([idx, np.full(num_frames - m, idx[-1], dtype=np.int64)])
    return idx


def fps_frame_indices(n_frames: int, video_fps: float, num_frames: int, sample_fps: int = 1,
                      slice_mode: str = "uniform") -> np.ndarray:
    """Frame indices by CLIP4Clip's rule (module docstring): at most ``num_frames`` of them,
    shorter when the video has fewer sampled frames (the caller pads and masks)."""
    if n_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {n_frames}")
    if num_frames < 1 or sample_fps < 1:
        raise ValueError(f"num_frames and sample_fps must be >= 1, got {num_frames}, {sample_fps}")
    if slice_mode not in SLICES:
        raise ValueError(f"slice_mode must be one of {SLICES}, got {slice_mode!r}")
    rate = max(1, int(float(video_fps) + 1e-6))
    step = max(1, rate // int(sample_fps))
    offsets = np.arange(0, rate, step)[: int(sample_fps)]
    seconds = np.arange(0, n_frames // rate + 2)
    idx = (seconds[:, None] * rate + offsets[None, :]).reshape(-1)
    idx = idx[idx < n_frames].astype(np.int64)
    if len(idx) > num_frames:
        if slice_mode == "head":
            idx = idx[:num_frames]
        elif slice_mode == "tail":
            idx = idx[-num_frames:]
        else:
            idx = idx[np.linspace(0, len(idx) - 1, num=num_frames, dtype=int)]
    return idx


@dataclass(frozen=True)
class FrameSampling:
    """A frame-sampling rule (module docstring) with its settings.

    Attributes:
        kind: ``tmass`` | ``fps``.
        num_frames: frames per video ``F``.
        pick_train, pick_eval: ``uniform`` | ``rand`` (``tmass``: the interval frame).
        sample_fps: frames per second (``fps``).
        slice_mode: ``uniform`` | ``head`` | ``tail`` (``fps``: which frames when too many).
    """

    kind: str = "tmass"
    num_frames: int = 12
    pick_train: str = "uniform"
    pick_eval: str = "uniform"
    sample_fps: int = 1
    slice_mode: str = "uniform"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"frame sampling kind must be one of {KINDS}, got {self.kind!r}")
        if int(self.num_frames) < 1 or int(self.sample_fps) < 1:
            raise ValueError(f"num_frames and sample_fps must be >= 1, got {self.num_frames}, {self.sample_fps}")
        for name in ("pick_train", "pick_eval"):
            if getattr(self, name) not in PICKS:
                raise ValueError(f"{name} must be one of {PICKS}, got {getattr(self, name)!r}")
        if self.slice_mode not in SLICES:
            raise ValueError(f"slice_mode must be one of {SLICES}, got {self.slice_mode!r}")

    def indices(self, n_frames: int, video_fps: float, train: bool = False,
                rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(frame indices (n_valid,), mask (num_frames,) float32)``: decode the indices and
        pad with zero frames up to ``num_frames`` where the mask is 0."""
        f = int(self.num_frames)
        if self.kind == "tmass":
            idx = tmass_frame_indices(n_frames, f, self.pick_train if train else self.pick_eval, rng)
        else:
            idx = fps_frame_indices(n_frames, video_fps, f, int(self.sample_fps), self.slice_mode)
        mask = np.zeros(f, dtype=np.float32)
        mask[: len(idx)] = 1.0
        return idx, mask
