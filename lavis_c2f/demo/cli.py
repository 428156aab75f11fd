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
import socket
import subprocess
import sys
from typing import List

APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")
BACKBONES = ("offline", "clip_hf", "clip_lavis", "random")

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
    for name in ("index", "run_dir", "clip_path", "retriever_ckpt", "grounder_ckpt", "workdir", "quickstart_root"):
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
    from lavis_c2f.common.errors import ConfigError
    from lavis_c2f.demo.sources import quickstart_checkpoints

    if args.index and args.run_dir:
        raise ConfigError("give --index (your videos) or --run-dir (the demo corpus), not both; the app can switch "
                          "to an index built from uploaded videos later")
    if args.index:
        idx = os.path.abspath(os.path.expanduser(args.index))
        if os.path.isfile(os.path.join(idx, "corpus.json")):
            raise ConfigError(f"{idx} is a demo corpus: use --run-dir RUN (a quickstart run directory) instead")
        if not os.path.isdir(idx):
            raise FileNotFoundError(f"index folder not found: {idx}")
        if not os.path.isfile(idx.rstrip(os.sep) + ".c2f-video.json"):
            raise ConfigError(f"{idx} has no {os.path.basename(idx.rstrip(os.sep))}.c2f-video.json beside it: the demo "
                              "searches indexes built from videos ('lavis-c2f index videos VIDEO_DIR --out INDEX')")
    if args.run_dir:
        run = os.path.abspath(os.path.expanduser(args.run_dir))
        if not os.path.isdir(run):
            raise FileNotFoundError(f"quickstart run directory not found: {run}")
        if quickstart_checkpoints(run) is None:
            raise ConfigError(f"{run} is not a finished quickstart run (summary.json with existing stage1/stage2 "
                              "checkpoints and corpus/); run 'lavis-c2f quickstart --out RUN' first")
    for name in ("clip_path", "retriever_ckpt", "grounder_ckpt"):
        v = getattr(args, name)
        if v and not os.path.exists(os.path.expanduser(v)):
            raise FileNotFoundError(f"--{name.replace('_', '-')}: not found: {v}")
    if args.clip_path and args.backbone not in ("clip_hf", "clip_lavis"):
        raise ConfigError("--clip-path needs --backbone clip_hf or clip_lavis")
    if args.backbone in ("clip_hf", "clip_lavis") and not args.clip_path:
        raise ConfigError(f"--backbone {args.backbone} needs --clip-path (local CLIP weights; nothing is downloaded)")
    if getattr(args, "quickstart_args", None):
        from lavis_c2f.demo.sources import parse_quickstart_args

        parse_quickstart_args(args.quickstart_args)
    if not 1 <= int(args.port) <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((args.host, int(args.port)))
        except OSError as e:
            raise ConfigError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e} (choose another --port)") \
                from None


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
    p.add_argument("--index", default=None, help="index folder of 'lavis-c2f index videos' (your videos)")
    p.add_argument("--run-dir", default=None, metavar="RUN", help="a 'lavis-c2f quickstart' run directory")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; the app can read local "
                        "folders, so expose it with care)")
    p.add_argument("--backbone", choices=BACKBONES, default=None,
                   help="video/text encoder for uploaded videos and indexes built in the app (default: the index's, "
                        "else offline)")
    p.add_argument("--clip-path", default=None, help="clip_hf: local CLIPModel folder; clip_lavis: checkpoint file")
    p.add_argument("--retriever-ckpt", default=None, help="trained T-MASS checkpoint for the index")
    p.add_argument("--grounder-ckpt", default=None, help="trained grounder checkpoint for the index / uploaded videos")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default)")
    p.add_argument("--workdir", default=None,
                   help="uploads, indexes built in the app and plots (default: $C2F_CACHE/demo, i.e. "
                        "~/.cache/lavis_c2f/demo)")
    p.add_argument("--quickstart-root", default=None,
                   help="where quickstart runs are looked for and written (default ./c2f_quickstart)")
    p.add_argument("--quickstart-args", default=None, metavar="ARGS",
                   help="extra 'lavis-c2f quickstart' arguments for the app's 'Run the quickstart' button, one "
                        "quoted string, e.g. --quickstart-args='--n-videos 40 --stage1-epochs 2' for a smaller, "
                        "faster run (checked here; --out is chosen by the app)")
    p.add_argument("--print-command", action="store_true", help="print the streamlit command and exit")
    p.set_defaults(func=cmd_demo)
