"""Clip-frame decoding (decord first, PyAV fallback, ffmpeg CLI last resort) of a probed video
(:func:`lavis_c2f.video.probe.probe`: duration, frame timestamps, rotation, keyframes).

Sampling rule
-------------
A video of duration ``D`` seconds is cut into ``N = max(1, floor(D / L + 0.5))`` clips of
``L = clip_length`` seconds (a trailing partial clip is kept when it is at least half a clip,
as ffmpeg's ``fps`` filter does; a 30.7 s video gives 15 clips of 2 s). Clip ``k`` is
represented by ``F = frames_per_clip`` sample times ``t_kj = (k + (j + 0.5) / F) * L``
(``F = 1``: the clip centre), measured from the first frame's timestamp. Each sample takes
**the last frame whose timestamp is strictly before** ``t_kj`` (the first frame if none is;
the last frame past the end). This is exactly the frame ffmpeg's ``-vf fps=F/L`` filter
emits for that slot, i.e. what Moment-DETR's ``run_on_video`` (ffmpeg ``fps=1/2``) and the
QVHighlights / UniVTG feature extractors feed to CLIP, so features of the official
checkpoints can be reproduced. Frames are always chosen from their **timestamps** (never
``index / fps``), so variable-frame-rate streams sample the right moments.

A backbone may ask for other sample times: ``offsets`` (seconds from the clip start, each in
``[0, L)``, any order) replace ``(j + 0.5) / F * L``, and the frames come back in the order of
``offsets`` (the SlowFast features take 32 frames of a 30 fps grid per clip; a CLIP+SlowFast
extraction takes both sets in one pass). The ffmpeg CLI backend only produces the uniform
samples and is left out then.

Frames by index
---------------
:func:`decode_frames` decodes given frame indices (0-based, presentation order over the
``n_frames`` readable frames :func:`probe` counts), for samplers that choose frames by index
(:mod:`lavis_c2f.video.frame_sampling`: T-MASS's and CLIP4Clip's rules). Index ``i`` becomes
the sample time half-way between frames ``i`` and ``i + 1``, so the rule below returns frame
``i`` exactly (also for variable frame rates); decord first, PyAV as fallback.

Orientation and size
--------------------
Frames are returned in display orientation: the display-matrix rotation (phone videos) is
applied after decoding (:attr:`VideoInfo.rotation`, counter-clockwise degrees). ``size``
resizes on decode (in the decoder's scaler, before the RGB conversion): an ``int`` is the
shorter display side (the other side ``int(long * size / short)``, as Moment-DETR's loader),
a ``(H, W)`` pair is an exact size, ``None`` keeps the native size.

Backends and decoding order
---------------------------
``backend="auto"`` tries decord (``get_batch`` on the sorted unique frame indices; decord
seeks only when the next frame lies beyond the current group of pictures), falls back to
PyAV on any decord failure (and always uses PyAV for rotated streams: decord 0.6 returns
4-channel garbage for them), and uses the ``ffmpeg`` command line as the last resort when it
is installed. A backend failing part-way is resumed by the next one from the first missing
sample.

PyAV decodes in presentation order, packet by packet (a corrupt packet is skipped and
counted), and chooses per gap between consecutive samples whether to keep decoding or to
seek: it seeks when the next sample is more than ``seek_factor`` keyframe intervals ahead
(``mode="auto"``; ``"sequential"`` never seeks, ``"seek"`` seeks before every sample whose
frame is not the next one). A seek lands on the keyframe before the target and decodes on
from there (on average half a keyframe interval), so it pays off only when the gap to the next
sample is longer than a keyframe interval. Measured with ``bench/extract.py`` (640x360 H.264,
60 s, 25 fps, one CPU thread): keyframes every 1 s and a sample every 4 s: seek 0.59 s vs
sequential 2.02 s; every 2 s: 0.97 vs 1.52 s; every 0.5 s: 2.34 vs 1.80 s; keyframes every
10 s (x264's default) and a sample every 0.5-4 s: sequential always wins (1.2-1.6 s vs
2.5-17 s). Hence ``DEFAULT_SEEK_FACTOR = 1``: seek iff the next sample is more than one mean
keyframe interval ahead; with typical (5-10 s) keyframe intervals and 2 s clips this means
sequential decoding. decord's ``get_batch`` applies the same idea internally (it decodes
forward when the target is in the current group of pictures and seeks otherwise).

Errors
------
Every per-file problem raises :class:`VideoDecodeError` ``(path, reason)``: missing or empty
file, not a media container, mp4 without its index (truncated download), no video stream
(audio-only), a stream without frames, undecodable codec data, a file whose packets stop
well before its declared duration (truncated). :func:`decode_many` goes on with the other
files and returns a :class:`DecodeSummary`.

This module needs numpy and PyAV (decord optional); it does not import LAVIS or torch.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
from fractions import Fraction
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from lavis_c2f.common.errors import VideoDecodeError  # noqa: F401  (raised here; defined with the other user errors)
from lavis_c2f.video.probe import (TRUNCATED_FRACTION, DecodeSummary, VideoInfo, is_cover_art, open_av, probe,
                                   require_video)

logger = logging.getLogger(__name__)

SizeSpec = Union[None, int, Tuple[int, int], Sequence[int]]

#: seek when the next sample is more than this many keyframe intervals ahead (PyAV, auto mode)
DEFAULT_SEEK_FACTOR = 1.0
#: tie tolerance of the "strictly before" rule (seconds)
TIE_EPS = 1e-6
BACKENDS = ("auto", "decord", "pyav", "ffmpeg")
MODES = ("auto", "sequential", "seek")


@dataclass
class ClipBatch:
    """Frames of consecutive clips.

    Attributes:
        start: index of the first clip of the batch.
        frames: (B, F, H, W, 3) uint8 RGB, display orientation.
        times: (B, F) float64 timestamps (seconds from the first frame) of the chosen frames.
    """

    start: int
    frames: np.ndarray
    times: np.ndarray


@dataclass
class ClipFrames:
    """All clips of a video: ``frames`` (N, F, H, W, 3) uint8, ``times`` (N, F) seconds,
    ``targets`` (N, F) sample times, ``info`` and the backends that produced them."""

    frames: np.ndarray
    times: np.ndarray
    targets: np.ndarray
    info: VideoInfo
    backends: List[str]


# =========================================================================== sampling

def sample_times(n_clips: int, clip_length: float, frames_per_clip: int = 1,
                 offsets: Optional[Sequence[float]] = None) -> np.ndarray:
    """(N, F) sample times in seconds: ``(k + (j + 0.5) / F) * clip_length``, or
    ``k * clip_length + offsets[j]`` when ``offsets`` (F,) are given."""
    k = np.arange(n_clips, dtype=np.float64)[:, None]
    if offsets is not None:
        off = np.asarray(offsets, dtype=np.float64).reshape(-1)
        if off.size == 0 or np.any(off < 0) or np.any(off >= clip_length):
            raise ValueError(f"offsets must be a non-empty list of seconds in [0, {clip_length}), got {off}")
        return k * float(clip_length) + off[None, :]
    if frames_per_clip < 1:
        raise ValueError(f"frames_per_clip must be >= 1, got {frames_per_clip}")
    j = (np.arange(frames_per_clip, dtype=np.float64)[None, :] + 0.5) / frames_per_clip
    return (k + j) * float(clip_length)


def select_frames(frame_times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the last frame strictly before each target time (clamped to the first frame).

    Args:
        frame_times: (T,) sorted frame timestamps.
        targets: any shape of times on the same clock.
    Returns: int64 indices, shape of ``targets``.
    """
    ft = np.asarray(frame_times, dtype=np.float64)
    if ft.size == 0:
        raise ValueError("no frames to select from")
    idx = np.searchsorted(ft, np.asarray(targets, dtype=np.float64) - TIE_EPS, side="left") - 1
    return np.clip(idx, 0, ft.size - 1).astype(np.int64)


