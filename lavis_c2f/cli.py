"""``lavis-c2f`` command line: one dispatcher, sub-commands defined next to their code.

Each module listed in :data:`COMMAND_MODULES` exposes ``register(subparsers)``, which adds
its sub-command(s) with ``parser.set_defaults(func=callable)``; ``callable(args)`` returns an
exit code (or None for 0). Heavy imports happen inside those callables.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

from lavis_c2f.common.errors import ConfigError, DataFormatError

COMMAND_MODULES = [
    "lavis_c2f.data.cli",            # make-demo-corpus, convert
    "lavis_c2f.models.grounder.cli",  # vocab
    "lavis_c2f.index.cli",           # index (build|add|info|search|videos)
    "lavis_c2f.video.cli",           # extract
    "lavis_c2f.search.cli",          # search, annotate
    "lavis_c2f.pipeline.cli",        # merge-stage1, tune-fusion, quickstart
    "lavis_c2f.evaluation.cli",      # eval
    "lavis_c2f.demo.cli",            # demo (web app)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lavis-c2f",
        description="Coarse-to-fine video corpus moment retrieval (LAVIS plugin).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that part of the package is not built yet
                continue
            raise
        module.register(sub)
    return parser


def expand_shorthands(argv: List[str]) -> List[str]:
    """``lavis-c2f index VIDEO_DIR ...`` is short for ``lavis-c2f index videos VIDEO_DIR ...``:
    when the word after ``index`` is an existing directory and not an index sub-command."""
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)
    if i is None or argv[i] != "index" or i + 1 >= len(argv):
        return argv
    nxt = argv[i + 1]
    try:
        from lavis_c2f.index import cli as index_cli
    except ModuleNotFoundError:
        return argv
    known = set(index_cli._BUILTIN) | {name for name, _, _ in index_cli._EXTRA}
    if not nxt.startswith("-") and nxt not in known and os.path.isdir(nxt):
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
    try:
        code = args.func(args)
    except (DataFormatError, ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"lavis-c2f {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lavis-c2f {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
