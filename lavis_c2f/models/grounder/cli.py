"""``lavis-c2f vocab``: token counts of training queries for FW-MESM's word masking.

    lavis-c2f vocab --ann TRAIN.jsonl [--ann MORE.jsonl] [--tokenizer clip|whitespace] --out COUNTS.json

Reads the ``query`` field of every row (QVHighlights-style JSON lines), counts tokens
(special tokens excluded) and writes the counts file described in
:mod:`lavis_c2f.models.grounder.vocab` atomically.
"""
from __future__ import annotations

import argparse
import logging
from collections import Counter

from lavis_c2f.models.grounder.vocab import count_tokens, read_queries, write_counts

logger = logging.getLogger(__name__)


def _run_vocab(args: argparse.Namespace) -> int:
    total: Counter = Counter()
    n_queries = 0
    for path in args.ann:
        counts, n = count_tokens(read_queries(path), args.tokenizer)
        total.update(counts)
        n_queries += n
    if n_queries == 0:
        raise ValueError(f"no queries found in {', '.join(args.ann)}")
    write_counts(total, n_queries, args.tokenizer, args.out)
    print(f"wrote {args.out}: {len(total)} distinct tokens, {sum(total.values())} tokens, "
          f"{n_queries} queries ({args.tokenizer} tokenizer)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``vocab`` sub-command."""
    p = subparsers.add_parser(
        "vocab", help="count query tokens for FW-MESM word masking",
        description="Count the tokens of training queries (JSON lines with a 'query' field) "
                    "and write the counts file used by c2f_mesm_qd_detr (model.vocab_counts).")
    p.add_argument("--ann", required=True, action="append",
                   help="training annotation JSON-lines file (repeatable)")
    p.add_argument("--tokenizer", choices=("clip", "whitespace"), default="clip",
                   help="clip: CLIP BPE ids (default); whitespace: lower-cased words")
    p.add_argument("--out", required=True, help="output counts JSON (written atomically)")
    p.set_defaults(func=_run_vocab)
