"""``lavis-c2f merge-stage1``, ``lavis-c2f tune-fusion`` and ``lavis-c2f quickstart``.

Registered by :mod:`lavis_c2f.cli` (``python -m lavis_c2f.cli COMMAND`` = ``lavis-c2f COMMAND``).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import List

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.common.io import write_json
from lavis_c2f.data.cli import parse_param_overrides
from lavis_c2f.data.demo_corpus import DemoCorpusParams
from lavis_c2f.evaluation._rows import load_rows
from lavis_c2f.pipeline.fusion import tune_fusion
from lavis_c2f.pipeline.merge import merge_stage1, read_video_list
from lavis_c2f.pipeline.quickstart import run_quickstart


def _floats(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add the pipeline sub-commands (see :mod:`lavis_c2f.cli` for the contract)."""
    p = subparsers.add_parser(
        "merge-stage1", help="stage-1 ranks + annotations -> stage-2 annotations with stage1_result",
        description="Write the annotation rows of --ann (in order) with 'stage1_result': the query's top-K "
                    "retrieved videos [[vid, score], ...] from --stage1 (a <split>_<epoch>_ranks.jsonl of the "
                    "stage-1 task). The output is QVHighlights jsonl, written atomically. Unknown qids, qids "
                    "without stage-1 rows and unknown videos are errors naming file, line and field.")
    p.add_argument("--stage1", required=True, help="stage-1 ranks jsonl (qid, query, ranked_vids)")
    p.add_argument("--ann", required=True, help="the split's annotations (QVHighlights jsonl, Charades-STA txt, "
                                                "TACoS json)")
    p.add_argument("--top-k", type=int, required=True, help="videos kept per query")
    p.add_argument("--out", required=True, help="output jsonl")
    p.add_argument("--format", default="auto", help="annotation format (auto, qvh, charades_sta, tacos)")
    p.add_argument("--durations", default=None,
                   help="Charades-STA: Charades_v1_*.csv with video lengths (needed for that format)")
    p.add_argument("--videos", default=None,
                   help="corpus video ids (text, one per line, or a JSON list) besides the annotation's videos")
    p.add_argument("--allow-missing", action="store_true",
                   help="queries without a stage-1 row get an empty list instead of an error")
    p.set_defaults(func=cmd_merge_stage1)

    t = subparsers.add_parser(
        "tune-fusion", help="grid-search the stage-1/stage-2 fusion weight on validation candidates",
        description="Evaluate VCMR for each weight of the grid on a <split>_<epoch>_candidates.jsonl written by "
                    "the c2f_corpus_moment_retrieval task (use the validation split), score each weight by the mean "
                    "of VCMR R@K (--recall-ks) at the IoU of --metric, averaged with its --smooth neighbours on the "
                    "grid, pick the best (ties: the smaller weight) and write the choice to --out (JSON; give it to "
                    "the task as run.fusion_file).")
    t.add_argument("--candidates", required=True, help="candidates jsonl of the validation split")
    t.add_argument("--out", required=True, help="output JSON (form, weight, s1_norm, grid)")
    t.add_argument("--form", default="product", choices=("product", "sum", "stage1"))
    t.add_argument("--weights", type=_floats, default=None,
                   help="comma-separated grid (default: 0,0.25,0.5,1,2,4,8 for product; 0,0.1,...,1 for sum)")
    t.add_argument("--s1-norm", default="zscore", choices=("zscore", "minmax", "rank"))
    t.add_argument("--max-moments", type=int, default=100)
    t.add_argument("--metric", default="VCMR-R@1-IoU@0.5", help="reported metric; its IoU is the score's IoU")
    t.add_argument("--recall-ks", type=lambda x: [int(v) for v in _floats(x)], default=[1, 5, 10],
                   help="comma-separated K of the VCMR R@K averaged into a weight's score (default 1,5,10)")
    t.add_argument("--smooth", type=int, default=1,
                   help="grid neighbours on each side averaged into a weight's score (default 1; --smooth 0 "
                        "--recall-ks 1 is the plain best R@1, which jumps between equally good weights with noise: "
                        "docs/reproducibility.md)")
    t.set_defaults(func=cmd_tune_fusion)

    q = subparsers.add_parser(
        "quickstart", help="run the whole coarse-to-fine chain on the embedded demo corpus (CPU, minutes)",
        description="Make the demo corpus, train stage 1, retrieve, merge, train stage 2 on retrieved videos, "
                    "tune the fusion on val and evaluate on test; print one table (chance, untrained, trained). "
                    "Everything goes under one run directory, named at the end.")
    q.add_argument("--out", default=None, help="run directory (default: ./c2f_quickstart/<timestamp>)")
    q.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    q.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the demo models are small, and one thread avoids OpenMP "
                        "contention on a busy machine and keeps the numbers reproducible; 0 = torch's default)")
    q.add_argument("--stage1-epochs", type=int, default=None,
                   help="override the stage-1 epochs of the demo YAML (its lr milestones scaled alike)")
    q.add_argument("--stage2-epochs", type=int, default=None,
                   help="override the stage-2 epochs of the demo YAML (its lr milestones scaled alike)")
    q.add_argument("--n-videos", type=int, default=None, help="demo corpus size: the corpus is then the generator's defaults with this size (default: "
                        "the main job's corpus, lavis_c2f/configs/pipeline/quickstart.yaml)")
    q.add_argument("--corpus-param", action="append", metavar="KEY=VALUE", default=None,
                   help="any other demo corpus parameter, VALUE as JSON (as make-demo-corpus --param; repeatable); "
                        "like --n-videos, on top of the generator's defaults")
    q.add_argument("--skip-untrained", action="store_true", help="leave out the untrained-model row")
    q.add_argument("--seed", type=int, default=None,
                   help="run.seed of both stages (default: the YAMLs' seed; the README's expected range covers seeds)")
    q.set_defaults(func=cmd_quickstart)


