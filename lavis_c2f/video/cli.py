"""``lavis-c2f extract VIDEO_DIR --out DIR``, and the video options every command shares.

``register(subparsers)`` is called by :mod:`lavis_c2f.cli` (module listed in
``COMMAND_MODULES``). :func:`add_video_arguments` and :func:`backbone_config` are the options of
``extract``, ``index videos`` (:mod:`lavis_c2f.index.cli`), ``search`` and ``demo``.

Exit codes of ``extract``: 0 when at least one video has features in ``--out`` after the run
(extracted now or by an earlier run), 1 when none has (every file failed), 2 on bad usage.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, Optional

from lavis_c2f.common import dist as c2f_dist
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.video.extract import EXTRACT_DEFAULTS, extract_corpus

logger = logging.getLogger(__name__)

BACKBONE_CHOICES = ("offline", "clip_hf", "clip_lavis", "random")
#: with the SlowFast video features (alone, or with CLIP in either order: the features of a
#: CLIP+SlowFast index serve QD-DETR's and MESM's checkpoints alike)
FEATURE_BACKBONE_CHOICES = BACKBONE_CHOICES + ("slowfast", "slowfast+clip_hf", "clip_hf+slowfast",
                                               "slowfast+clip_lavis", "clip_lavis+slowfast")
#: the CLIP backbones and the config key their ``--clip-path`` fills (CLIPModel folder / checkpoint file)
CLIP_PATH_KEYS = {"clip_hf": "clip_path", "clip_lavis": "checkpoint"}


def backbone_options(backbone: Optional[str], clip_path: Optional[str],
                     clip_model_type: Optional[str] = None, slowfast_path: Optional[str] = None) -> Dict[str, Any]:
    """The backbone config of the command-line options shared by ``extract``, ``index videos``,
    ``search`` and ``demo``: ``--clip-path`` is required by the CLIP backbones and
    ``--slowfast-path`` by SlowFast (local weights, nothing is downloaded), each refused by
    backbones without that stream; ``--clip-model-type`` is clip_lavis's."""
    parts = str(backbone).split("+") if backbone else []
    clip = [p for p in parts if p in CLIP_PATH_KEYS]
    cfg: Dict[str, Any] = {}
    if clip_path:
        if not clip:
            raise ConfigError("--clip-path needs --backbone clip_hf or clip_lavis" + (f", not {backbone}" if backbone
                                                                                        else ""))
        cfg[CLIP_PATH_KEYS[clip[0]]] = clip_path
    elif clip:
        raise ConfigError(f"--backbone {backbone} needs --clip-path (local CLIP weights; nothing is downloaded)")
    if slowfast_path:
        if "slowfast" not in parts:
            raise ConfigError("--slowfast-path needs a backbone with SlowFast (slowfast, slowfast+clip_hf, ...)"
                              + (f", not {backbone}" if backbone else ""))
        cfg["slowfast_checkpoint"] = slowfast_path
    elif "slowfast" in parts:
        raise ConfigError(f"--backbone {backbone} needs --slowfast-path (a local SlowFast R50 8x8 Kinetics-400 "
                          "checkpoint such as SLOWFAST_8x8_R50.pkl; nothing is downloaded)")
    if clip_model_type and "clip_lavis" in parts:
        cfg["model_type"] = clip_model_type
    return cfg


def backbone_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The backbone config of the :func:`add_video_arguments` options."""
    cfg = backbone_options(args.backbone, args.clip_path, getattr(args, "clip_model_type", None),
                           getattr(args, "slowfast_path", None))
    if args.device:
        cfg["device"] = args.device
    return cfg


def start_ranks(args: argparse.Namespace) -> Dict[str, Any]:
    """The backbone config of the options, after starting the process group when the command
    runs under ``torch.distributed.run`` (then each rank's encoder runs on its own device:
    ``cuda:LOCAL_RANK`` on GPUs, else the CPU, unless ``--device`` says otherwise)."""
    cfg = backbone_config(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cfg["device"] = str(c2f_dist.init_from_env(args.device, timeout_s=int(EXTRACT_DEFAULTS["dist_timeout_s"])))
    return cfg


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    """VIDEO_DIR and the backbone and clip-sampling options (defaults: configs/video/extract.yaml)."""
    d = EXTRACT_DEFAULTS
    p.add_argument("video_dir", metavar="VIDEO_DIR", help="folder of video files (searched recursively)")
    p.add_argument("--backbone", choices=FEATURE_BACKBONE_CHOICES, default=d["backbone"],
                   help="frame encoder: offline (weak, packaged weights), clip_hf (transformers CLIP folder), "
                        "clip_lavis (LAVIS CLIP checkpoint), random (tests), slowfast (SlowFast R50 clip features as "
                        "in QVHighlights), or SlowFast and CLIP side by side (slowfast+clip_hf, ...)")
    p.add_argument("--clip-path", default=None,
                   help="clip_hf: local CLIPModel folder; clip_lavis: local checkpoint file")
    p.add_argument("--slowfast-path", default=None,
                   help="slowfast: local SlowFast R50 8x8 Kinetics-400 checkpoint (PySlowFast SLOWFAST_8x8_R50.pkl "
                        "or a .pyth)")
    p.add_argument("--clip-model-type", default=None,
                   help="clip_lavis: 'openai' (default) or an open_clip architecture name such as ViT-B-32")
    p.add_argument("--clip-length", type=float, default=d["clip_length"],
                   help=f"seconds per clip (default {d['clip_length']:g})")
    p.add_argument("--frames-per-clip", type=int, default=d["frames_per_clip"],
                   help="frames per clip, features averaged (1 = the centre frame)")
    p.add_argument("--batch-size", type=int, default=None, help="frames per encoder call")
    p.add_argument("--workers", type=int, default=d["workers"],
                   help="decoding processes (0: decode in the main process)")
    p.add_argument("--device", default=None, help="torch device of the encoder (cpu, cuda)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_extract(args: argparse.Namespace) -> int:
    res = extract_corpus(args.video_dir, args.out, backbone=args.backbone, clip_length=args.clip_length,
                         frames_per_clip=args.frames_per_clip, batch_size=args.batch_size, workers=args.workers,
                         store=args.store, batch_clips=args.batch_clips, decode_backend=args.decoder,
                         backbone_config=start_ranks(args), progress=not args.no_progress)
    if res.n_with_features == 0:
        print("lavis-c2f extract: error: no video could be extracted", file=sys.stderr)
        return 1
    return 0


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "extract", help="decode videos and write per-clip features (Moment-DETR layout)",
        description="Sample clip frames of every video under VIDEO_DIR, encode them, and write "
                    "OUT/clip_features/{vid}.npz['features'] + OUT/videos.jsonl. Reruns skip finished videos; "
                    "per-file errors are summarised at the end (exit 0 if any video has features).")
    add_video_arguments(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--store", choices=["npz", "wds"], default=EXTRACT_DEFAULTS["store"], help="feature store type")
    p.add_argument("--batch-clips", type=int, default=EXTRACT_DEFAULTS["batch_clips"],
                   help="clips decoded per batch (memory bound)")
    p.add_argument("--decoder", choices=["auto", "decord", "pyav", "ffmpeg"],
                   default=EXTRACT_DEFAULTS["decode_backend"],
                   help="decoding backend (auto: decord, then PyAV, then the ffmpeg CLI)")
    p.set_defaults(func=cmd_extract)
