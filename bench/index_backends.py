"""Stage-1 index backends in one run: FAISS folder vs Milvus (embedded milvus-lite) on the same corpus.

The synthetic corpus and the T-MASS retriever of ``bench/stage1_search.py`` (512-d, 12 frames per
video, deterministic) are encoded once per build; each backend is then built in its own
process and searched in another (so peak memory is per process, as in a deployment with a
separate ingest job and service replicas). Printed per backend:

* ingest rows/s: rows written per second (index writes, pre-filter build and save / flush;
  the retriever's encoding, the same for both, is excluded and shown separately);
* peak RSS of the building process and of the serving process (GiB, ``ru_maxrss``);
* ms per query, single queries and batches of ``--batch`` (k = 10, ``m`` candidates re-ranked);
* recall@10 against the exact top 10 (every video re-ranked with the model, computed in the
  FAISS serving process on the same queries) and the agreement of the top 10 with FAISS flat.

FAISS uses its default policy (flat up to 60k pre-filter vectors, then the 4-bit PQ scan; IVF before
2026-12-07); Milvus runs once with
an exact FLAT pre-filter and once with HNSW (M 16, efConstruction 200, ef 512), the kinds shown.
The Milvus build process writes the rows, flushes, stops milvus-lite's in-process engine (which
waits for its background compaction and index tasks) and opens the collection again, which builds
the vector indexes (milvus-lite builds them on load): all of it is ingest time and counts in the
build peak (without the stop, the background work ran at process exit, unmeasured); closing the
last index of the store stops it (``MilvusIndex.close``). Timings on a
shared host are noisy: compare the rows of one run (the FAISS row is the baseline, ratios
against it are printed).

    python bench/index_backends.py --n-videos 10000 [--json OUT] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from stage1_search import SyntheticCorpus, make_model  # noqa: E402

BACKENDS = {"faiss": {}, "milvus_flat": {"kind": "flat"}, "milvus_hnsw": {"kind": "hnsw"}}


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _locator(backend: str, workdir: str) -> str:
    return os.path.join(workdir, "faiss_index") if backend == "faiss" else \
        os.path.join(workdir, f"{backend}.db") + "#videos"


# ----------------------------------------------------------------------------- one process each
def phase_build(args) -> Dict[str, Any]:
    from lavis_c2f.index import CorpusIndex
    from lavis_c2f.index.milvus_index import MilvusIndex

    model = make_model(args.seed)
    corpus = SyntheticCorpus(args.n_videos, seed=args.seed, n_queries=args.queries)
    loc = _locator(args.backend, args.workdir)
    if args.backend == "faiss":
        index = CorpusIndex.for_model(model, work_dir=args.workdir)
    else:
        index = MilvusIndex.create(loc, model, ann=dict(BACKENDS[args.backend]), overwrite=True)
    enc_s = write_s = 0.0
    for vids, clips, mask, durs in corpus.batches(args.encode_batch):
        t0 = time.perf_counter()
        with torch.no_grad():
            emb = model.encode_video(torch.from_numpy(clips), torch.from_numpy(mask))
        t1 = time.perf_counter()
        if args.backend == "faiss":
            index.add(vids, emb, durs, update_ann=False)
        else:
            index.add(vids, emb, durs)
        write_s += time.perf_counter() - t1
        enc_s += t1 - t0
    t0 = time.perf_counter()
    if args.backend == "faiss":
        index.rebuild_ann()
        index.save(loc)
        kind = index.ann_kind
    else:
        index.save()                 # flush
        index.close()                # the last client stops the engine: waits for its compaction / index tasks
        index = MilvusIndex.open(loc)          # loading builds (and persists) the vector indexes
        kind = index.ann["kind"]
        index.close()
    write_s += time.perf_counter() - t0
    return {"ingest_rows_per_s": args.n_videos / write_s, "write_s": write_s, "encode_s": enc_s,
            "build_peak_gib": peak_gib(), "kind": kind}


def phase_serve(args) -> Dict[str, Any]:
    from lavis_c2f.index.locator import open_index

    model = make_model(args.seed)
    corpus = SyntheticCorpus(args.n_videos, seed=args.seed, n_queries=args.queries)
    for _ in corpus.batches(args.encode_batch):       # the queries come from the corpus's events
        pass
    with torch.no_grad():
        text = model.encode_text(None, None, torch.from_numpy(corpus.queries()))
    index = open_index(_locator(args.backend, args.workdir), model, verify=False)
    nq, m = len(text), min(args.m, args.n_videos)
    index.search(text[0], k=10, m=m)                  # warm-up
    single, ranked = [], []
    for i in range(nq):
        t0 = time.perf_counter()
        ranked.append([v for v, _ in index.search(text[i], k=10, m=m)[0]])
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for s in range(0, nq, args.batch):
        index.search(text[s:s + args.batch], k=10, m=m)
    batched_ms = 1000 * (time.perf_counter() - t0) / nq
    out = {"ms_single": 1000 * statistics.median(single), "ms_batched": batched_ms, "ranked": ranked,
           "serve_peak_gib_search": peak_gib()}
    if args.backend == "faiss":                       # the exact top 10 of the sample queries
        n_exact = min(nq, args.exact_queries)
        out["exact"] = [[v for v, _ in r] for r in index.search_exhaustive(text[:n_exact], k=10)]
    return out


# ----------------------------------------------------------------------------- orchestration
def _child(args, phase: str, backend: str) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--backend", backend,
           "--n-videos", str(args.n_videos), "--workdir", args.workdir, "--seed", str(args.seed),
           "--queries", str(args.queries), "--m", str(args.m), "--batch", str(args.batch),
           "--threads", str(args.threads), "--encode-batch", str(args.encode_batch),
           "--exact-queries", str(args.exact_queries)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{phase} {backend} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _recall(ranked: List[List[str]], exact: List[List[str]]) -> float:
    return float(np.mean([len(set(ranked[i]) & set(e)) / 10.0 for i, e in enumerate(exact)]))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-videos", type=int, default=10000)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--queries", type=int, default=50, help="queries timed (single and batched)")
    p.add_argument("--exact-queries", type=int, default=20, help="queries with the exact top 10 (recall)")
    p.add_argument("--m", type=int, default=256, help="pre-filter candidates re-ranked per query")
    p.add_argument("--batch", type=int, default=50, help="queries per batched search")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--encode-batch", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the indexes go (a temporary folder, removed)")
    p.add_argument("--json", default=None)
    p.add_argument("--phase", choices=["build", "serve"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.phase:
        out = phase_build(args) if args.phase == "build" else phase_serve(args)
        print(json.dumps(out))
        return 0

    own_tmp = args.workdir is None
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="c2f_backends_"))
    os.makedirs(args.workdir, exist_ok=True)
    rows: Dict[str, Dict[str, Any]] = {}
    try:
        for b in ["faiss"] + [x for x in args.backends if x != "faiss"]:
            rows[b] = {"backend": b, **_child(args, "build", b)}
            rows[b].update(_child(args, "serve", b))
            print(f"{b}: done", file=sys.stderr)
    finally:
        if own_tmp:
            shutil.rmtree(args.workdir, ignore_errors=True)
    exact, base = rows["faiss"].pop("exact"), rows["faiss"]
    for r in rows.values():
        r["recall_at_10"] = _recall(r["ranked"], exact)
        r["same_top10_as_faiss"] = float(np.mean([a == b for a, b in zip(r["ranked"], base["ranked"])]))
    for r in rows.values():
        r.pop("ranked")
    load = os.getloadavg()[0]
    print(f"\nindex backends, N={args.n_videos:,} videos, D=512, 12 frames/video, k=10, m={args.m}, "
          f"{args.threads} threads, batches of {args.batch}; load average {load:.1f} on {os.cpu_count()} cores "
          "(shared host)")
    hdr = ("backend", "ingest rows/s", "build peak GiB", "serve peak GiB", "ms/query single", "ms/query batched",
           "recall@10", "top10 = FAISS", "single vs FAISS")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "|".join("---" for _ in hdr) + "|")
    for r in rows.values():
        print(f"| {r['backend']} ({r['kind']}) | {r['ingest_rows_per_s']:.0f} | {r['build_peak_gib']:.2f} | "
              f"{r['serve_peak_gib_search']:.2f} | {r['ms_single']:.1f} | {r['ms_batched']:.1f} | "
              f"{r['recall_at_10']:.3f} | {r['same_top10_as_faiss']:.2f} | {r['ms_single'] / base['ms_single']:.2f}x |")
    print(f"(encoding by the retriever, excluded above: {base['encode_s']:.0f} s for {args.n_videos:,} videos)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(list(rows.values()), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