def output_size(height: int, width: int, size: SizeSpec) -> Tuple[int, int]:
    """(H, W) of decoded frames for a display size and a ``size`` spec (module docstring)."""
    if size is None:
        return int(height), int(width)
    if isinstance(size, (int, np.integer)):
        s = int(size)
        if s < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if height <= width:
            return s, max(1, int(width * s / height))
        return max(1, int(height * s / width)), s
    hw = tuple(int(x) for x in size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size must be an int (shorter side) or (H, W), got {size!r}")
    return hw  # type: ignore[return-value]


def _rot_k(rotation: int) -> int:
    return (int(round(rotation / 90.0)) % 4)


def _to_display(frame: np.ndarray, rotation: int) -> np.ndarray:
    k = _rot_k(rotation)
    return np.ascontiguousarray(np.rot90(frame, k)) if k else frame


# =========================================================================== backends
# Each backend yields one (frame HxWx3 uint8 in stored orientation, absolute time) per
# target time, in order. ``out_hw`` is the stored-orientation output size.


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except Exception:
        return False
    return True


def ffmpeg_available() -> bool:
    return shutil.which("ffmpeg") is not None


def _decord_frames(info: VideoInfo, targets_abs: np.ndarray, out_hw: Tuple[int, int],
                   chunk: int = 64) -> Iterator[Tuple[np.ndarray, float]]:
    import decord

    h, w = out_hw
    kw = {}
    if (h, w) != _stored_hw(info):
        kw = {"width": int(w), "height": int(h)}
    vr = decord.VideoReader(info.path, ctx=decord.cpu(0), num_threads=0, **kw)
    n = len(vr)
    if n == 0:
        raise RuntimeError("decord reports 0 frames")
    ts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64)[:, 0]
    if np.any(np.diff(ts) < 0):
        raise RuntimeError("decord frame timestamps are not sorted")
    # decord's clock starts at 0 for the first frame; targets are absolute (stream clock)
    idx = select_frames(ts, targets_abs - info.start_time + ts[0])
    i = 0
    while i < idx.size:
        j = min(idx.size, i + chunk)
        uniq, inv = np.unique(idx[i:j], return_inverse=True)
        batch = vr.get_batch(uniq.tolist())
        # LAVIS switches decord's global bridge to torch: accept both array types
        batch = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch.numpy())
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise RuntimeError(f"decord returned frames of shape {batch.shape}")
        for k in range(j - i):
            u = int(inv[k])
            yield batch[u], float(ts[uniq[u]] - ts[0] + info.start_time)
        i = j


