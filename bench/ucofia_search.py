"""UCoFiA corpus search against T-MASS corpus search, same corpus, same pre-filter, same run.

For each corpus size N the synthetic corpus of ``bench/stage1_search.py`` is indexed twice with
:class:`lavis_c2f.index.CorpusIndex` (CLIP ViT-B/32 widths: E = 512, 12 frames, the same FAISS
configuration and the same ``m`` candidates re-ranked exactly):

* **T-MASS**: the benchmark's T-MASS retriever encodes the clip features (12 frames stored);
* **UCoFiA**: per video the 12 frame CLS rows (linspace over the clips, zero-padded and masked
  as the official loader pads), 3 selected patch rows per frame (the frame plus noise: the
  benchmark times the search, not the encoder, which on CPU would take days at 1e5 videos), the
  video feature and the mask: 50 float16 rows per video (``C2FUCoFiA.to_index_rows``); the
  SK-norm biases are computed once at build from a bank of ``--bank`` texts and stored.

Queries are the corpus's event queries (UCoFiA: 32 word rows = the sentence plus noise). Both
indexes are loaded from disk (rows memory-mapped) and queried alternately, one query at a time,
so both see the same host load; printed per N: build time, ms per query (median; pre-filter and
re-rank parts), the median per-query ratio UCoFiA / T-MASS, CPU ms per query, recall@10 of
pre-filter + re-rank against each model's exhaustive top 10 (``--exhaustive-queries``), the
index size on disk and the anonymous RSS after loading each index (without the page cache of
the memory-mapped rows).

    python bench/ucofia_search.py --n-videos 10000 100000 [--json OUT]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stage1_search import (D, FRAMES, SyntheticCorpus, anon_rss_gib, dir_size,  # noqa: E402
                           make_model, peak_rss_gib)

WORDS, TOPK = 32, 3


def make_ucofia(seed: int = 0):
    """UCoFiA with the scoring sizes of the released MSR-VTT model (E 512, 32 words, 12 frames,
    top-3 patches); the CLIP towers are minimal (they do not take part in a search)."""
    from lavis_c2f.models.retriever import C2FUCoFiA

    torch.manual_seed(seed)
    m = C2FUCoFiA(embed_dim=D, vision_width=64, vision_layers=1, vision_patch_size=32, image_resolution=224,
                  text_width=D, text_layers=1, context_length=77, vocab_size=64, max_words=WORDS,
                  max_frames=FRAMES, temporal_layers=1, frame_positions=77, topk=TOPK, shift_layers=[])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.startswith("clip.") and p.ndim == 2 and p.shape[0] == p.shape[1]:
                p.add_(torch.randn(p.shape, generator=g) * (0.02 / math.sqrt(p.shape[0])))
    return m.eval()


def ucofia_videos(clips: np.ndarray, mask: np.ndarray, seed: int):
    """Synthetic UCoFiA embeddings of a batch of videos (see the module docstring)."""
    from lavis_c2f.models.retriever import UCoFiAVideo
    from lavis_c2f.models.retriever.modules import l2norm, masked_mean

    rng = np.random.default_rng(seed)
    b = clips.shape[0]
    lens = mask.sum(1).astype(int)
    frames = np.zeros((b, FRAMES, D), np.float32)
    fmask = np.zeros((b, FRAMES), np.float32)
    for i in range(b):
        idx = np.arange(lens[i]) if lens[i] <= FRAMES else np.linspace(0, lens[i] - 1, FRAMES, dtype=int)
        frames[i, :len(idx)] = clips[i, idx]
        fmask[i, :len(idx)] = 1.0
    sel = 0.7 * frames[:, :, None, :] + 0.3 * rng.standard_normal((b, FRAMES, TOPK, D)).astype(np.float32) / math.sqrt(D)
    patches = np.concatenate([frames[:, :, None, :], sel], 2).reshape(b, FRAMES * (1 + TOPK), D)
    f, m = torch.from_numpy(frames), torch.from_numpy(fmask)
    return UCoFiAVideo(f, m, torch.from_numpy(patches), l2norm(masked_mean(l2norm(f), m, dim=1)))


def ucofia_texts(sentences: np.ndarray, seed: int):
    from lavis_c2f.models.retriever import UCoFiAText

    rng = np.random.default_rng(seed)
    s = torch.from_numpy(sentences)
    words = s[:, None, :] + 0.5 * torch.from_numpy(rng.standard_normal((len(s), WORDS, D)).astype(np.float32)) \
        / math.sqrt(D)
    return UCoFiAText(s, words, torch.ones(len(s), WORDS))


def build(kind: str, corpus: SyntheticCorpus, model, args, tmp: str) -> Dict[str, Any]:
    from lavis_c2f.index import AnnConfig, CorpusIndex

    ann = AnnConfig(ivf_nprobe=args.nprobe, **({"kind": args.ann_kind} if args.ann_kind else {}))
    segments = args.segments if kind == "tmass" else 1
    index = CorpusIndex.for_model(model, ann=ann, work_dir=tmp, prefilter_segments=segments)
    t0 = time.perf_counter()
    gen = 0.0
    for vids, clips, mask, durs in corpus.batches(args.encode_batch):
        g0 = time.perf_counter()
        with torch.no_grad():
            if kind == "tmass":
                emb = model.encode_video(torch.from_numpy(clips), torch.from_numpy(mask))
            else:
                emb = ucofia_videos(clips, mask, seed=int(vids[0][3:]))
        gen += time.perf_counter() - g0 if kind == "ucofia" else 0.0
        index.add(vids, emb, durs, update_ann=False)
        if args.progress:
            print(f"\r  {kind} N={corpus.n}: {vids[-1]}", end="", file=sys.stderr, flush=True)
    if args.progress:
        print("", file=sys.stderr)
    index.rebuild_ann()
    bias_s = None
    if kind == "ucofia":
        b0 = time.perf_counter()
        bank = ucofia_texts(corpus.queries()[: args.bank] if args.bank <= len(corpus.targets)
                            else np.resize(corpus.queries(), (args.bank, D)), seed=99)
        index.compute_video_bias(bank, block_videos=4096)
        bias_s = time.perf_counter() - b0
    path = index.save(os.path.join(tmp, f"index_{kind}"))
    build_s = time.perf_counter() - t0 - gen
    info = index.info()
    del index
    gc.collect()
    return {"path": path, "build_s": build_s, "bias_s": bias_s, "ann": info["ann"], "index_gib": dir_size(path) / 2 ** 30}


def run_one(n: int, tmass, ucofia, args, workdir: str) -> Dict[str, Any]:
    from lavis_c2f.index import CorpusIndex

    corpus = SyntheticCorpus(n, seed=args.seed, n_queries=args.queries)
    os.makedirs(workdir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"ucofia_bench_{n}_", dir=workdir)
    try:
        built = {"tmass": build("tmass", corpus, tmass, args, tmp), "ucofia": build("ucofia", corpus, ucofia, args, tmp)}
        q = corpus.queries()
        with torch.no_grad():
            texts = {"tmass": tmass.encode_text(None, None, torch.from_numpy(q)), "ucofia": ucofia_texts(q, seed=7)}
        anon0 = anon_rss_gib()
        index = {}
        anon = {}
        for kind, model in (("tmass", tmass), ("ucofia", ucofia)):
            index[kind] = CorpusIndex.load(built[kind]["path"], model=model, verify=False)
            anon[kind] = anon_rss_gib() - (anon0 if kind == "tmass" else anon0 + anon["tmass"])
        m = min(args.m, n)
        lat: Dict[str, List[float]] = {"tmass": [], "ucofia": []}
        cpu: Dict[str, List[float]] = {"tmass": [], "ucofia": []}
        parts: Dict[str, List[Dict[str, float]]] = {"tmass": [], "ucofia": []}
        ranked: Dict[str, list] = {"tmass": [], "ucofia": []}
        nq = len(q)
        for kind in lat:                                           # warm-up
            for i in range(min(2, nq)):
                index[kind].search(texts[kind][i], k=10, m=m)
        for i in range(nq):
            for kind in ("tmass", "ucofia") if i % 2 == 0 else ("ucofia", "tmass"):
                tm: Dict[str, float] = {}
                c0, t0 = time.process_time(), time.perf_counter()
                res = index[kind].search(texts[kind][i], k=10, m=m, timings=tm)[0]
                lat[kind].append(time.perf_counter() - t0)
                cpu[kind].append(time.process_time() - c0)
                parts[kind].append(tm)
                ranked[kind].append(res)
        recall = {}
        for kind in lat:
            sample = list(range(min(nq, args.exhaustive_queries)))
            if not sample:
                recall[kind] = None
                continue
            exact = index[kind].search_exhaustive(texts[kind][sample], k=10, block_videos=args.exhaustive_block)
            recall[kind] = float(np.mean([len({v for v, _ in ranked[kind][i]} & {v for v, _ in exact[j]}) / 10.0
                                          for j, i in enumerate(sample)]))
        for ix in index.values():
            ix.close()
        row: Dict[str, Any] = {"n_videos": n, "m": m, "queries": nq,
                               "ratio_ucofia_over_tmass": statistics.median(
                                   u / t for u, t in zip(lat["ucofia"], lat["tmass"])),
                               "peak_rss_gib": peak_rss_gib()}
        for kind in lat:
            row[kind] = {
                "ann": built[kind]["ann"], "build_s": built[kind]["build_s"], "bias_s": built[kind]["bias_s"],
                "ms_per_query": 1000 * statistics.median(lat[kind]),
                "cpu_ms_per_query": 1000 * statistics.median(cpu[kind]),
                "prefilter_ms": 1000 * statistics.median(p["prefilter_s"] for p in parts[kind]),
                "rerank_ms": 1000 * statistics.median(p["rerank_s"] for p in parts[kind]),
                "recall_at_10": recall[kind], "index_gib": built[kind]["index_gib"],
                "anon_rss_gib_of_loaded_index": anon[kind]}
        return row
    finally:
        if args.keep:
            print(f"  kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def print_table(rows: List[Dict[str, Any]]) -> None:
    print("| videos | model | pre-filter | build | ms/query (pre-filter + re-rank) | CPU ms/query | UCoFiA / T-MASS "
          "| recall@10 | index on disk | anon RSS of the loaded index |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for kind, name in (("tmass", "T-MASS"), ("ucofia", "UCoFiA")):
            x = r[kind]
            a = x["ann"]
            ann = a["kind"] + (f", nlist {a.get('nlist')}, nprobe {a.get('nprobe')}" if a["kind"] == "ivf" else "") \
                + (f", PQ{a.get('pq_m')} refine {a.get('refine')}" if a.get("codec") == "pq4" else "")
            build = f"{x['build_s']:.0f} s" + (f" (SK-norm bias {x['bias_s']:.0f} s)" if x["bias_s"] else "")
            ratio = f"{r['ratio_ucofia_over_tmass']:.2f}x" if kind == "ucofia" else "1.00x"
            rec = "-" if x["recall_at_10"] is None else f"{x['recall_at_10']:.3f}"
            print(f"| {r['n_videos']:.0e} | {name} | {ann} | {build} | {x['ms_per_query']:.1f} "
                  f"({x['prefilter_ms']:.1f} + {x['rerank_ms']:.1f}) | {x['cpu_ms_per_query']:.1f} | {ratio} | {rec} "
                  f"| {x['index_gib']:.2f} GiB | {x['anon_rss_gib_of_loaded_index']:.2f} GiB |")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-videos", type=int, nargs="+", default=[10000, 100000])
    p.add_argument("--m", type=int, default=256, help="candidates re-ranked exactly per query")
    p.add_argument("--nprobe", type=int, default=128, help="IVF lists probed (with an IVF pre-filter)")
    p.add_argument("--ann-kind", choices=["auto", "flat", "pq", "ivf", "hnsw"], default=None,
                   help="pre-filter kind (default: configs/index/ann.yaml's size policy)")
    p.add_argument("--segments", type=int, default=3, help="T-MASS pre-filter vectors per video")
    p.add_argument("--queries", type=int, default=40)
    p.add_argument("--bank", type=int, default=16, help="SK-norm bank texts (the bias is computed once at build)")
    p.add_argument("--exhaustive-queries", type=int, default=3)
    p.add_argument("--exhaustive-block", type=int, default=4096)
    p.add_argument("--encode-batch", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--keep", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmass, ucofia = make_model(args.seed), make_ucofia(args.seed)
    rows = []
    for n in args.n_videos:
        rows.append(run_one(n, tmass, ucofia, args, args.workdir))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"E={D}, {FRAMES} frames, UCoFiA {WORDS} words x {FRAMES * (1 + TOPK)} patch rows, T-MASS "
          f"{tmass.num_trials} trials; k=10, m={args.m}; {args.threads} threads; host load average "
          f"{os.getloadavg()[0]:.1f}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
