"""What a video file is: :func:`probe` (duration, frame rate, frame timestamps, size and
rotation, keyframe interval, streams) into a :class:`VideoInfo`, with the clip count of the
sampling rule (:func:`num_clips`, :mod:`lavis_c2f.video.decode`), listing the videos of a
folder (:func:`list_videos`), and the outcome of a batch over many files
(:class:`DecodeSummary`, :func:`probe_many`).

Every per-file problem raises :class:`~lavis_c2f.common.errors.VideoDecodeError` ``(path,
reason)``: missing or empty file, not a media container, mp4 without its index (truncated
download), no video stream (audio-only), a stream without frames, a file whose packets stop
well before its declared duration (truncated).

This module needs numpy and PyAV; it does not import LAVIS or torch.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from lavis_c2f.common.errors import VideoDecodeError  # noqa: F401  (raised here; defined with the other user errors)

logger = logging.getLogger(__name__)

#: a stream whose readable packets end before this fraction of the declared duration is truncated
TRUNCATED_FRACTION = 0.95


# =========================================================================== clips


def num_clips(duration: float, clip_length: float) -> int:
    """``max(1, floor(duration / clip_length + 0.5))`` for a positive duration, else 0."""
    if clip_length <= 0:
        raise ValueError(f"clip_length must be > 0, got {clip_length}")
    if not (duration > 0) or not math.isfinite(duration):
        return 0
    return max(1, int(math.floor(duration / clip_length + 0.5 + 1e-9)))


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns about a file.

    Attributes:
        duration: seconds of the video stream (first frame to the end of the last frame);
            for audio-only files the container / audio duration.
        fps: average frame rate (frames / second) measured from the timestamps.
        n_frames: number of readable video frames (packets).
        width, height: display size (after rotation).
        rotation: counter-clockwise degrees to turn decoded frames to display orientation
            (0, 90, 180 or 270).
        has_video, has_audio: stream presence (cover-art pictures do not count as video).
        vfr: the frame intervals vary (variable frame rate).
        start_time: timestamp of the first frame (seconds); sample times are relative to it.
        keyframe_interval: mean seconds between keyframes (``inf`` with a single keyframe).
        codec: video codec name.
        frame_times: (n_frames,) sorted absolute frame timestamps in seconds (not in repr).
    """

    path: str
    duration: float
    fps: float
    n_frames: int
    width: int
    height: int
    rotation: int = 0
    has_video: bool = True
    has_audio: bool = False
    vfr: bool = False
    start_time: float = 0.0
    keyframe_interval: float = math.inf
    codec: str = ""
    frame_times: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def n_clips(self, clip_length: float) -> int:
        """Number of ``clip_length``-second clips (see the module docstring)."""
        return num_clips(self.duration, clip_length)

    def to_dict(self) -> Dict[str, object]:
        return {"path": self.path, "duration": self.duration, "fps": self.fps, "n_frames": self.n_frames,
                "width": self.width, "height": self.height, "rotation": self.rotation,
                "has_video": self.has_video, "has_audio": self.has_audio, "vfr": self.vfr,
                "start_time": self.start_time, "keyframe_interval": self.keyframe_interval,
                "codec": self.codec}


# =========================================================================== probing


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if os.path.isdir(path):
        raise VideoDecodeError(path, "is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")


def open_av(path: str):
    import av

    try:
        return av.open(path, metadata_errors="ignore")
    except av.FFmpegError as e:
        detail = getattr(e, "strerror", None) or str(e)
        raise VideoDecodeError(path, f"not a readable media file ({detail}); it may be truncated (an mp4 "
                                     "whose index is missing) or not a video at all") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VideoDecodeError(path, f"cannot open: {e}") from None


def is_cover_art(stream) -> bool:
    try:
        import av

        return bool(stream.disposition & av.stream.Disposition.attached_pic)
    except Exception:  # older PyAV: no disposition flags
        return False


