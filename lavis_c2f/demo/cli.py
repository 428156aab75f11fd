"""``lavis-c2f demo``: start the web app (registered by :mod:`lavis_c2f.cli`)::

    lavis-c2f demo                                  # the latest ./c2f_quickstart run, or a button to run one
    lavis-c2f demo --run-dir c2f_quickstart/RUN     # the demo corpus with that run's checkpoints
    lavis-c2f demo --index INDEX [--grounder-ckpt qd_detr.pth]   # an index of your videos
    lavis-c2f demo --port 7860 --host 127.0.0.1

The app is a Streamlit script (:mod:`lavis_c2f.demo.app`) run by ``python -m streamlit run`` with
usage statistics off, no file watcher and headless (nothing is fetched from outside: fonts and
scripts are served by the local server). Arguments are checked here first, so mistakes are one
line on the terminal instead of a broken page. Exit codes: 1 bad arguments, else Streamlit's.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import List

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.net import check_port
from lavis_c2f.demo.sources import APP_PATH_OPTIONS, add_app_arguments, parse_quickstart_args
from lavis_c2f.index.corpora import sidecar_path
from lavis_c2f.index.locator import backend_of
from lavis_c2f.pipeline.quickstart_run import QuickstartRun
from lavis_c2f.video.cli import backbone_options

APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")

#: Streamlit options of the demo: local only, no telemetry, no file watching, no developer menu
STREAMLIT_OPTIONS = {
    "server.headless": "true",
    "browser.gatherUsageStats": "false",
    "server.fileWatcherType": "none",
    "server.runOnSave": "false",
    "global.developmentMode": "false",
    "client.toolbarMode": "viewer",
    "client.showErrorDetails": "none",
    "server.maxUploadSize": "2048",
    "theme.base": "light",
}


def app_args(args: argparse.Namespace) -> List[str]:
    """The app's own arguments (:func:`lavis_c2f.demo.sources.app_arg_parser`), paths absolute."""
    out: List[str] = []
    for name in APP_PATH_OPTIONS:
        v = getattr(args, name, None)
        if v:
            out += [f"--{name.replace('_', '-')}", os.path.abspath(os.path.expanduser(v))]
    if args.backbone:
        out += ["--backbone", args.backbone]
    if getattr(args, "quickstart_args", None):
        out.append(f"--quickstart-args={args.quickstart_args}")   # '=': the value starts with '--'
    out += ["--device", args.device or "auto"]
    return out


def streamlit_command(args: argparse.Namespace) -> List[str]:
    """``python -m streamlit run app.py --server.* ... -- <app args>``."""
    opts = dict(STREAMLIT_OPTIONS, **{"server.address": args.host, "server.port": str(args.port),
                                      "browser.serverAddress": args.host, "browser.serverPort": str(args.port)})
    cmd = [sys.executable, "-m", "streamlit", "run", APP]
    for k, v in opts.items():
        cmd.append(f"--{k}={v}")
    return cmd + ["--"] + app_args(args)


def check_args(args: argparse.Namespace) -> None:
    """Reject what would only fail inside the page (missing paths, wrong kinds of folders)."""
    if args.index and args.run_dir:
        raise ConfigError("give --index (your videos) or --run-dir (the demo corpus), not both; the app can switch "
                          "to an index built from uploaded videos later")
    if args.index and backend_of(args.index) != "milvus":   # a Milvus locator is checked when it opens
        idx = os.path.abspath(os.path.expanduser(args.index))
        if os.path.isfile(os.path.join(idx, "corpus.json")):
            raise ConfigError(f"{idx} is a demo corpus: use --run-dir RUN (a quickstart run directory) instead")
        if not os.path.isdir(idx):
            raise FileNotFoundError(f"index folder not found: {idx}")
        if not os.path.isfile(sidecar_path(idx)):
            raise ConfigError(f"{idx} has no {os.path.basename(sidecar_path(idx))} beside it: the demo "
                              "searches indexes built from videos ('lavis-c2f index videos VIDEO_DIR --out INDEX')")
    if args.run_dir:
        run = os.path.abspath(os.path.expanduser(args.run_dir))
        if not os.path.isdir(run):
            raise FileNotFoundError(f"quickstart run directory not found: {run}")
        if QuickstartRun(run).finished_checkpoints() is None:
            raise ConfigError(f"{run} is not a finished quickstart run (summary.json with existing stage1/stage2 "
                              "checkpoints and corpus/); run 'lavis-c2f quickstart --out RUN' first")
    for name in ("clip_path", "retriever_ckpt", "grounder_ckpt"):
        v = getattr(args, name)
        if v and not os.path.exists(os.path.expanduser(v)):
            raise FileNotFoundError(f"--{name.replace('_', '-')}: not found: {v}")
    backbone_options(args.backbone, args.clip_path)   # --clip-path with a CLIP backbone, and only then
    if getattr(args, "quickstart_args", None):
        parse_quickstart_args(args.quickstart_args)
    check_port(args.host, args.port)


def cmd_demo(args: argparse.Namespace) -> int:
    check_args(args)
    try:
        import streamlit  # noqa: F401
    except ImportError:
        print("lavis-c2f demo: error: the demo needs Streamlit (pip install streamlit)", file=sys.stderr)
        return 1
    cmd = streamlit_command(args)
    if args.print_command:
        print(" ".join(shlex.quote(c) for c in cmd))
        return 0
    print(f"lavis-c2f demo: starting on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    if os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, cmd)  # the server becomes this process (signals, exit code)
    return subprocess.call(cmd)


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "demo", help="web app: search moments in the demo corpus or your own videos (local, Streamlit)",
        description="Start a local web app. Corpus mode: type a query, get ranked moments across videos with "
                    "thumbnails and a player that starts at the moment. One-video mode: upload a video, type a "
                    "query, see the saliency curve with the predicted windows. Without --index / --run-dir it uses "
                    "the latest finished quickstart run under ./c2f_quickstart (or offers to run one).",
        epilog="examples:\n  lavis-c2f demo\n  lavis-c2f demo --run-dir c2f_quickstart/20250101-120000\n"
               "  lavis-c2f demo --index my_index --grounder-ckpt qd_detr.pth --port 8501",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; the app can read local "
                        "folders, so expose it with care)")
    add_app_arguments(p)
    p.add_argument("--print-command", action="store_true", help="print the streamlit command and exit")
    p.set_defaults(func=cmd_demo)
