"""``lavis-c2f search`` and ``lavis-c2f annotate`` (registered by :mod:`lavis_c2f.cli`).

Search an index built from videos::

    lavis-c2f index videos VIDEO_DIR --out INDEX            # once (zero-shot without --checkpoint)
    lavis-c2f search INDEX "a man opens the fridge" [--top-k 10] [--json] [--plot top.png]
    lavis-c2f search INDEX "..." --grounder-ckpt qd_detr.pth [--retriever-ckpt tmass.pth]
    lavis-c2f search INDEX --queries-file queries.txt --json     # one query per line -> one JSON line each

Search the embedded demo corpus with the checkpoints of ``lavis-c2f quickstart --out RUN``::

    lavis-c2f search --run-dir RUN "a tired chef washes the bucket in the garage" --plot q.png
    lavis-c2f search --demo-corpus DIR "..." --retriever-ckpt s1.pth --grounder-ckpt s2.pth

Annotate videos from video-level captions (:mod:`lavis_c2f.search.annotate`)::

    lavis-c2f annotate VIDEO_DIR --captions captions.jsonl --out ann.jsonl [--min-score 0.4]

Exit codes: 0 success, 1 error (one line on stderr, :func:`lavis_c2f.cli.main`), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.common.io import write_json
from lavis_c2f.pipeline.engine import SEARCH_DEFAULTS
from lavis_c2f.pipeline.fusion import load_fusion_choice
from lavis_c2f.predictor import C2FPredictor, index_backbone_name, is_demo_corpus
from lavis_c2f.search.annotate import annotate
from lavis_c2f.search.format import moments_table
from lavis_c2f.search.plot import plot_saliency
from lavis_c2f.video.cli import FEATURE_BACKBONE_CHOICES, backbone_options
from lavis_c2f.video.extract import EXTRACT_DEFAULTS

logger = logging.getLogger(__name__)



def _backbone_config(args: argparse.Namespace, backbone: str) -> Optional[Dict[str, Any]]:
    """The backbone options; None (the index's recorded settings: weights paths...) when an
    index built with this backbone is searched without weight options."""
    given = (args.clip_path, args.clip_model_type, getattr(args, "slowfast_path", None))
    index = getattr(args, "index", None)
    if index and not any(given) and index_backbone_name(index) == backbone:
        return None
    return backbone_options(backbone, *given)


def _fusion(path: Optional[str]):
    if not path:
        return None
    return load_fusion_choice(path)


def _quiet_predictor_log(args: argparse.Namespace) -> None:
    """The commands print the predictor's mode themselves; its INFO log line only with -v."""
    if not getattr(args, "verbose", False):
        for name in ("lavis_c2f.predictor", "lavis_c2f.index.corpus_index"):
            logging.getLogger(name).setLevel(logging.WARNING)


# ------------------------------------------------------------------------------ search

def build_search_predictor(args: argparse.Namespace):
    """The :class:`~lavis_c2f.predictor.C2FPredictor` of the ``search`` arguments."""
    demo = args.demo_corpus or args.run_dir or (args.index and is_demo_corpus(args.index))
    if demo:
        if args.index and args.demo_corpus and os.path.abspath(args.index) != os.path.abspath(args.demo_corpus):
            raise ConfigError("give the demo corpus once (INDEX or --demo-corpus)")
        corpus = args.demo_corpus or (args.index if args.index and is_demo_corpus(args.index) else None)
        if args.index and not is_demo_corpus(args.index):
            raise ConfigError(f"{args.index} is not a demo corpus; with --run-dir the corpus is RUN/corpus "
                              "(or --demo-corpus DIR)")
        for opt in ("backbone", "clip_path", "ann", "zero_shot_score"):
            if getattr(args, opt, None):
                raise ConfigError(f"--{opt.replace('_', '-')} is not used with the demo corpus (its text encoder "
                                  "comes from the corpus)")
        return C2FPredictor.for_demo_corpus(args.run_dir, corpus, retriever_ckpt=args.retriever_ckpt,
                                            grounder_ckpt=args.grounder_ckpt, retriever_cfg=args.retriever_cfg,
                                            grounder_cfg=args.grounder_cfg, fusion=_fusion(args.fusion),
                                            splits=args.splits, stage1_top_k=args.stage1_top_k,
                                            refiner=args.refiner_cfg if args.refine else None,
                                            device=args.device or "auto",
                                            trusted=args.trusted)
    if not args.index:
        raise ConfigError("search needs INDEX (built with 'lavis-c2f index videos VIDEO_DIR --out INDEX') or "
                          "--demo-corpus DIR / --run-dir RUN")
    if args.splits:
        raise ConfigError("--splits is only used with the demo corpus")
    backbone = args.backbone or index_backbone_name(args.index) or "offline"
    zero = {"video_score": args.zero_shot_score} if args.zero_shot_score else None
    return C2FPredictor.from_checkpoints(args.retriever_ckpt, args.grounder_ckpt, backbone,
                                         _backbone_config(args, backbone), args.index,
                                         args.refiner_cfg if args.refine else None,
                                         args.device or "auto", retriever_cfg=args.retriever_cfg,
                                         grounder_cfg=args.grounder_cfg, fusion=_fusion(args.fusion),
                                         zero_shot=zero, stage1_top_k=args.stage1_top_k, ann=args.ann,
                                         verify_index=not args.no_verify, trusted=args.trusted,
                                         grounder_streams=args.grounder_streams, index_timeout=args.index_timeout)


def read_queries_file(path: str) -> List[Tuple[int, str]]:
    """``(line number, query)`` of every non-blank line of a UTF-8 text file (one query per
    line; white space collapsed). A missing, unreadable or empty file raises
    :class:`DataFormatError` naming it."""
    if not os.path.isfile(path):
        raise DataFormatError("queries file not found", path=path)
    try:
        with open(path, "r", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"cannot read the queries file: {e}", path=path) from None
    out = [(i, " ".join(line.split())) for i, line in enumerate(lines, start=1) if line.strip()]
    if not out:
        raise DataFormatError("the queries file has no query (one query per line expected)", path=path)
    return out


def _search_args(args: argparse.Namespace) -> None:
    """Checks of the search options. Without ``--queries-file`` a lone positional argument is
    the query (as with ``--run-dir RUN "..."``); with it, the index."""
    if args.query is None and not args.queries_file:
        args.index, args.query = None, args.index
    if args.queries_file and args.query is not None:
        raise ConfigError("give either QUERY or --queries-file, not both")
    if not args.queries_file and args.query is None:
        raise ConfigError("search needs QUERY (quoted) or --queries-file FILE (one query per line)")
    if args.queries_file and args.plot:
        raise ConfigError("--plot draws one query's top video: not with --queries-file")
    if args.top_k < 1 or args.stage1_top_k < 1:
        raise ConfigError("--top-k and --stage1-top-k must be >= 1")
    if args.refine and not args.refiner_cfg:
        raise ConfigError("--refine needs --refiner-cfg YAML (the stage-3 refiner: model, checkpoint, sampler...)")


def cmd_search(args: argparse.Namespace) -> int:
    _search_args(args)
    queries = read_queries_file(args.queries_file) if args.queries_file else None
    _quiet_predictor_log(args)
    predictor = build_search_predictor(args)
    if queries is not None:
        return _search_many(args, predictor, queries)
    res = predictor.search(args.query, top_k=args.top_k, refine=bool(args.refine))
    plot_path = _plot(args, predictor, res) if args.plot else None
    if args.json:
        out = res.to_dict()
        out["mode_description"] = predictor.describe_mode()
        out["plot"] = plot_path
        print(json.dumps(out, indent=1))
        return 0
    n = len(predictor.corpus.vids)
    print(f"mode: {predictor.describe_mode()}")
    print(f'query: "{res.query}"  ({n} videos searched, {len(res.stage1)} grounded, '
          f'{res.timings["total_s"]:.2f} s)')
    if not res:
        print("no moment found")
    else:
        print(moments_table([m.to_dict() for m in res]))
    if plot_path:
        print(f"saliency plot of {res[0].vid} written to {plot_path}")
    return 0


def _search_many(args: argparse.Namespace, predictor, queries: List[Tuple[int, str]]) -> int:
    """``--queries-file``: every query through :meth:`C2FPredictor.search_many` (batched); one
    JSON line per query with ``--json`` (its ``line`` in the file added), else a table each."""
    t0 = time.perf_counter()
    results = predictor.search_many([q for _, q in queries], top_k=args.top_k, refine=bool(args.refine))
    total = time.perf_counter() - t0
    if args.json:
        for (line, _), res in zip(queries, results):
            print(json.dumps({"line": line, **res.to_dict()}))
        return 0
    n = len(predictor.corpus.vids)
    print(f"mode: {predictor.describe_mode()}")
    print(f"{len(queries)} queries from {args.queries_file} ({n} videos searched, {total:.2f} s, "
          f"{1000 * total / len(queries):.1f} ms per query)")
    for (line, _), res in zip(queries, results):
        print(f'\nline {line}: "{res.query}"  ({len(res.stage1)} grounded)')
        print(moments_table([m.to_dict() for m in res]) if res else "no moment found")
    return 0


def _plot(args: argparse.Namespace, predictor, res) -> Optional[str]:
    if not res:
        logger.warning("no moment found: no plot written")
        return None
    top = res[0].vid
    det = res.details[top]
    gt = predictor.ground_truth(res.query)
    gt_here = [w for vid, ws in gt if vid == top for w in ws]
    elsewhere = sorted({vid for vid, _ in gt if vid != top})
    title = f'"{res.query}" in {top} (rank 1, stage 2 {det.mode})'
    if elsewhere and not gt_here:
        title += f"; ground truth in {', '.join(elsewhere[:3])}"
    ylabel = "grounder saliency" if det.mode == "trained" else "text-clip cosine (smoothed)"
    return plot_saliency(args.plot, det.saliency, det.clip_length, det.duration, det.windows,
                         gt_windows=gt_here or None,
                         title=title, ylabel=ylabel)


# ------------------------------------------------------------------------------ annotate

def cmd_annotate(args: argparse.Namespace) -> int:
    _quiet_predictor_log(args)
    predictor = C2FPredictor.from_checkpoints(None, args.grounder_ckpt, args.backbone,
                                              _backbone_config(args, args.backbone), None, None,
                                              args.device or "auto", grounder_cfg=args.grounder_cfg,
                                              clip_length=args.clip_length, frames_per_clip=args.frames_per_clip,
                                              trusted=args.trusted, decode_backend=args.decoder)
    print(f"mode: {predictor.describe_mode(['stage2'])}")
    summary = annotate(predictor, args.video_dir, args.captions, args.out, min_score=args.min_score,
                       max_windows=args.max_windows, qid_start=args.qid_start, skip_missing=args.skip_missing)
    print(summary.format())
    if args.summary_json:
        write_json(summary.to_dict(), args.summary_json)
    return 0 if summary.kept else 1


# ------------------------------------------------------------------------------ parser

def _backbone_args(p: argparse.ArgumentParser, default: Optional[str]) -> None:
    p.add_argument("--backbone", choices=FEATURE_BACKBONE_CHOICES, default=default,
                   help="frame/text encoder" + (" (default: the index's)" if default is None else
                                                f" (default {default})"))
    p.add_argument("--clip-path", default=None, help="clip_hf: local CLIPModel folder; clip_lavis: checkpoint file")
    p.add_argument("--clip-model-type", default=None, help="clip_lavis: 'openai' (default) or an open_clip name")
    p.add_argument("--slowfast-path", default=None, help="slowfast: local SlowFast R50 8x8 Kinetics-400 checkpoint")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default)")
    p.add_argument("--trusted", action="store_true", help="allow full unpickling of checkpoints you trust")


