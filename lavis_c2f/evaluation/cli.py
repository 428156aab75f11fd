"""``lavis-c2f eval``: evaluate a prediction file against a ground-truth file.

Protocols: ``qvh`` (official QVHighlights MR + HL), ``r1miou`` (Charades-STA / TACoS R@k and
mIoU) and ``vcmr`` (corpus moment rows, TVR-style recall). Writes the metrics JSON
atomically with ``--out`` and prints the ``brief`` block as a table.
"""
from __future__ import annotations

import argparse

from lavis_c2f.evaluation.qvh import add_arguments, run_from_args


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add the ``eval`` sub-command (see :mod:`lavis_c2f.cli` for the contract)."""
    parser = subparsers.add_parser(
        "eval", help="evaluate predictions (qvh | r1miou | vcmr)",
        description=__doc__.split("\n\n", 1)[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, protocols=("qvh", "r1miou", "vcmr"))
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return run_from_args(args)