def probe(path: Union[str, "os.PathLike[str]"]) -> VideoInfo:
    """Read a file's streams and timestamps (demuxing every video packet, no full decode)
    and decode its first frame (rotation, decodability).

    Returns a :class:`VideoInfo`; an audio-only file gives ``has_video=False`` (decoding it
    raises). Raises :class:`VideoDecodeError` for a missing, empty, unreadable, frameless,
    undecodable or truncated file.
    """
    import av

    path = os.fspath(path)
    _check_file(path)
    container = open_av(path)
    try:
        videos = [s for s in container.streams.video if not is_cover_art(s)]
        audios = list(container.streams.audio)
        cont_dur = float(container.duration) / 1e6 if container.duration and container.duration > 0 else None
        if not videos:
            dur = cont_dur
            if dur is None and audios and audios[0].duration and audios[0].time_base:
                dur = float(audios[0].duration * audios[0].time_base)
            return VideoInfo(path=path, duration=float(dur or 0.0), fps=0.0, n_frames=0, width=0, height=0,
                             has_video=False, has_audio=bool(audios), codec="")
        s = videos[0]
        tb = float(s.time_base) if s.time_base else None
        if tb is None or tb <= 0:
            raise VideoDecodeError(path, "video stream has no time base")
        pts: List[int] = []
        keys: List[bool] = []
        durs: List[int] = []
        demux_error = None
        try:
            for pk in container.demux(s):
                t = pk.pts if pk.pts is not None else pk.dts
                if t is None or pk.size == 0:
                    continue
                pts.append(int(t))
                keys.append(bool(pk.is_keyframe))
                durs.append(int(pk.duration or 0))
        except av.FFmpegError as e:
            demux_error = getattr(e, "strerror", None) or str(e)
        indexed = int(s.frames or 0)
        if not pts:
            reason = "video stream has no frames (zero-length video)"
            if demux_error:
                reason = f"no readable video packets ({demux_error}); the file is corrupt or truncated"
            raise VideoDecodeError(path, reason)
        order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
        pts_arr = np.asarray(pts, dtype=np.int64)[order]
        key_arr = np.asarray(keys, dtype=bool)[order]
        times = pts_arr.astype(np.float64) * tb
        n = int(times.size)
        diffs = np.diff(times)
        med = float(np.median(diffs)) if n > 1 else 0.0
        last_dur = float(durs[int(order[-1])]) * tb if durs[int(order[-1])] > 0 else med
        if not (last_dur > 0):
            rate = float(s.average_rate or s.guessed_rate or 0) or 25.0
            last_dur = 1.0 / rate
        start = float(times[0])
        duration = float(times[-1] - start + last_dur)
        fps = (n - 1) / float(times[-1] - start) if n > 1 and times[-1] > start else \
            float(s.average_rate or s.guessed_rate or 0.0)
        vfr = bool(n > 2 and med > 0 and np.any(np.abs(diffs - med) > max(0.1 * med, 2.0 * tb)))
        kt = times[key_arr]
        key_interval = float(np.mean(np.diff(kt))) if kt.size > 1 else math.inf
        # truncation: fewer packets than the index announces / packets stop early
        declared = None
        if s.duration and s.duration > 0:
            declared = float(s.duration * s.time_base)
        elif cont_dur is not None:
            declared = cont_dur
        truncated = None
        if indexed > 0 and n < TRUNCATED_FRACTION * indexed:
            truncated = f"only {n} of {indexed} indexed video frames are readable"
        elif declared is not None and declared > 1.0 and duration < TRUNCATED_FRACTION * declared - 0.5:
            truncated = f"video packets stop at {duration:.2f} s of a declared {declared:.2f} s"
        if truncated is None and demux_error and declared is not None and duration < declared - 1.0:
            truncated = f"reading stopped at {duration:.2f} s ({demux_error})"
        if truncated is not None:
            raise VideoDecodeError(path, f"truncated or corrupt file: {truncated}")
        # decode the first frame(s): rotation + decodability
        codec_name = str(s.codec_context.name or "")
        container.close()
        container = open_av(path)
        s = [v for v in container.streams.video if not is_cover_art(v)][0]
        first = None
        errors = 0
        try:
            for pk in container.demux(s):
                try:
                    frames = pk.decode()
                except av.FFmpegError:
                    errors += 1
                    if errors > 8:
                        break
                    continue
                if frames:
                    first = frames[0]
                    break
        except av.FFmpegError:
            first = None
        if first is None:
            raise VideoDecodeError(path, f"no decodable video frame (codec {codec_name!r})")
        rotation = int(round(float(getattr(first, "rotation", 0) or 0))) % 360
        if rotation % 90:
            logger.warning("%s: rotation %d is not a multiple of 90 degrees; ignored", path, rotation)
            rotation = 0
        width, height = int(first.width), int(first.height)
        if rotation in (90, 270):
            width, height = height, width
        meta_rate = float(s.average_rate) if s.average_rate else 0.0
        if meta_rate > 0 and fps > 0 and abs(meta_rate - fps) / fps > 0.05 and not vfr:
            logger.debug("%s: container frame rate %.3f differs from the timestamps' %.3f", path, meta_rate, fps)
        if not (0 < fps < 1000):
            fps = meta_rate if 0 < meta_rate < 1000 else float(n) / max(duration, 1e-9)
        return VideoInfo(path=path, duration=duration, fps=float(fps), n_frames=n, width=width, height=height,
                         rotation=rotation, has_video=True, has_audio=bool(audios), vfr=vfr, start_time=start,
                         keyframe_interval=key_interval, codec=codec_name, frame_times=times)
    finally:
        container.close()