#: help of the INDEX argument of every command that searches (search, serve)
INDEX_HELP = ("index of 'lavis-c2f index videos': a folder (FAISS), or a Milvus *.db path / http(s):// URI "
              "(#COLLECTION, default c2f_index); or a demo corpus folder")


def add_corpus_arguments(s: argparse.ArgumentParser) -> None:
    """What is searched and with which models: the options of ``search`` that ``lavis-c2f serve``
    shares (read by :func:`build_search_predictor`); INDEX is the caller's."""
    s.add_argument("--stage1-top-k", type=int, default=SEARCH_DEFAULTS["stage1_top_k"],
                   help=f"videos grounded by stage 2 (default {SEARCH_DEFAULTS['stage1_top_k']})")
    s.add_argument("--retriever-ckpt", default=None, help="trained T-MASS checkpoint (default: the index's, if any)")
    s.add_argument("--grounder-ckpt", default=None, help="trained grounder checkpoint (ours or official QD-DETR)")
    s.add_argument("--grounder-streams", nargs="+", default=None, metavar="STREAM",
                   help="feature streams the grounder reads, in its order, e.g. 'clip slowfast' (default: the "
                        "order its checkpoint records, else the index's)")
    s.add_argument("--retriever-cfg", default=None, help="retriever model YAML (when the checkpoint stores none)")
    s.add_argument("--grounder-cfg", default=None, help="grounder model YAML (when the checkpoint stores none)")
    s.add_argument("--fusion", default=None, metavar="JSON", help="fusion choice of 'lavis-c2f tune-fusion'")
    s.add_argument("--refine", action="store_true", help="run stage 3 (needs --refiner-cfg)")
    s.add_argument("--refiner-cfg", default=None, metavar="YAML",
                   help="stage-3 refiner config (keys of CaptionRefiner.from_config, optionally under 'refiner:')")
    s.add_argument("--ann", default=None, help="annotation file of the indexed videos (ground truth in --plot)")
    s.add_argument("--zero-shot-score", choices=["max", "topk_mean"], default=None,
                   help="zero-shot video score over clips (default topk_mean, k = 3)")
    s.add_argument("--demo-corpus", default=None, metavar="DIR", help="search the embedded demo corpus in DIR")
    s.add_argument("--run-dir", default=None, metavar="RUN",
                   help="a 'lavis-c2f quickstart' run directory: its checkpoints, fusion and corpus")
    s.add_argument("--splits", nargs="+", default=None, help="demo corpus: search only these splits")
    s.add_argument("--no-verify", action="store_true", help="skip the index's sha256 verification")
    s.add_argument("--index-timeout", type=float, default=None, metavar="SECONDS",
                   help="seconds a Milvus store (http://...) may take to answer before the search fails with a "
                        "message naming it (default 10; 'serve' then answers 503)")
    _backbone_args(s, None)


