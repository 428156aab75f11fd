"""``lavis-c2f serve``: the HTTP search service (registered by :mod:`lavis_c2f.cli`)::

    lavis-c2f serve                                   # the latest ./c2f_quickstart run (as `lavis-c2f demo`)
    lavis-c2f serve INDEX [--grounder-ckpt qd_detr.pth] --host 127.0.0.1 --port 8000
    lavis-c2f serve --run-dir c2f_quickstart/RUN

It serves what ``lavis-c2f search`` searches, with the same options (the predictor is built
by :func:`lavis_c2f.search.cli.build_search_predictor`); the app is
:func:`lavis_c2f.serve.app.create_app`, run by uvicorn. Arguments and the port are checked
before the models load. Exit codes: 1 bad arguments; Ctrl-C / SIGTERM shut the server down gracefully
(uvicorn then ends the process by that signal).
"""
from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.net import check_port
from lavis_c2f.pipeline.quickstart_run import DEFAULT_ROOT, QuickstartRun
from lavis_c2f.search.cli import INDEX_HELP, add_corpus_arguments, build_search_predictor
from lavis_c2f.serve.app import create_app
from lavis_c2f.serve.schemas import SERVE_DEFAULTS

logger = logging.getLogger(__name__)


def resolve_source(args: argparse.Namespace) -> str:
    """What is served, in words; without INDEX / --run-dir / --demo-corpus, ``args.run_dir``
    becomes the latest finished quickstart run under ``--quickstart-root`` (ConfigError if none)."""
    if not (args.index or args.run_dir or args.demo_corpus):
        latest = QuickstartRun.latest(args.quickstart_root)
        if latest is None:
            raise ConfigError(f"no INDEX given and no finished quickstart run under {args.quickstart_root}: give "
                              "INDEX (from 'lavis-c2f index videos VIDEO_DIR --out INDEX'), --run-dir RUN, or run "
                              "'lavis-c2f quickstart' first")
        args.run_dir = str(latest.path)
    if args.run_dir:
        return f"quickstart run {args.run_dir}"
    return f"demo corpus {args.demo_corpus}" if args.demo_corpus else f"index {args.index}"


def quiet_store_client(verbose: bool) -> None:
    """Without ``-v``, keep pymilvus' own log (a traceback per failed call to a Milvus store) out
    of the service's log: the service logs one line per request that the store failed (503)."""
    if not verbose and "pymilvus" in sys.modules:
        for name in ("pymilvus", "pymilvus.milvus_client"):   # the loggers pymilvus configures on import
            logging.getLogger(name).setLevel(logging.CRITICAL)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.stage1_top_k < 1:
        raise ConfigError("--stage1-top-k must be >= 1")
    if args.refine and not args.refiner_cfg:
        raise ConfigError("--refine needs --refiner-cfg YAML (the stage-3 refiner: model, checkpoint, sampler...)")
    check_port(args.host, args.port)
    source = resolve_source(args)
    predictor = build_search_predictor(args)
    quiet_store_client(args.verbose)
    app = create_app(predictor, source=source)
    logger.info("serving %s (%d videos; %s) on http://%s:%d (OpenAPI page: /docs)", source,
                len(predictor.corpus.vids), predictor.describe_mode(), args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="debug" if args.verbose else "info",
                access_log=not args.no_access_log)
    return 0


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "serve", help="HTTP search service (FastAPI): POST /search, GET /health, GET /videos/{vid}, /docs",
        description="Serve what 'lavis-c2f search' searches over HTTP. Without INDEX, --run-dir or --demo-corpus "
                    "it serves the latest finished quickstart run under --quickstart-root. Searches run one at a "
                    "time through the coarse-to-fine engine; the OpenAPI page is at /docs.",
        epilog="examples:\n  lavis-c2f serve\n  lavis-c2f serve INDEX --grounder-ckpt qd_detr.pth --port 8000\n"
               "  curl -s localhost:8000/search -H 'content-type: application/json' "
               "-d '{\"query\": \"a man opens the fridge\", \"top_k\": 5}'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", nargs="?", metavar="INDEX", help=INDEX_HELP)
    p.add_argument("--host", default=SERVE_DEFAULTS["host"],
                   help=f"address to listen on (default {SERVE_DEFAULTS['host']}: this machine only)")
    p.add_argument("--port", type=int, default=SERVE_DEFAULTS["port"], help=f"port (default {SERVE_DEFAULTS['port']})")
    p.add_argument("--quickstart-root", default=DEFAULT_ROOT,
                   help=f"where the latest quickstart run is looked for without INDEX (default ./{DEFAULT_ROOT})")
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    add_corpus_arguments(p)
    p.set_defaults(func=cmd_serve)