def _stored_hw(info: VideoInfo) -> Tuple[int, int]:
    if info.rotation in (90, 270):
        return info.width, info.height
    return info.height, info.width


def _pyav_frames(info: VideoInfo, targets_abs: np.ndarray, out_hw: Tuple[int, int], mode: str = "auto",
                 seek_factor: float = DEFAULT_SEEK_FACTOR, stats: Optional[Dict[str, int]] = None
                 ) -> Iterator[Tuple[np.ndarray, float]]:
    import av

    h, w = out_hw
    stats = stats if stats is not None else {}
    stats.setdefault("seeks", 0)
    stats.setdefault("decoded", 0)
    stats.setdefault("bad_packets", 0)
    native = (h, w) == _stored_hw(info)

    def convert(fr) -> np.ndarray:
        if native:
            return fr.to_ndarray(format="rgb24")
        return fr.reformat(width=int(w), height=int(h), format="rgb24").to_ndarray()

    gap_seek = seek_factor * info.keyframe_interval if math.isfinite(info.keyframe_interval) else math.inf
    container = open_av(info.path)
    try:
        s = container.streams.video[[i for i, v in enumerate(container.streams.video)
                                     if not is_cover_art(v)][0]]
        s.thread_type = "AUTO"
        tb = float(s.time_base)
        n_t = int(targets_abs.size)
        k = 0            # next target to answer
        prev = None      # (frame, time) of the last decoded frame strictly before targets[k]
        cur_time = -math.inf
        seeked_for = -1  # the target a seek was made for (no second seek for the same target)

        def want_seek(t_next: float) -> bool:
            if mode == "sequential" or seeked_for == k:
                return False
            if mode == "seek":
                return t_next - cur_time > 1.5 / max(info.fps, 1e-3)
            return t_next - cur_time > gap_seek

        def packets(seek_to: Optional[float]):
            if seek_to is not None:
                container.seek(max(0, int(math.floor((seek_to - TIE_EPS) / tb)) - 1), stream=s,
                               backward=True, any_frame=False)
                stats["seeks"] += 1
            for pk in container.demux(s):
                if pk.size == 0 and pk.pts is None:  # flush packet
                    try:
                        yield from pk.decode()
                    except av.FFmpegError:
                        pass
                    continue
                try:
                    yield from pk.decode()
                except av.FFmpegError:
                    stats["bad_packets"] += 1
                    if stats["bad_packets"] > max(8, info.n_frames // 20):
                        raise VideoDecodeError(info.path, f"too many undecodable packets "
                                                          f"({stats['bad_packets']}); the file is corrupt")

        seek_to = None
        if mode != "sequential" and targets_abs[0] - info.start_time > gap_seek:
            seek_to, seeked_for = float(targets_abs[0]), 0
        while k < n_t:
            restart = False
            for fr in packets(seek_to):
                if fr.pts is None and fr.time is None:
                    continue
                t = float(fr.time) if fr.time is not None else float(fr.pts) * tb
                stats["decoded"] += 1
                if seek_to is not None and prev is None and t > targets_abs[k] - TIE_EPS:
                    # landed past the target after a seek: this is the nearest frame we can get
                    prev = (fr, t)
                # answer every target this frame is not strictly before
                while k < n_t and t >= targets_abs[k] - TIE_EPS:
                    src = prev if prev is not None else (fr, t)
                    yield convert(src[0]), src[1]
                    k += 1
                if k >= n_t:
                    break
                prev = (fr, t)
                cur_time = t
                if want_seek(targets_abs[k]):
                    seek_to, seeked_for = float(targets_abs[k]), k
                    prev = None
                    restart = True
                    break
            if k >= n_t:
                break
            if restart:
                continue
            # end of stream: remaining targets take the last frame
            if prev is None:
                raise VideoDecodeError(info.path, "decoding produced no frame")
            last_t = prev[1]
            if targets_abs[k] - last_t > max(2.0, 0.1 * info.duration) and \
                    last_t - info.start_time < TRUNCATED_FRACTION * info.duration - 0.5:
                raise VideoDecodeError(info.path, f"truncated or corrupt file: frames stop at "
                                                  f"{last_t - info.start_time:.2f} s of {info.duration:.2f} s")
            arr = convert(prev[0])
            while k < n_t:
                yield arr, last_t
                k += 1
    finally:
        container.close()


def _ffmpeg_frames(info: VideoInfo, targets_abs: np.ndarray, out_hw_display: Tuple[int, int],
                   clip_length: float, frames_per_clip: int) -> Iterator[Tuple[np.ndarray, float]]:
    """ffmpeg's fps filter picks the same frames (last strictly before each sample time);
    output is already in display orientation (ffmpeg autorotates)."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg is not installed")
    h, w = out_hw_display
    rate = Fraction(int(frames_per_clip)) / Fraction(str(float(clip_length)))
    cmd = [exe, "-nostdin", "-v", "error", "-i", info.path, "-an", "-sn",
           "-vf", f"fps=fps={rate}:round=near,scale={w}:{h}", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    frame_bytes = h * w * 3
    n_t = int(targets_abs.size)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = 0
    last = None
    try:
        assert proc.stdout is not None
        while got < n_t:
            buf = proc.stdout.read(frame_bytes)
            if not buf or len(buf) < frame_bytes:
                break
            last = np.frombuffer(buf, np.uint8).reshape(h, w, 3).copy()
            yield last, float(targets_abs[got])
            got += 1
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr is not None else ""
        proc.wait()
    if got < n_t:
        if last is None:
            raise RuntimeError(f"ffmpeg produced no frames: {err.strip()[:300]}")
        # samples past the fps filter's last slot take the video's last frame
        tail = subprocess.run([exe, "-nostdin", "-v", "error", "-sseof", "-3", "-i", info.path, "-an", "-sn",
                               "-vf", f"scale={w}:{h}", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
                              capture_output=True).stdout
        if len(tail) >= frame_bytes:
            k = len(tail) // frame_bytes
            last = np.frombuffer(tail[(k - 1) * frame_bytes: k * frame_bytes], np.uint8).reshape(h, w, 3).copy()
        while got < n_t:
            yield last, float(targets_abs[got])
            got += 1


# =========================================================================== clip decoding


def _plan(info: VideoInfo, clip_length: float, frames_per_clip: int,
          offsets: Optional[Sequence[float]] = None) -> Tuple[int, np.ndarray]:
    require_video(info)
    n = info.n_clips(clip_length)
    targets = sample_times(n, clip_length, frames_per_clip, offsets)
    return n, targets


def _backend_chain(backend: str, info: VideoInfo, uniform: bool = True) -> List[str]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "ffmpeg" and not uniform:
        raise ValueError("the ffmpeg CLI backend only samples uniformly spaced frames (no offsets)")
    if backend != "auto":
        return [backend]
    chain = []
    if decord_available() and info.rotation == 0:
        chain.append("decord")
    chain.append("pyav")
    if ffmpeg_available() and uniform:
        chain.append("ffmpeg")
    return chain


def _frame_stream(info: VideoInfo, abs_t: np.ndarray, disp_hw: Tuple[int, int], chain: List[str],
                  mode: str = "auto", seek_factor: float = DEFAULT_SEEK_FACTOR, used: Optional[List[str]] = None,
                  stats: Optional[Dict[str, int]] = None,
                  ffmpeg_grid: Optional[Tuple[float, int]] = None) -> Iterator[Tuple[np.ndarray, float]]:
    """One ``(frame (H, W, 3) uint8 display orientation, seconds from the first frame)`` per
    absolute target time of ``abs_t`` (non-decreasing), trying the backends of ``chain`` in
    order; a backend failing part-way is resumed by the next from the first missing target.
    The ffmpeg backend only serves a clip grid (``ffmpeg_grid = (clip_length, frames_per_clip)``)."""
    used = used if used is not None else []
    errors: List[str] = []
    stored_hw = (disp_hw[1], disp_hw[0]) if info.rotation in (90, 270) else disp_hw
    done = 0
    for b in chain:
        if done >= abs_t.size:
            return
        if b == "ffmpeg" and ffmpeg_grid is None:
            continue
        try:
            if b == "decord":
                it = _decord_frames(info, abs_t[done:], stored_hw)
            elif b == "pyav":
                it = _pyav_frames(info, abs_t[done:], stored_hw, mode=mode, seek_factor=seek_factor, stats=stats)
            else:
                it = _skip(_ffmpeg_frames(info, abs_t, disp_hw, ffmpeg_grid[0], ffmpeg_grid[1]), done)
            first = True
            for fr, t in it:
                if first:
                    used.append(b)
                    first = False
                if b != "ffmpeg":
                    fr = _to_display(fr, info.rotation)
                if fr.shape[:2] != tuple(disp_hw):
                    raise RuntimeError(f"{b} returned {fr.shape[:2]} frames, expected {tuple(disp_hw)}")
                yield fr, t - info.start_time
                done += 1
            return
        except VideoDecodeError:
            raise  # a verdict about the file (truncated, corrupt), not about the backend
        except Exception as e:  # backend-specific failure: try the next one
            errors.append(f"{b}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            logger.debug("%s: backend %s failed after %d frames: %s", info.path, b, done, e)
    if done < abs_t.size:
        raise VideoDecodeError(info.path, "all decoders failed: " + ("; ".join(errors) or "no usable backend"))


def iter_clip_batches(path: Union[str, "os.PathLike[str]", VideoInfo], clip_length: float = 2.0,
                      frames_per_clip: int = 1, size: SizeSpec = None, batch_clips: int = 32,
                      backend: str = "auto", mode: str = "auto", seek_factor: float = DEFAULT_SEEK_FACTOR,
                      used_backends: Optional[List[str]] = None, stats: Optional[Dict[str, int]] = None,
                      offsets: Optional[Sequence[float]] = None) -> Iterator[ClipBatch]:
    """Yield :class:`ClipBatch` es of at most ``batch_clips`` clips (memory stays bounded).

    Args:
        path: video file (or its :class:`VideoInfo` from :func:`probe`).
        clip_length: seconds per clip.
        frames_per_clip: samples per clip (1 = centre frame); ignored with ``offsets``.
        offsets: sample times in seconds from each clip's start (module docstring); frames
            are returned in this order.
        size: resize on decode (int shorter side, (H, W), or None).
        backend: ``auto`` | ``decord`` | ``pyav`` | ``ffmpeg``.
        mode: PyAV seek policy ``auto`` | ``sequential`` | ``seek``.
        used_backends: if given, the names of the backends that produced frames are appended.
        stats: if given, PyAV counters (``seeks``, ``decoded``, ``bad_packets``) are added.
    Raises :class:`VideoDecodeError` (possibly after some batches were yielded).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_clips < 1:
        raise ValueError("batch_clips must be >= 1")
    info = path if isinstance(path, VideoInfo) else probe(path)
    n, targets = _plan(info, clip_length, frames_per_clip, offsets)
    F = int(targets.shape[1])
    # decoders answer sample times in increasing order: decode sorted, put back in offsets order
    order = np.argsort(targets[0], kind="stable") if n else np.arange(F)
    targets = targets[:, order]
    disp_hw = output_size(info.height, info.width, size)
    abs_t = targets.reshape(-1) + info.start_time
    chain = _backend_chain(backend, info, uniform=offsets is None)
    stream = _frame_stream(info, abs_t, disp_hw, chain, mode=mode, seek_factor=seek_factor,
                           used=used_backends, stats=stats,
                           ffmpeg_grid=(clip_length, F) if offsets is None else None)

    H, W = disp_hw
    buf = np.empty((min(batch_clips, n), F, H, W, 3), np.uint8)
    tbuf = np.empty((min(batch_clips, n), F), np.float64)
    pos = 0
    start = 0
    for fr, t in stream:
        c, j = divmod(pos - start * F, F)
        buf[c, order[j]] = fr
        tbuf[c, order[j]] = t
        pos += 1
        if pos == (start + buf.shape[0]) * F or pos == n * F:
            b = (pos // F) - start
            yield ClipBatch(start=start, frames=buf[:b].copy(), times=tbuf[:b].copy())
            start += b
    if start < n:
        raise VideoDecodeError(info.path, f"decoders produced {start} of {n} clips")


def _skip(it: Iterator, n: int) -> Iterator:
    for i, x in enumerate(it):
        if i >= n:
            yield x


def decode_clips(path: Union[str, "os.PathLike[str]", VideoInfo], clip_length: float = 2.0,
                 frames_per_clip: int = 1, size: SizeSpec = None, backend: str = "auto", mode: str = "auto",
                 seek_factor: float = DEFAULT_SEEK_FACTOR, offsets: Optional[Sequence[float]] = None) -> ClipFrames:
    """Decode every clip of a video at once: frames (N, F, H, W, 3) uint8 (see
    :func:`iter_clip_batches` for the arguments; use that for long videos)."""
    info = path if isinstance(path, VideoInfo) else probe(path)
    n, targets = _plan(info, clip_length, frames_per_clip, offsets)
    used: List[str] = []
    batches = list(iter_clip_batches(info, clip_length, frames_per_clip, size, batch_clips=max(1, n),
                                     backend=backend, mode=mode, seek_factor=seek_factor, used_backends=used,
                                     offsets=offsets))
    frames = np.concatenate([b.frames for b in batches], axis=0)
    times = np.concatenate([b.times for b in batches], axis=0)
    return ClipFrames(frames=frames, times=times, targets=targets, info=info, backends=used)


def frame_index_times(info: VideoInfo, indices: np.ndarray) -> np.ndarray:
    """Absolute sample times that select frames ``indices`` (presentation order) under the
    "last frame strictly before" rule: half-way between frame ``i`` and frame ``i + 1`` (the
    last frame: half a median frame interval after it)."""
    ft = info.frame_times
    if ft is None or ft.size != info.n_frames:
        raise VideoDecodeError(info.path, "no frame timestamps: probe() the file first")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= ft.size):
        bad = int(idx[(idx < 0) | (idx >= ft.size)][0])
        raise ValueError(f"{info.path}: frame index {bad} out of range for {ft.size} frames")
    step = float(np.median(np.diff(ft))) if ft.size > 1 else 1.0 / max(info.fps, 1e-3)
    nxt = np.append(ft[1:], ft[-1] + max(step, 2 * TIE_EPS))
    return ft[idx] + 0.5 * (nxt[idx] - ft[idx])


def decode_frames(path: Union[str, "os.PathLike[str]", VideoInfo], indices: Sequence[int], size: SizeSpec = None,
                  backend: str = "auto", mode: str = "auto") -> np.ndarray:
    """Frames ``indices`` (0-based, presentation order over the :attr:`VideoInfo.n_frames`
    decodable frames; repeats allowed) -> (N, H, W, 3) uint8 in display orientation, in the
    given order. Decoded with decord, PyAV as fallback (:func:`frame_index_times` turns indices
    into sample times). Raises :class:`VideoDecodeError` naming the file."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    info = path if isinstance(path, VideoInfo) else probe(path)
    require_video(info)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    disp_hw = output_size(info.height, info.width, size)
    out = np.empty((idx.size, disp_hw[0], disp_hw[1], 3), np.uint8)
    if idx.size == 0:
        return out
    order = np.argsort(idx, kind="stable")                  # backends need non-decreasing targets
    abs_t = frame_index_times(info, idx[order])
    chain = [b for b in _backend_chain(backend, info) if b != "ffmpeg"]
    if not chain:
        raise ValueError("decode_frames decodes with decord or pyav, not the ffmpeg command line")
    k = 0
    for fr, _t in _frame_stream(info, abs_t, disp_hw, chain, mode=mode):
        out[order[k]] = fr
        k += 1
    if k < idx.size:
        raise VideoDecodeError(info.path, f"decoders produced {k} of {idx.size} frames")
    return out


def decode_all_frames(path: Union[str, "os.PathLike[str]"], size: SizeSpec = None) -> Tuple[np.ndarray, np.ndarray]:
    """Every frame of a video, decoded and converted with PyAV (the naive baseline of
    ``bench/extract.py``): ((T, H, W, 3) uint8 display orientation, (T,) seconds from the
    first frame, presentation order)."""
    info = probe(path)
    require_video(info)
    disp_hw = output_size(info.height, info.width, size)
    h, w = (disp_hw[1], disp_hw[0]) if info.rotation in (90, 270) else disp_hw
    container = open_av(info.path)
    frames, times = [], []
    try:
        s = [v for v in container.streams.video if not is_cover_art(v)][0]
        s.thread_type = "AUTO"
        for fr in container.decode(s):
            frames.append(_to_display(fr.reformat(width=w, height=h, format="rgb24").to_ndarray(), info.rotation))
            times.append(float(fr.time) - info.start_time)
    finally:
        container.close()
    return np.stack(frames), np.asarray(times)


# =========================================================================== many files


def decode_many(paths: Iterable[Union[str, "os.PathLike[str]"]], fn: Callable[[str, ClipFrames], None],
                clip_length: float = 2.0, frames_per_clip: int = 1, size: SizeSpec = None,
                backend: str = "auto", mode: str = "auto", print_summary: bool = True) -> DecodeSummary:
    """Decode each file and call ``fn(path, clip_frames)``; a file that fails (decoding or in
    ``fn``) is recorded with its reason and the batch goes on. The summary is printed (and
    logged) at the end when ``print_summary``."""
    summary = DecodeSummary()
    for p in paths:
        p = os.fspath(p)
        try:
            fn(p, decode_clips(p, clip_length, frames_per_clip, size, backend=backend, mode=mode))
        except (VideoDecodeError, OSError, ValueError, RuntimeError) as e:
            summary.add_error(p, e)
            logger.warning("%s", e if isinstance(e, VideoDecodeError) else f"{p}: {e}")
            continue
        summary.ok.append(p)
    if print_summary:
        print(summary.format())
    return summary