def require_video(info: VideoInfo) -> None:
    """Raise :class:`VideoDecodeError` unless ``info`` describes a decodable video stream."""
    if not info.has_video:
        if info.has_audio:
            raise VideoDecodeError(info.path, f"no video stream (audio-only file, {info.duration:.2f} s)")
        raise VideoDecodeError(info.path, "no video stream: the file holds no audio or video streams "
                                          "(zero-length recording?)")
    if info.n_frames == 0 or not (info.duration > 0):
        raise VideoDecodeError(info.path, "video stream has no frames (zero-length video)")


# =========================================================================== many files


@dataclass
class DecodeSummary:
    """Outcome of a batch over many files: ``ok`` paths, ``failed`` path -> reason, ``skipped``."""

    ok: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    skipped: List[str] = field(default_factory=list)

    def add_error(self, path: str, err: BaseException) -> None:
        self.failed[str(path)] = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"

    @property
    def total(self) -> int:
        return len(self.ok) + len(self.failed) + len(self.skipped)

    def format(self, max_failures: int = 50) -> str:
        lines = [f"{len(self.ok)} ok, {len(self.failed)} failed, {len(self.skipped)} skipped "
                 f"(of {self.total})"]
        for i, (p, r) in enumerate(sorted(self.failed.items())):
            if i >= max_failures:
                lines.append(f"  ... and {len(self.failed) - max_failures} more failures")
                break
            lines.append(f"  FAILED {p}: {r}")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, object]:
        return {"ok": list(self.ok), "failed": dict(self.failed), "skipped": list(self.skipped)}


def probe_many(paths: Iterable[Union[str, "os.PathLike[str]"]]) -> Tuple[Dict[str, VideoInfo], DecodeSummary]:
    """Probe each file; returns ({path: info} of the readable videos, summary). Audio-only
    files count as failures (no video stream)."""
    infos: Dict[str, VideoInfo] = {}
    summary = DecodeSummary()
    for p in paths:
        p = os.fspath(p)
        try:
            info = probe(p)
            require_video(info)
        except VideoDecodeError as e:
            summary.add_error(p, e)
            continue
        infos[p] = info
        summary.ok.append(p)
    return infos, summary


VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp",
                    ".ts", ".mts", ".ogv")


def list_videos(video_dir: Union[str, "os.PathLike[str]"], extensions: Sequence[str] = VIDEO_EXTENSIONS,
                recursive: bool = True) -> List[str]:
    """Sorted video files under a folder (by extension, case-insensitive; hidden files skipped)."""
    root = os.fspath(video_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"video folder not found: {root}")
    exts = tuple(e.lower() for e in extensions)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(exts):
                out.append(os.path.join(dirpath, f))
        if not recursive:
            break
    return sorted(out)
