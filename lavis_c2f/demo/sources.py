"""What the demo searches, and the work behind its buttons (no Streamlit here).

Sources
-------
* a **quickstart run** (``lavis-c2f quickstart``): the embedded demo corpus with the run's trained
  checkpoints (``summary.json`` names them, ``fusion.json`` is the tuned fusion, ``corpus/`` the
  corpus). Without ``--run-dir`` the most recent finished run under ``./c2f_quickstart`` (the
  quickstart's default output location) is used
  (:meth:`~lavis_c2f.pipeline.quickstart_run.QuickstartRun.latest`).
* an **index of videos** (``lavis-c2f index videos VIDEO_DIR --out INDEX``, or built in the app
  from uploaded files with :func:`index_video_files`): searched with the index's backbone,
  zero-shot unless checkpoints are given or recorded in the index.
* **single videos** (uploaded, or a video of the index / demo corpus): grounded with the index's
  predictor, or, for uploads next to the demo corpus (whose text encoder has no video side),
  with a predictor of the ``--backbone`` (default ``offline``), zero-shot unless
  ``--grounder-ckpt`` is given.

Long work reports progress through a callback ``progress(fraction in [0, 1], text)``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from lavis_c2f.common.clock import format_time
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.io import atomic_path
from lavis_c2f.demo.messages import UserError
from lavis_c2f.index.build import index_videos
from lavis_c2f.index.locator import backend_of, locator_text
from lavis_c2f.ops.spans import interval_iou
from lavis_c2f.paths import cache_root, resolve_path
from lavis_c2f.pipeline import cli as pipeline_cli
from lavis_c2f.pipeline.quickstart_run import DEFAULT_ROOT, QuickstartRun
from lavis_c2f.predictor import C2FPredictor, index_backbone_name, resolve_device
from lavis_c2f.video.backbones import build_backbone
from lavis_c2f.video.cli import BACKBONE_CHOICES, backbone_options
from lavis_c2f.video.probe import list_videos
from lavis_c2f.video.extract import extract_corpus

logger = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
QUICKSTART_DIR = DEFAULT_ROOT


# =========================================================================== settings


@dataclass(frozen=True)
class DemoSettings:
    """The demo's command-line settings (see :func:`app_arg_parser`). Frozen: used as a cache key.

    Attributes:
        index: index folder of ``lavis-c2f index videos``.
        run_dir: a quickstart run directory.
        backbone: video/text encoder for uploads (and the index; default: the index's, else offline).
        clip_path: local CLIP weights of ``clip_hf`` / ``clip_lavis``.
        retriever_ckpt, grounder_ckpt: trained checkpoints for the index / uploaded videos.
        device: ``cpu``, ``cuda`` or ``auto``.
        workdir: where uploads, indexes built in the app and plots go.
        quickstart_root: where quickstart runs are looked for and written.
        quickstart_args: extra ``lavis-c2f quickstart`` arguments of the app's "Run the quickstart"
            button (e.g. ``("--n-videos", "40")`` for a smaller, faster run).
    """

    index: Optional[str] = None
    run_dir: Optional[str] = None
    backbone: Optional[str] = None
    clip_path: Optional[str] = None
    retriever_ckpt: Optional[str] = None
    grounder_ckpt: Optional[str] = None
    device: str = "auto"
    workdir: str = ""
    quickstart_root: str = ""
    quickstart_args: Tuple[str, ...] = ()

    def backbone_config(self, backbone: str) -> Dict[str, Any]:
        """The ``backbone_cfg`` of :meth:`C2FPredictor.from_checkpoints` for ``backbone``."""
        return backbone_options(backbone, self.clip_path)


def default_workdir() -> str:
    return os.path.join(cache_root(), "demo")


#: the app's options that are paths (made absolute by ``lavis-c2f demo`` and by the app)
APP_PATH_OPTIONS = ("index", "run_dir", "clip_path", "retriever_ckpt", "grounder_ckpt", "workdir", "quickstart_root")


def add_app_arguments(p: argparse.ArgumentParser) -> None:
    """The app's own options: ``lavis-c2f demo`` offers them (with ``--port``, ``--host``, ...)
    and passes them to the app script, which parses them with :func:`app_arg_parser`."""
    p.add_argument("--index", default=None, help="index of 'lavis-c2f index videos' (your videos): a folder, or a "
                                                  "Milvus *.db path / http(s):// URI with #COLLECTION")
    p.add_argument("--run-dir", default=None, metavar="RUN", help="a 'lavis-c2f quickstart' run directory")
    p.add_argument("--backbone", choices=BACKBONE_CHOICES, default=None,
                   help="video/text encoder for uploaded videos and indexes built in the app (default: the index's, "
                        "else offline)")
    p.add_argument("--clip-path", default=None, help="clip_hf: local CLIPModel folder; clip_lavis: checkpoint file")
    p.add_argument("--retriever-ckpt", default=None, help="trained T-MASS checkpoint for the index")
    p.add_argument("--grounder-ckpt", default=None, help="trained grounder checkpoint for the index / uploaded videos")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--workdir", default=None,
                   help="uploads, indexes built in the app and plots (default: $C2F_CACHE/demo, i.e. "
                        "~/.cache/lavis_c2f/demo)")
    p.add_argument("--quickstart-root", default=None,
                   help="where quickstart runs are looked for and written (default ./c2f_quickstart)")
    p.add_argument("--quickstart-args", default="", metavar="ARGS",
                   help="extra 'lavis-c2f quickstart' arguments for the app's 'Run the quickstart' button, one "
                        "quoted string, e.g. --quickstart-args='--n-videos 40 --stage1-epochs 2' for a smaller, "
                        "faster run (checked on start; --out is chosen by the app)")


def app_arg_parser() -> argparse.ArgumentParser:
    """Arguments of the app script (after ``--`` of ``streamlit run``); ``lavis-c2f demo`` passes them."""
    p = argparse.ArgumentParser(prog="lavis-c2f demo (app)", add_help=True)
    add_app_arguments(p)
    return p


def parse_quickstart_args(text: str) -> Tuple[str, ...]:
    """``--quickstart-args`` (one shell-quoted string) -> the argument tuple, checked against the
    ``lavis-c2f quickstart`` parser. ``--out`` is refused: the app picks ``ROOT/<timestamp>``."""
    try:
        args = tuple(shlex.split(text or ""))
    except ValueError as e:
        raise ConfigError(f"--quickstart-args: {e}: {text!r}") from None
    if any(a == "--out" or a.startswith("--out=") for a in args):
        raise ConfigError("--quickstart-args: leave out --out; runs go under --quickstart-root/<timestamp>")
    parser = argparse.ArgumentParser(prog="lavis-c2f", exit_on_error=False)
    pipeline_cli.register(parser.add_subparsers(dest="command"))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(["quickstart", *args])
    except (SystemExit, argparse.ArgumentError) as e:
        msg = err.getvalue().strip().splitlines()[-1:] or [str(e)]
        raise ConfigError(f"--quickstart-args {text!r} is not valid for 'lavis-c2f quickstart': {msg[0]}") from None
    return args


def settings_from_argv(argv: Sequence[str]) -> DemoSettings:
    """:class:`DemoSettings` from app arguments; paths are made absolute."""
    a = app_arg_parser().parse_args(list(argv))

    def absolute(p: Optional[str]) -> Optional[str]:
        return resolve_path(p) if p else None

    index = locator_text(a.index) if a.index and backend_of(a.index) == "milvus" else absolute(a.index)
    return DemoSettings(index=index, run_dir=absolute(a.run_dir), backbone=a.backbone,
                        clip_path=absolute(a.clip_path), retriever_ckpt=absolute(a.retriever_ckpt),
                        grounder_ckpt=absolute(a.grounder_ckpt), device=a.device or "auto",
                        workdir=absolute(a.workdir) or default_workdir(),
                        quickstart_root=absolute(a.quickstart_root) or resolve_path(QUICKSTART_DIR),
                        quickstart_args=parse_quickstart_args(a.quickstart_args))


# =========================================================================== quickstart runs


def run_quickstart(root: str, progress: ProgressFn, extra_args: Sequence[str] = (),
                   log_path: Optional[str] = None) -> str:
    """Run ``lavis-c2f quickstart --out ROOT/<timestamp>`` in a child process, reporting its
    steps (read from the run's ``progress.json``,
    :class:`~lavis_c2f.pipeline.quickstart_run.QuickstartRun`); returns the run directory. The
    child is stopped if this call is interrupted (the page was closed or re-run). Raises
    ``RuntimeError`` with the log's tail when it fails."""
    run = QuickstartRun(os.path.join(root, datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
    os.makedirs(root, exist_ok=True)
    log_path = log_path or str(run.path) + ".log"
    cmd = [sys.executable, "-m", "lavis_c2f.cli", "quickstart", "--out", str(run.path), *extra_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    progress(0.0, "starting the quickstart (importing LAVIS) ...")
    shown = None
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        tail: List[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line.rstrip()])[-20:]
                step = run.progress()
                if step and step != shown:
                    shown = step
                    i, n, name = step
                    progress((i - 1) / n, f"step {i} of {n}: {name}")
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if code != 0 or run.finished_checkpoints() is None:
        raise RuntimeError(f"the quickstart failed (exit code {code}); log: {log_path}\n" + "\n".join(tail[-5:]))
    progress(1.0, "quickstart finished")
    return str(run.path)


# =========================================================================== predictors


def demo_predictor(settings: DemoSettings, run_dir: str):
    """The demo-corpus predictor of a quickstart run."""
    return C2FPredictor.for_demo_corpus(run_dir, device=settings.device)


def index_predictor(settings: DemoSettings, index: str):
    """The predictor of an index of videos (the index's backbone unless ``--backbone``)."""
    backbone = settings.backbone or index_backbone_name(index) or "offline"
    return C2FPredictor.from_checkpoints(settings.retriever_ckpt, settings.grounder_ckpt, backbone,
                                         settings.backbone_config(backbone), index, None, settings.device)


def video_predictor(settings: DemoSettings):
    """A predictor for uploaded videos without an index (``--backbone``, default offline)."""
    backbone = settings.backbone or "offline"
    return C2FPredictor.from_checkpoints(None, settings.grounder_ckpt, backbone, settings.backbone_config(backbone),
                                         None, None, settings.device)


def mode_lines(predictor, stages: Sequence[str] = ("stage1", "stage2")) -> List[Tuple[str, bool]]:
    """``[(text, trained), ...]``: one line per stage of :meth:`C2FPredictor.describe_mode`."""
    return [(predictor.describe_mode([s]), predictor.mode[s] == "trained") for s in stages]


# =========================================================================== uploads and indexing


def save_upload(data: bytes, name: str, folder: str) -> str:
    """Write uploaded bytes to ``folder/<sha256[:16]>/<safe name>`` once; returns the path."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(str(name))).strip("._") or "video"
    path = os.path.join(folder, digest, safe)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
    return path


@dataclass
class IndexReport:
    """What :func:`index_video_files` did: the index folder, videos indexed, failures (name -> reason)."""

    index: str
    videos: int
    failed: Dict[str, str] = field(default_factory=dict)


def index_video_files(video_dir: str, out_index: str, settings: DemoSettings, progress: ProgressFn) -> IndexReport:
    """Extract features of every video under ``video_dir`` (one by one, reporting progress)
    and build a stage-1 index at ``out_index`` (:func:`lavis_c2f.index.build.index_videos`,
    which then finds every video extracted and only builds the index)."""
    paths = list_videos(video_dir)
    if not paths:
        raise UserError(f"no video files in {video_dir}")
    backbone = settings.backbone or "offline"
    progress(0.0, f"loading the {backbone} backbone ...")
    bb = build_backbone(backbone, config={**settings.backbone_config(backbone), "device": _device(settings)})
    features = out_index + ".features"
    failed: Dict[str, str] = {}
    for i, p in enumerate(paths):
        progress(0.05 + 0.85 * i / len(paths), f"decoding and encoding {os.path.basename(p)} ({i + 1} of "
                                                 f"{len(paths)})")
        res = extract_corpus(video_dir, features, bb, videos=[p], workers=0, progress=False, print_summary=False)
        failed.update({os.path.basename(k): v for k, v in res.summary.failed.items()})
    if len(failed) == len(paths):
        raise UserError("no video could be read: " + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())))
    progress(0.92, "building the index ...")
    ok = [p for p in paths if os.path.basename(p) not in failed]
    index_videos(video_dir, out_index, bb, retriever_checkpoint=settings.retriever_ckpt, features_dir=features,
                 workers=0, progress=False)
    progress(1.0, f"indexed {len(ok)} videos")
    return IndexReport(index=out_index, videos=len(ok), failed=failed)


def _device(settings: DemoSettings) -> str:
    return resolve_device(settings.device)


def new_index_dir(workdir: str) -> Tuple[str, str]:
    """(videos folder, index path) of a new index built in the app."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    root = os.path.join(workdir, "indexes", stamp)
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    return os.path.join(root, "videos"), os.path.join(root, "index")


def link_or_copy(src: str, dst_dir: str) -> str:
    """Put ``src`` in ``dst_dir`` (hard link when possible, else a copy); returns the new path."""
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, os.path.basename(src))
    if not os.path.exists(dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return dst


# =========================================================================== presentation helpers


def example_queries(predictor, n: int = 4) -> List[str]:
    """A few annotated queries of the demo corpus's test split (empty for other corpora)."""
    corpus = getattr(predictor, "corpus", None)
    if corpus is None or not hasattr(corpus, "queries"):
        return []
    try:
        rows = corpus.queries("test") if "test" in getattr(corpus, "splits", []) else corpus.queries()
    except (OSError, ValueError):
        return []
    seen: List[str] = []
    for r in rows:
        q = str(r.get("query", "")).strip()
        if q and q not in seen:
            seen.append(q)
        if len(seen) >= n:
            break
    return seen


def matches_ground_truth(predictor, query: str, vid: str, start: float, end: float, iou: float = 0.5) -> bool:
    """Whether ``[start, end]`` of ``vid`` overlaps an annotated window of ``query`` with IoU >= ``iou``."""
    gt = [w for v, ws in predictor.ground_truth(query) if v == vid for w in ws]
    return any(interval_iou((float(start), float(end)), w) >= iou for w in gt)


def iter_moment_lines(results) -> Iterator[Dict[str, Any]]:
    """Display fields of each moment of :class:`~lavis_c2f.predictor.SearchResults`:
    ``rank, vid, start, end, start_hms, end_hms, length_s, score, stage1, stage2, path``."""
    for m in results:
        yield {"rank": m.rank, "vid": m.vid, "start": float(m.start), "end": float(m.end),
               "start_hms": format_time(m.start), "end_hms": format_time(m.end),
               "length_s": round(float(m.end) - float(m.start), 1), "score": float(m.score),
               "stage1": m.stage1_score, "stage2": m.stage2_score, "path": m.path}


__all__ = ["APP_PATH_OPTIONS", "DemoSettings", "IndexReport", "add_app_arguments", "app_arg_parser",
           "demo_predictor", "example_queries", "index_predictor", "index_video_files",
           "iter_moment_lines", "link_or_copy", "matches_ground_truth", "mode_lines", "new_index_dir",
           "parse_quickstart_args", "run_quickstart", "save_upload",
           "settings_from_argv", "video_predictor"]