def cmd_merge_stage1(args: argparse.Namespace) -> int:
    reader_kwargs = {"durations": args.durations} if args.durations else {}
    videos = read_video_list(args.videos) if args.videos else None
    s = merge_stage1(args.stage1, args.ann, args.top_k, args.out, fmt=args.format, videos=videos,
                     allow_missing=args.allow_missing, reader_kwargs=reader_kwargs)
    print(f"wrote {s['out']}: {s['num_queries']} queries, top-{s['top_k']} videos each "
          f"(mean {s['mean_candidates']}), GT video in the top-{s['top_k']} for {s['gt_in_top_k']}%"
          + (f", {s['num_missing']} without stage-1 rows" if s["num_missing"] else ""))
    return 0


def cmd_tune_fusion(args: argparse.Namespace) -> int:
    rows = load_rows(args.candidates)
    _check_candidate_rows(rows)
    res = tune_fusion(rows, form=args.form, weights=args.weights, s1_norm=args.s1_norm,
                      max_moments=args.max_moments, metric=args.metric, smooth=args.smooth,
                      recall_ks=args.recall_ks)
    res["candidates"] = str(args.candidates)
    write_json(res, args.out)
    for g in res["grid"]:
        mark = "  <- best" if g["weight"] == res["weight"] else ""
        print(f"weight {g['weight']:g}: {args.metric} = {g['metrics'][args.metric]} (score {g['score']:g}){mark}")
    print(f"wrote {args.out}: form={res['form']} weight={res['weight']:g} s1_norm={res['s1_norm']}")
    return 0


def _check_candidate_rows(rows) -> None:
    for row, line in zip(rows, rows.lines):
        if not isinstance(row, dict):
            raise DataFormatError("expected a JSON object", path=rows.source, line=line)
        for key in ("qid", "candidates"):
            if key not in row:
                raise DataFormatError("missing field (is this a *_candidates.jsonl of the corpus task?)",
                                      path=rows.source, line=line, field=key)
        cands = row["candidates"]
        if not isinstance(cands, list):
            raise DataFormatError("expected a list of [vid, s1, windows]", path=rows.source, line=line,
                                  field="candidates")
        for i, c in enumerate(cands):
            ok = (isinstance(c, list) and len(c) == 3 and isinstance(c[0], str)
                  and isinstance(c[1], (int, float)) and not isinstance(c[1], bool) and isinstance(c[2], list)
                  and all(isinstance(w, list) and len(w) >= 3 for w in c[2]))
            if not ok:
                raise DataFormatError(f"expected [vid, s1, [[st, ed, s2], ...]], got {c!r}"[:200], path=rows.source,
                                      line=line, field=f"candidates[{i}]")


def cmd_quickstart(args: argparse.Namespace) -> int:
    corpus_params = parse_param_overrides(args.corpus_param, option="--corpus-param")
    known = sorted(f.name for f in dataclasses.fields(DemoCorpusParams))
    unknown = sorted(set(corpus_params) - set(known))
    if unknown:
        raise ConfigError(f"--corpus-param: unknown demo corpus parameter(s) {unknown}; known: {known}")
    run_quickstart(out=args.out, device=args.device, threads=args.threads, stage1_epochs=args.stage1_epochs,
                   stage2_epochs=args.stage2_epochs, n_videos=args.n_videos,
                   include_untrained=not args.skip_untrained, seed=args.seed,
                   corpus_params=corpus_params)
    return 0