def register(subparsers: "argparse._SubParsersAction") -> None:
    s = subparsers.add_parser(
        "search", help="search moments in an index of videos (or the demo corpus) with a typed query",
        description="Stage 1 (retrieval of the best videos), stage 2 (moments in each), optional stage 3 "
                    "(refinement), fused into one ranked list. Trained checkpoints are used when given (or recorded "
                    "in the index); otherwise a clearly-labelled ZERO-SHOT mode scores text-clip cosines of the "
                    "backbone.",
        epilog="examples:\n  lavis-c2f search INDEX \"a man opens the fridge\" --plot top.png\n"
               "  lavis-c2f search INDEX --queries-file queries.txt --json\n"
               "  lavis-c2f search --run-dir c2f_quickstart/RUN \"a chef washes the bucket in the garage\" --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("index", nargs="?", metavar="INDEX", help=INDEX_HELP)
    s.add_argument("query", nargs="?", metavar="QUERY", help="the query text (quote it)")
    s.add_argument("--queries-file", default=None, metavar="FILE",
                   help="search every query of FILE (UTF-8, one query per line, blank lines skipped) in batches: "
                        "stage 1 and the grounding of all (query, video) pairs batched; with --json one JSON line "
                        "per query")
    s.add_argument("--top-k", type=int, default=SEARCH_DEFAULTS["top_k"],
                   help=f"moments listed (default {SEARCH_DEFAULTS['top_k']})")
    s.add_argument("--json", action="store_true", help="print JSON instead of the table")
    s.add_argument("--plot", default=None, metavar="OUT.png",
                   help="write the saliency curve of the top video with its windows (and ground truth if known)")
    add_corpus_arguments(s)
    s.set_defaults(func=cmd_search)

    a = subparsers.add_parser(
        "annotate", help="propose fine-grained moment annotations from video-level captions",
        description="Split each caption into sentences, ground each sentence in its video, keep confident windows "
                    "and write QVHighlights annotations (qid, query, vid, duration, relevant_windows, "
                    "relevant_clip_ids, saliency_scores of 3 pseudo-annotators, confidence).",
        epilog="captions file: one JSON object per line, {\"vid\": ID or \"video\": FILE, \"caption\": TEXT}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("video_dir", metavar="VIDEO_DIR", help="folder of the videos")
    a.add_argument("--captions", required=True, help="captions jsonl")
    a.add_argument("--out", required=True, help="annotations jsonl to write (QVHighlights format)")
    a.add_argument("--min-score", type=float, default=0.4,
                   help="keep windows scoring at least this (grounder probability, or zero-shot contrast; 0.4)")
    a.add_argument("--max-windows", type=int, default=2, help="windows kept per sentence (default 2)")
    a.add_argument("--qid-start", type=int, default=0, help="first qid (default 0)")
    a.add_argument("--grounder-ckpt", default=None, help="trained grounder checkpoint (default: zero-shot)")
    a.add_argument("--grounder-cfg", default=None, help="grounder model YAML (when the checkpoint stores none)")
    a.add_argument("--clip-length", type=float, default=EXTRACT_DEFAULTS["clip_length"],
                   help=f"seconds per clip (default {EXTRACT_DEFAULTS['clip_length']:g})")
    a.add_argument("--frames-per-clip", type=int, default=EXTRACT_DEFAULTS["frames_per_clip"],
                   help=f"frames averaged per clip (default {EXTRACT_DEFAULTS['frames_per_clip']})")
    a.add_argument("--decoder", choices=["auto", "decord", "pyav", "ffmpeg"], default="auto", help="decoding backend")
    a.add_argument("--skip-missing", action="store_true", help="skip captions of videos not in VIDEO_DIR")
    a.add_argument("--summary-json", default=None, help="also write the summary counts here")
    _backbone_args(a, "offline")
    a.set_defaults(func=cmd_annotate)
