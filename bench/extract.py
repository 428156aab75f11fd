"""Video decoding + embedding benchmark: clip sampling vs a naive decode-everything baseline.

Test videos (H.264, 25 fps, moving ``testsrc2`` pattern) are generated with the ffmpeg CLI into
a temporary folder for every (resolution, duration, keyframe interval) combination. For
each video and sampling density (``--clip-length`` seconds per clip, ``--frames-per-clip``
samples per clip) the same frames (shorter side ``--size``) are produced by:

* ``naive``     -- PyAV decodes and converts every frame, then the samples are picked
                  (:func:`lavis_c2f.video.decode.decode_all_frames` + ``select_frames``);
* ``decord``    -- decord ``get_batch`` on the sampled indices;
* ``pyav-seq``  -- PyAV, sequential decoding, only sampled frames converted;
* ``pyav-seek`` -- PyAV, a seek before every sample;
* ``pyav-auto`` -- PyAV, seek only when the next sample is more than ``seek_factor`` keyframe
                  intervals ahead (the library default);
* ``auto``      -- what :func:`iter_clip_batches` does by default (decord, PyAV fallback).

Reported per row: wall seconds, sampled frames per second, video seconds per wall second,
and the speed-up over ``naive`` measured in the same run. With ``--embed`` the sampled
frames are also embedded with a backbone (``random`` by default, or ``offline``) and the
end-to-end frames/s (decode + embed) is reported for ``naive`` and ``auto``.

Every timing is the best of ``--repeat`` runs; ``torch.set_num_threads(--threads)`` (default 1,
since the machine's 2 cores are shared) and decoders run single-process.

    python bench/extract.py [--resolutions 320x180 640x360 1280x720] [--durations 30 120]
                            [--gops 250 25] [--embed offline] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

import numpy as np


def make_video(path: str, w: int, h: int, seconds: float, gop: int, fps: int = 25) -> None:
    cmd = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
           f"testsrc2=size={w}x{h}:rate={fps}", "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast",
           "-pix_fmt", "yuv420p", "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0", path]
    subprocess.run(cmd, check=True)


def best_of(fn: Callable[[], Any], repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolutions", nargs="+", default=["320x180", "640x360", "1280x720"])
    ap.add_argument("--durations", nargs="+", type=float, default=[30.0, 120.0])
    ap.add_argument("--gops", nargs="+", type=int, default=[250, 25],
                    help="keyframe intervals in frames (25 fps: 250 = 10 s, 25 = 1 s)")
    ap.add_argument("--clip-length", nargs="+", type=float, default=[2.0, 0.5],
                    help="seconds per clip (one sample per clip unless --frames-per-clip)")
    ap.add_argument("--frames-per-clip", type=int, default=1)
    ap.add_argument("--size", type=int, default=224, help="shorter side of the decoded frames")
    ap.add_argument("--methods", nargs="+", default=["naive", "decord", "pyav-seq", "pyav-seek", "pyav-auto", "auto"])
    ap.add_argument("--embed", default=None, choices=[None, "random", "offline"],
                    help="also embed the sampled frames with this backbone")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine's cores are shared)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--keep", default=None, help="keep the generated videos in this folder")
    args = ap.parse_args(argv)

    if shutil.which("ffmpeg") is None:
        print("bench/extract.py needs the ffmpeg CLI to generate test videos", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    from lavis_c2f.video.decode import decode_all_frames, decord_available, iter_clip_batches, select_frames
    from lavis_c2f.video.probe import probe

    backbone = None
    if args.embed:
        from lavis_c2f.video.backbones import build_backbone

        backbone = build_backbone(args.embed)

    def sampled(path: str, cl: float, backend: str, mode: str = "auto") -> np.ndarray:
        return np.concatenate([b.frames for b in iter_clip_batches(path, cl, args.frames_per_clip, args.size,
                                                                   backend=backend, mode=mode)])

    def naive(path: str, cl: float) -> np.ndarray:
        frames, times = decode_all_frames(path, size=args.size)
        from lavis_c2f.video.decode import sample_times
        from lavis_c2f.video.probe import num_clips

        dur = probe(path).duration
        idx = select_frames(times, sample_times(num_clips(dur, cl), cl, args.frames_per_clip))
        return frames[idx]

    methods: Dict[str, Callable[[str, float], np.ndarray]] = {
        "naive": naive,
        "decord": lambda p, cl: sampled(p, cl, "decord"),
        "pyav-seq": lambda p, cl: sampled(p, cl, "pyav", "sequential"),
        "pyav-seek": lambda p, cl: sampled(p, cl, "pyav", "seek"),
        "pyav-auto": lambda p, cl: sampled(p, cl, "pyav", "auto"),
        "auto": lambda p, cl: sampled(p, cl, "auto"),
    }
    if not decord_available():
        args.methods = [m for m in args.methods if m != "decord"]
    work = args.keep or tempfile.mkdtemp(prefix="c2f-bench-extract-")
    os.makedirs(work, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    try:
        header = (f"{'video':<26} {'clip_s':>6} {'method':<10} {'sec':>7} {'samples/s':>10} {'video s/s':>9} "
                  f"{'x naive':>8}" + (f" {'e2e fr/s':>9}" if backbone is not None else ""))
        print(header)
        print("-" * len(header))
        for res in args.resolutions:
            w, h = (int(x) for x in res.split("x"))
            for dur in args.durations:
                for gop in args.gops:
                    path = os.path.join(work, f"v_{w}x{h}_{int(dur)}s_g{gop}.mp4")
                    if not os.path.isfile(path):
                        make_video(path, w, h, dur, gop)
                    info = probe(path)
                    for cl in args.clip_length:
                        base_t = None
                        ref = None
                        for m in args.methods:
                            t, frames = best_of(lambda: methods[m](path, cl), args.repeat)
                            n = int(frames.shape[0] * frames.shape[1]) if frames.ndim == 5 else int(frames.shape[0])
                            if ref is None:
                                ref = frames
                            same = bool(frames.shape == ref.shape)
                            if m == "naive":
                                base_t = t
                            row = {"video": os.path.basename(path), "width": w, "height": h, "duration": dur,
                                   "gop_frames": gop, "keyframe_interval_s": info.keyframe_interval,
                                   "clip_length": cl, "frames_per_clip": args.frames_per_clip, "method": m,
                                   "seconds": round(t, 4), "samples": n, "samples_per_s": round(n / t, 1),
                                   "video_s_per_s": round(dur / t, 1),
                                   "speedup_vs_naive": round(base_t / t, 2) if base_t else None,
                                   "same_shape": same, "torch_threads": args.threads}
                            if backbone is not None and m in ("naive", "auto"):
                                flat = frames.reshape((-1,) + frames.shape[-3:])
                                te, _ = best_of(lambda: backbone.encode_frames(flat), 1)
                                row["embed_seconds"] = round(te, 4)
                                row["e2e_frames_per_s"] = round(n / (t + te), 1)
                            rows.append(row)
                            print(f"{row['video']:<26} {cl:>6.2f} {m:<10} {t:>7.3f} {row['samples_per_s']:>10.1f} "
                                  f"{row['video_s_per_s']:>9.1f} "
                                  f"{(row['speedup_vs_naive'] or float('nan')):>8.2f}"
                                  + (f" {row.get('e2e_frames_per_s', float('nan')):>9.1f}"
                                     if backbone is not None else ""))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": args.threads, "size": args.size, "embed": args.embed}
    if args.json:
        from lavis_c2f.common.io import write_json

        write_json({"meta": meta, "rows": rows}, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
