"""``lavis-c2f`` command line: one dispatcher, sub-commands defined next to their code.

Each module of :data:`COMMAND_MODULES` exposes ``register(subparsers)``, which adds its
sub-command(s) with ``parser.set_defaults(func=callable)``; ``callable(args)`` returns an exit
code (or None for 0).

Errors: :func:`main` is the one place that turns a user error (bad files, options, queries,
mismatched checkpoints or indexes, undecodable videos:
:data:`lavis_c2f.common.errors.USER_ERRORS`) into one line ``lavis-c2f COMMAND: error: ...``
on stderr and exit code 1, for every command; anything else keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from lavis_c2f.common.errors import USER_ERRORS, user_message
from lavis_c2f.data import cli as data_cli
from lavis_c2f.demo import cli as demo_cli
from lavis_c2f.evaluation import cli as evaluation_cli
from lavis_c2f.index import cli as index_cli
from lavis_c2f.models.grounder import cli as grounder_cli
from lavis_c2f.pipeline import cli as pipeline_cli
from lavis_c2f.search import cli as search_cli
from lavis_c2f.serve import cli as serve_cli
from lavis_c2f.video import cli as video_cli

logger = logging.getLogger(__name__)

COMMAND_MODULES = (
    data_cli,            # make-demo-corpus, convert
    grounder_cli,        # vocab
    index_cli,           # index (build|add|remove|info|search|videos)
    video_cli,           # extract
    search_cli,          # search, annotate
    pipeline_cli,        # merge-stage1, tune-fusion, quickstart
    evaluation_cli,      # eval
    demo_cli,            # demo (web app)
    serve_cli,           # serve (HTTP search service)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lavis-c2f",
        description="Coarse-to-fine video corpus moment retrieval (LAVIS plugin).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def expand_shorthands(argv: List[str]) -> List[str]:
    """``lavis-c2f index VIDEO_DIR ...`` is short for ``lavis-c2f index videos VIDEO_DIR ...``:
    when the word after ``index`` is an existing directory and not an index sub-command."""
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)
    if i is None or argv[i] != "index" or i + 1 >= len(argv):
        return argv
    nxt = argv[i + 1]
    if not nxt.startswith("-") and nxt not in index_cli.SUBCOMMANDS and os.path.isdir(nxt):
        return argv[: i + 1] + ["videos"] + argv[i + 1:]
    return argv


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(expand_shorthands(argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    command = " ".join(c for c in (args.command, getattr(args, "index_command", None)) if c)
    try:
        code = args.func(args)
    except USER_ERRORS as e:
        logger.debug("%s failed", command, exc_info=True)
        print(f"lavis-c2f {command}: error: {user_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lavis-c2f {command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
