"""Media fixtures for the video tests: small files generated with the ffmpeg CLI (skipped with a
reason when ffmpeg is missing) and the real Charades clip from ``../shared`` (skipped when absent)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
SHARED_MEDIA = REPO.parent / "shared" / "data" / "media"
CHARADES = SHARED_MEDIA / "charades_sample.mp4"
CHARADES_FEATS = SHARED_MEDIA / "charades_sample_clip_features.npz"

ID_W, ID_H = 64, 48


def id_frames(n: int) -> np.ndarray:
    """(n, H, W) gray frames whose top row of 8x8 blocks encodes the frame number in binary."""
    f = np.zeros((n, ID_H, ID_W), np.uint8)
    for i in range(n):
        for b in range(8):
            if (i >> b) & 1:
                f[i, 0:8, b * 8:(b + 1) * 8] = 255
        f[i, 16:, :] = (i * 2) % 256
    return f


def read_ids(frames: np.ndarray) -> list:
    """Frame numbers of decoded (..., H, W, 3) id frames (display size ID_H x ID_W)."""
    flat = frames.reshape((-1,) + frames.shape[-3:])
    out = []
    for fr in flat:
        g = fr.mean(-1)
        out.append(sum(1 << b for b in range(8) if g[0:8, b * 8:(b + 1) * 8].mean() > 128))
    return out


def _ffmpeg(args, stdin: bytes = None) -> None:
    cmd = ["ffmpeg", "-y", "-loglevel", "error"] + ([] if stdin is not None else ["-nostdin"]) + list(args)
    r = subprocess.run(cmd, input=stdin, capture_output=True)
    if r.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {r.stderr.decode()[-500:]}")


def need_ffmpeg() -> None:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg CLI not installed (apt-get install ffmpeg; setup.sh installs it)")


@pytest.fixture(scope="session")
def charades() -> Path:
    if not CHARADES.is_file():
        pytest.skip(f"../shared not found: {CHARADES} is missing")
    return CHARADES


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict:
    """Generated test files: id30 (100 frames at 30 fps, lossless), vfr, rot90, audio_only, empty,
    notvideo, trunc_fs (faststart mp4 cut in half), trunc_moov (mp4 without its index)."""
    need_ffmpeg()
    d = tmp_path_factory.mktemp("media")
    raw = id_frames(100).tobytes()
    gray_in = ["-f", "rawvideo", "-pix_fmt", "gray", "-s", f"{ID_W}x{ID_H}", "-r", "30", "-i", "-"]
    x264 = ["-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv420p"]
    _ffmpeg(gray_in + x264 + ["-g", "30", str(d / "id30.mp4")], stdin=raw)
    # variable frame rate: frames 0-29 at 30 fps, then 10 fps (timestamps 1.0 + (N - 30) / 10)
    _ffmpeg(gray_in + ["-vf", "setpts='if(lt(N,30),N/30,1+(N-30)/10)/TB'", "-fps_mode", "passthrough"] + x264
            + ["-video_track_timescale", "30000", str(d / "vfr.mp4")], stdin=raw)
    _ffmpeg(["-i", str(d / "id30.mp4"), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(d / "rot90.mp4")])
    _ffmpeg(["-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", "-f", "mp4",
             str(d / "audio_only.mp4")])
    (d / "empty.mp4").write_bytes(b"")
    _ffmpeg(["-f", "lavfi", "-i", f"testsrc=size={ID_W}x{ID_H}:rate=10", "-frames:v", "0", "-c:v", "libx264",
             str(d / "zero_frames.mp4")])
    (d / "notvideo.mp4").write_text("this is not a video\n" * 50)
    # a longer clip with audio for truncation tests (faststart: the index is at the start)
    _ffmpeg(["-f", "lavfi", "-i", "testsrc=size=96x64:rate=25", "-f", "lavfi", "-i", "sine=duration=8",
             "-t", "8", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "25", "-c:a", "aac", "-shortest",
             "-movflags", "+faststart", str(d / "full_fs.mp4")])
    _ffmpeg(["-i", str(d / "full_fs.mp4"), "-c", "copy", str(d / "full_moov_end.mp4")])
    data = (d / "full_fs.mp4").read_bytes()
    (d / "trunc_fs.mp4").write_bytes(data[: len(data) // 2])
    data = (d / "full_moov_end.mp4").read_bytes()
    (d / "trunc_moov.mp4").write_bytes(data[: len(data) // 2])
    return {p.stem: p for p in d.iterdir()}


def ffmpeg_fps_frames(path: Path, rate: str, w: int = ID_W, h: int = ID_H) -> np.ndarray:
    """Frames ffmpeg's fps filter emits (the reference sampling rule)."""
    out = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-vf", f"fps={rate}",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, h, w, 3)

