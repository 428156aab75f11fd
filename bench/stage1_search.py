"""Stage-1 corpus search benchmark: FAISS pre-filter + exact T-MASS re-ranking vs exhaustive.

For each corpus size N a synthetic corpus is generated deterministically, encoded with a
T-MASS retriever (CLIP ViT-B/32 widths: 512-d features, 12 frames per video), written as a
:class:`lavis_c2f.index.CorpusIndex` into a temporary folder (removed afterwards unless
``--keep``), reloaded from disk (frames memory-mapped) and searched. Printed per N:

* build time (encode + write + FAISS build, data generation excluded) and the pre-filter kind;
* ms per query of pre-filter + re-rank (``m`` candidates), split into the two parts, and the
  process CPU time per query (less sensitive to other jobs on a shared host);
* queries per second one at a time (``qps_single``: every query searched alone) and in one
  batched call (``qps_batched``: ``--batch`` queries, 256, in one ``CorpusIndex.search``), their
  ratio, and whether the batched results are identical to the one-at-a-time ones (same videos,
  same order, bit-equal scores);
* ms per query of exhaustive exact scoring (every video), measured in the same run, and
  the speed-up ratio; at sizes above ``--exhaustive-batch-from`` the exhaustive pass scores
  all sample queries in one sweep over the corpus and reports the amortised time per query;
* recall@10 of pre-filter + re-rank against the exhaustive top 10 on the sample queries;
* RSS after searching (before the exhaustive sweep touches every frame), its anonymous part
  (without the page-cache pages of the memory-mapped index files) and the peak RSS (which
  includes every mapped page the exhaustive sweep touched), and the index size on disk.

Synthetic data (not rigged for the pre-filter). ``T = N / 20`` topics with Zipf-like
popularity (popular topics are shared by thousands of videos). A video has 8-20 clips and
1-3 events; each event is a contiguous run of clips showing ``0.6 topic + 0.5 detail``
(``detail`` unique to that event) plus a per-video style and per-clip noise. A query
describes one event of one video (``0.6 topic + 0.5 detail`` + noise) plus a constant
"modality gap" direction, as CLIP text features have. Query-conditioned pooling finds the
matching event; the pre-filter's mean pooling dilutes it among the other events, so the
two rankings are correlated but not identical.

End to end (``--e2e-at N``, default 1e5): one query through the coarse-to-fine engine
(:class:`~lavis_c2f.pipeline.engine.CoarseToFine`: T-MASS stage 1 on this index, then a
randomly initialised QD-DETR at the official QVHighlights CLIP sizes grounding its top 10 videos,
each 75 clips of 512-d features (150 s at 2 s clips, generated per video and kept in memory),
fusion), timed per query (median, split into stage 1 and stage 2) and for the same queries in
one batched engine call.

Model: the default T-MASS configuration (20 trials, uniform prior) with its identity
initialisation perturbed by small seeded noise, and ``radius_bias_init = -4`` so that the
stochastic radius is moderate for unit-norm inputs (an untrained radius of ~1 would swamp
unit-norm features; training shrinks it the same way).

Before timing, the loaded index's files are read once into the page cache
(:meth:`~lavis_c2f.index.CorpusIndex.warm`, as a running service's would be; ``warm_s``,
``warm_gib``), so that a reused index is not timed from disk reads while a newly built one is
timed from the cache; ``--cold`` skips it.

``--index-dir DIR`` keeps each N's index (and its exhaustive reference) and reuses it in later
runs, e.g. to time another pre-filter (``--ann-kind``, ``--ivf-codec``, ``--nprobe``) without rebuilding 1e6 videos;
the row says so (``index_reused``, ``exhaustive_reused``, ``ann_rebuild_s``). Each row records the
host's load average and CPU clock at its start and end.

    python bench/stage1_search.py --n-videos 1000 10000 100000 1000000 [--json OUT] [--threads 1]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

D = 512
FRAMES = 12


# ----------------------------------------------------------------------------- data

class SyntheticCorpus:
    """Deterministic corpus of ``n`` videos generated in batches (see module docstring)."""

    def __init__(self, n: int, seed: int = 0, n_queries: int = 50, dim: int = D):
        self.n, self.seed, self.dim = n, seed, dim
        rng = np.random.default_rng([seed, 0])
        self.n_topics = max(16, n // 20)
        self.topics = self._unit(rng.standard_normal((self.n_topics, dim)).astype(np.float32))
        ranks = np.arange(1, self.n_topics + 1, dtype=np.float64)
        p = 1.0 / (ranks + 5.0) ** 0.9
        self.topic_p = p / p.sum()
        self.gap = self._unit(rng.standard_normal((1, dim)).astype(np.float32))[0]
        self.targets = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
        self.query_parts: Dict[int, Tuple[int, np.ndarray]] = {}

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def vid(self, i: int) -> str:
        return f"syn{i:07d}"

    def batches(self, batch: int):
        """Yield (vids, clips (B, Lmax, D) float32, mask (B, Lmax), durations); vectorised over the
        batch (no per-video Python), so a 1e6-video corpus is generated in minutes."""
        d = self.dim
        for b0 in range(0, self.n, batch):
            b1 = min(self.n, b0 + batch)
            rng = np.random.default_rng([self.seed, 1, b0])
            nb = b1 - b0
            lens = rng.integers(8, 21, size=nb)
            lmax = int(lens.max())
            n_ev = rng.choice([1, 2, 3], size=nb, p=[0.4, 0.4, 0.2])
            style = self._unit(rng.standard_normal((nb, d), dtype=np.float32))
            noise = rng.standard_normal((nb, lmax, d), dtype=np.float32)
            noise /= np.linalg.norm(noise, axis=-1, keepdims=True)
            clips = noise
            clips *= 0.45
            clips += 0.25 * style[:, None, :]
            pos = np.arange(lmax)
            mask = (pos[None, :] < lens[:, None]).astype(np.float32)
            # n_ev - 1 distinct cuts in 1 .. len - 1: the smallest random keys among those positions
            keys = rng.random((nb, lmax))
            keys[:, 0] = np.inf
            keys[pos[None, :] >= lens[:, None]] = np.inf
            order = np.argsort(keys, axis=1)[:, :2]                              # up to 2 cuts
            cuts = np.where(np.arange(2)[None, :] < (n_ev - 1)[:, None], order, lmax + 1)
            event = (pos[None, :, None] >= cuts[:, None, :]).sum(-1)            # (nb, lmax) event of each clip
            ev_start = np.concatenate([[0], np.cumsum(n_ev)[:-1]])
            total_ev = int(n_ev.sum())
            ev_topic = rng.choice(self.n_topics, size=total_ev, p=self.topic_p)
            ev_detail = self._unit(rng.standard_normal((total_ev, d), dtype=np.float32))
            ev_vec = (0.6 * self.topics[ev_topic] + 0.5 * ev_detail).astype(np.float32)
            clips += ev_vec[np.minimum(ev_start[:, None] + event, total_ev - 1)]
            chosen = rng.integers(0, n_ev)                                      # the event a query describes
            for i in np.flatnonzero(np.isin(np.arange(b0, b1), self.targets)).tolist():
                e = int(ev_start[i] + chosen[i])
                self.query_parts[b0 + i] = (int(ev_topic[e]), ev_detail[e].copy())
            clips /= np.linalg.norm(clips, axis=-1, keepdims=True)
            clips *= mask[..., None]
            yield [self.vid(i) for i in range(b0, b1)], clips, mask, (lens * 2.0).tolist()

    def queries(self) -> np.ndarray:
        """(Q, D) sentence features of the target events (call after iterating the batches)."""
        rng = np.random.default_rng([self.seed, 2])
        out = []
        for gi in self.targets.tolist():
            topic, detail = self.query_parts[gi]
            q = 0.6 * self.topics[topic] + 0.5 * detail + 0.35 * self._unit(rng.standard_normal(self.dim))
            q = self._unit(q.astype(np.float32)) + 0.3 * self.gap
            out.append(self._unit(q))
        return np.stack(out).astype(np.float32)


# ----------------------------------------------------------------------------- model

def make_model(seed: int = 0):
    from lavis_c2f.models.retriever import C2FTMassRetriever

    torch.manual_seed(seed)
    m = C2FTMassRetriever(text_input_dim=D, video_input_dim=D, embed_dim=D, num_frames=FRAMES,
                          radius_bias_init=-4.0, eval_seed=24)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 2 and p.shape[0] == p.shape[1]:       # square projections: I + small noise
                p.add_(torch.randn(p.shape, generator=g) * (0.02 / math.sqrt(p.shape[0])))
    return m.eval()


# ----------------------------------------------------------------------------- measurements

def rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 30


def anon_rss_gib() -> float:
    """Resident anonymous memory (heap, FAISS, tensors) without file-backed pages of the
    memory-mapped index files, which the kernel can drop at any time."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def run_one(n: int, model, args, workdir: str) -> Dict[str, Any]:
    from lavis_c2f.index import CorpusIndex

    corpus = SyntheticCorpus(n, seed=args.seed, n_queries=args.queries)
    os.makedirs(workdir, exist_ok=True)
    kept = os.path.join(args.index_dir, f"stage1_n{n}_seed{args.seed}_s{args.segments}_q{args.queries}") \
        if args.index_dir else None
    tmp = tempfile.mkdtemp(prefix=f"stage1_bench_{n}_", dir=workdir)
    try:
        if kept and os.path.exists(os.path.join(kept, BUILD_RECORD)):
            with open(os.path.join(kept, BUILD_RECORD)) as f:
                record = json.load(f)
            path = os.path.join(kept, "index")
            print(f"  N={n}: reusing the index built by an earlier run in {kept}", file=sys.stderr)
        else:
            record = build_index(n, corpus, model, args, tmp)
            path = record.pop("path")
            if kept:
                os.makedirs(kept, exist_ok=True)
                if os.path.exists(os.path.join(kept, "index")):
                    shutil.rmtree(os.path.join(kept, "index"))
                shutil.move(path, os.path.join(kept, "index"))
                path = os.path.join(kept, "index")
                np.save(os.path.join(kept, "queries.npy"), corpus.queries())
                from lavis_c2f.common.io import write_json

                write_json(record, os.path.join(kept, BUILD_RECORD))
        build_s, gen_s = record["build_s"], record["data_gen_s"]
        queries = np.load(os.path.join(kept, "queries.npy")) if kept else corpus.queries()
        gc.collect()

        index = CorpusIndex.load(path, model=model, verify=False)
        t0 = time.perf_counter()
        warm_gib = 0.0 if args.cold else index.warm() / 2 ** 30     # page cache as a running service's
        warm_s = time.perf_counter() - t0
        ann_rebuild_s = None
        want = ann_config(args)
        if (want.choose_kind(index.store.num_vectors()) != index.ann_kind
                or args.ivf_codec not in (None, "auto") and index.info()["ann"].get("codec") != args.ivf_codec):
            t0 = time.perf_counter()                   # a reused index built with another kind or codes
            index.rebuild_ann(want)
            ann_rebuild_s = time.perf_counter() - t0
        if args.nprobe is not None:
            index.prefilter.set_nprobe(args.nprobe)
        kind = index.ann_kind
        params = dict(index.info()["ann"])
        size_b = dir_size(path)
        with torch.no_grad():
            text = model.encode_text(None, None, torch.from_numpy(queries))
        nq = len(text)
        m = min(args.m, n)
        # pre-filter + re-rank, one query at a time
        for i in range(min(2, nq)):
            index.search(text[i], k=10, m=m)
        lat, cpu, pre, rer = [], [], [], []
        ranked = []
        for i in range(nq):
            tm: Dict[str, float] = {}
            c0, t0 = time.process_time(), time.perf_counter()
            res = index.search(text[i], k=10, m=m, timings=tm)[0]
            lat.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            pre.append(tm["prefilter_s"])
            rer.append(tm["rerank_s"])
            ranked.append(res)
        # the same queries in one batched call
        nb = min(nq, args.batch)
        c0, t0 = time.process_time(), time.perf_counter()
        batched = index.search(text[:nb], k=10, m=m)
        batch_s, batch_cpu = time.perf_counter() - t0, time.process_time() - c0
        identical = all(batched[i] == ranked[i] for i in range(nb))
        rss_search, anon_search = rss_gib(), anon_rss_gib()
        e2e = run_e2e(index, model, queries, args) if n == args.e2e_at else None
        # exhaustive baseline
        n_exh = min(nq, args.exhaustive_queries if n < args.exhaustive_batch_from else args.exhaustive_queries_big)
        if args.exhaustive_pairs_max:
            n_exh = max(1, min(n_exh, args.exhaustive_pairs_max // n))
        exh_ms = None
        recall = None
        exh_mode = "skipped"
        exh_cache = os.path.join(kept, f"exhaustive_{n_exh}.json") if kept else None
        exh_reused = bool(exh_cache and os.path.exists(exh_cache))
        if n_exh > 0 and n <= args.exhaustive_max and exh_reused:
            sample = list(range(n_exh))
            with open(exh_cache) as f:
                cached = json.load(f)
            exact, exh_ms, exh_mode = cached["top10"], cached["ms_per_query"], cached["mode"] + " (earlier run)"
            hits = [len({v for v, _ in ranked[i]} & {v for v, _ in exact[j]}) / 10.0 for j, i in enumerate(sample)]
            recall = float(np.mean(hits))
        elif n_exh > 0 and n <= args.exhaustive_max:
            sample = list(range(n_exh))
            if n < args.exhaustive_batch_from:
                exh_mode = "per query"
                times, exact = [], []
                for i in sample:
                    t0 = time.perf_counter()
                    exact.append(index.search_exhaustive(text[i], k=10, block_videos=args.exhaustive_block)[0])
                    times.append(time.perf_counter() - t0)
                exh_ms = 1000 * statistics.median(times)
            else:
                exh_mode = f"one sweep of {n_exh} queries, amortised"
                t0 = time.perf_counter()
                exact = index.search_exhaustive(text[sample], k=10, block_videos=args.exhaustive_block)
                exh_ms = 1000 * (time.perf_counter() - t0) / n_exh
            hits = [len({v for v, _ in ranked[i]} & {v for v, _ in exact[j]}) / 10.0 for j, i in enumerate(sample)]
            recall = float(np.mean(hits))
            if exh_cache:
                from lavis_c2f.common.io import write_json

                write_json({"top10": exact, "ms_per_query": exh_ms, "mode": exh_mode}, exh_cache)
        index.close()
        row = {
            "n_videos": n, "index_reused": record.get("run_id") != RUN_ID, "ann": kind, "ann_params": {k: v for k, v in params.items() if k not in ("kind",)},
            "m": m, "build_s": build_s, "data_gen_s": gen_s, "ann_rebuild_s": ann_rebuild_s,
            "warm_s": warm_s, "warm_gib": warm_gib,
            "ms_per_query": 1000 * statistics.median(lat), "ms_per_query_mean": 1000 * statistics.mean(lat),
            "cpu_ms_per_query": 1000 * statistics.median(cpu),
            "prefilter_ms": 1000 * statistics.median(pre), "rerank_ms": 1000 * statistics.median(rer),
            "exhaustive_ms_per_query": exh_ms, "exhaustive_mode": exh_mode, "exhaustive_queries": n_exh,
            "exhaustive_reused": exh_reused,
            "speedup_vs_exhaustive": (exh_ms / (1000 * statistics.median(lat))) if exh_ms else None,
            "recall_at_10": recall, "queries": nq,
            "qps_single": nq / sum(lat), "qps_batched": nb / batch_s, "batched_queries": nb,
            "batched_speedup": (nb / batch_s) / (nq / sum(lat)), "batched_identical": identical,
            "cpu_ms_per_query_batched": 1000 * batch_cpu / nb, "e2e": e2e,
            "rss_gib_after_search": rss_search, "anon_rss_gib_after_search": anon_search,
            "peak_rss_gib": peak_rss_gib(), "index_gib": size_b / 2 ** 30,
        }
        return row
    finally:
        if args.keep:
            print(f"  kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


BUILD_RECORD = "bench_build.json"
RUN_ID = f"{os.getpid()}-{time.time():.0f}"


def set_threads(n: int) -> None:
    """Threads of torch and FAISS from now on."""
    from lavis_c2f.index.ann import _faiss

    torch.set_num_threads(n)
    _faiss().omp_set_num_threads(n)


def ann_config(args):
    """The pre-filter settings of the command line over ``configs/index/ann.yaml``."""
    from lavis_c2f.index import AnnConfig

    return AnnConfig.from_dict({k: v for k, v in (("kind", args.ann_kind), ("ivf_nprobe", args.nprobe),
                                                  ("ivf_codec", args.ivf_codec),
                                                  ("ivf_pq_refine", args.pq_refine)) if v is not None})


def build_index(n: int, corpus: SyntheticCorpus, model, args, tmp: str) -> Dict[str, Any]:
    """Generate, encode and index the corpus in ``tmp``; ``{"path", "build_s", "data_gen_s", ...}``
    (build = encode + write + FAISS, data generation excluded)."""
    from lavis_c2f.index import CorpusIndex

    set_threads(args.build_threads or args.threads)
    index = CorpusIndex.for_model(model, ann=ann_config(args), work_dir=tmp, prefilter_segments=args.segments)
    build_s = 0.0
    c_all, t_all = time.process_time(), time.perf_counter()
    for vids, clips, mask, durs in corpus.batches(args.encode_batch):
        t0 = time.perf_counter()
        with torch.no_grad():
            emb = model.encode_video(torch.from_numpy(clips), torch.from_numpy(mask))
        index.add(vids, emb, durs, update_ann=False)
        build_s += time.perf_counter() - t0
        if args.progress:
            print(f"\r  N={n}: encoded {vids[-1]}", end="", file=sys.stderr, flush=True)
    gen_s = time.perf_counter() - t_all - build_s
    if args.progress:
        print("", file=sys.stderr)
    t0 = time.perf_counter()
    index.rebuild_ann()
    path = index.save(os.path.join(tmp, "index"))
    build_s += time.perf_counter() - t0
    index.close()
    set_threads(args.threads)
    return {"path": path, "build_s": build_s, "build_threads": args.build_threads or args.threads, "data_gen_s": gen_s, "build_cpu_s": time.process_time() - c_all,
            "n_videos": n, "seed": args.seed, "segments": args.segments, "run_id": RUN_ID,
            "host_after_build": host_state(), "peak_rss_gib_after_build": peak_rss_gib()}


class SyntheticClips:
    """``encoded(vid)``: 75 clips of D-d features per video (QVHighlights' 150 s at 2 s clips),
    seeded by the video id and kept in memory once generated (as page-cached feature files)."""

    def __init__(self, n_clips: int = 75, clip_length: float = 2.0, dim: int = D):
        self.n_clips, self.clip_length, self.dim = n_clips, clip_length, dim
        self._cache: Dict[str, Any] = {}

    def encoded(self, vid: str):
        from lavis_c2f.video.encoded import EncodedVideo

        if vid not in self._cache:
            rng = np.random.default_rng([7, int(vid[3:])])
            feats = rng.standard_normal((self.n_clips, self.dim)).astype(np.float32)
            self._cache[vid] = EncodedVideo(vid, feats, self.n_clips * self.clip_length, self.clip_length,
                                            "synthetic")
        return self._cache[vid]


def run_e2e(index, model, query_features: np.ndarray, args) -> Dict[str, Any]:
    """One query through the engine (stage 1 on ``index`` + QD-DETR in its top 10), per query
    and batched (module docstring)."""
    from lavis_c2f.models.grounder import C2FQDDETR
    from lavis_c2f.pipeline.engine import CoarseToFine, Query
    from lavis_c2f.pipeline.fusion import FusionConfig
    from lavis_c2f.pipeline.stages import FeatureGrounder, IndexStage1

    torch.manual_seed(args.seed)
    grounder = C2FQDDETR.from_pretrained("qvh_clip").eval()
    engine = CoarseToFine(IndexStage1(index, model), FeatureGrounder(grounder, None, [D], corpus=SyntheticClips()),
                          FusionConfig(), stage1_top_k=10)
    rng = np.random.default_rng([args.seed, 3])
    pooled = query_features[: args.e2e_queries]
    queries = [Query(f"query {i}", tokens=rng.standard_normal((12, D)).astype(np.float32), pooled=p)
               for i, p in enumerate(pooled)]
    engine.run(queries, 10)                               # warm-up: grounded videos' features generated
    total, s1, s2 = [], [], []
    for q in queries:
        tm: Dict[str, float] = {}
        t0 = time.perf_counter()
        engine.run([q], 10, timings=tm)
        total.append(time.perf_counter() - t0)
        s1.append(tm["stage1_s"])
        s2.append(tm["stage2_s"])
    t0 = time.perf_counter()
    engine.run(queries, 10)
    batch_s = time.perf_counter() - t0
    return {"queries": len(queries), "videos_grounded": 10, "clips_per_video": 75,
            "ms_per_query": 1000 * statistics.median(total), "stage1_ms": 1000 * statistics.median(s1),
            "stage2_ms": 1000 * statistics.median(s2), "ms_per_query_batched": 1000 * batch_s / len(queries)}


def cpu_clock_mhz() -> Optional[float]:
    """Mean current clock of the host's cores (``/proc/cpuinfo``), None where not reported."""
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.lower().startswith("cpu mhz")]
    except OSError:
        return None
    return statistics.mean(mhz) if mhz else None


def host_state() -> Dict[str, Any]:
    """What makes wall times on a shared host comparable: load averages and the CPU clock."""
    return {"loadavg": list(os.getloadavg()), "cpu_mhz": cpu_clock_mhz()}


def fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: List[Dict[str, Any]]) -> None:
    head = ("N", "build s", "pre-filter", "m", "ms/query", "(pre + rerank)", "CPU ms/q", "exhaustive ms/q", "speed-up",
            "recall@10", "qps single", "qps batched", "batched/single", "identical", "RSS GiB", "anon GiB",
            "peak GiB", "index GiB")
    lines = [head]
    for r in rows:
        ap = r["ann_params"]
        desc = r["ann"] + (f" {ap.get('codec')} nlist={ap.get('nlist')} nprobe={ap.get('nprobe')}"
                           if r["ann"] == "ivf" else "")
        desc += f" m={ap.get('pq_m')} refine={ap.get('refine')}" if ap.get("codec") == "pq4" else ""
        lines.append((f"{r['n_videos']:,}", f"{r['build_s']:.1f}", desc, str(r["m"]), f"{r['ms_per_query']:.1f}",
                      f"{r['prefilter_ms']:.1f} + {r['rerank_ms']:.1f}", f"{r['cpu_ms_per_query']:.1f}",
                      fmt(r["exhaustive_ms_per_query"], ".1f"),
                      fmt(r["speedup_vs_exhaustive"], ".0f") + ("x" if r["speedup_vs_exhaustive"] else ""),
                      fmt(r["recall_at_10"], ".3f"), f"{r['qps_single']:.1f}", f"{r['qps_batched']:.1f}",
                      f"{r['batched_speedup']:.2f}x", "yes" if r["batched_identical"] else "NO",
                      f"{r['rss_gib_after_search']:.2f}",
                      f"{r['anon_rss_gib_after_search']:.2f}", f"{r['peak_rss_gib']:.2f}",
                      f"{r['index_gib']:.3f}"))
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    for j, l in enumerate(lines):
        print("  ".join(str(c).rjust(w) for c, w in zip(l, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    for r in rows:
        print(f"N={r['n_videos']:,}: index {'reused from an earlier run' if r['index_reused'] else 'built by this run'}; "
              f"exhaustive {r['exhaustive_mode']} ({r['exhaustive_queries']} queries); "
              f"recall over them; latency median of {r['queries']} single-query searches "
              f"(mean {r['ms_per_query_mean']:.1f} ms); batched: {r['batched_queries']} queries in one call, "
              f"{r['cpu_ms_per_query_batched']:.1f} CPU ms/query")
        e = r.get("e2e")
        if e:
            print(f"N={r['n_videos']:,} end to end (stage 1 + QD-DETR in the top {e['videos_grounded']} videos of "
                  f"{e['clips_per_video']} clips + fusion): {e['ms_per_query']:.1f} ms per query (stage 1 "
                  f"{e['stage1_ms']:.1f} + stage 2 {e['stage2_ms']:.1f}), median of {e['queries']}; the same "
                  f"{e['queries']} queries in one engine call: {e['ms_per_query_batched']:.1f} ms per query")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-videos", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--json", default=None, help="write one row per N here")
    p.add_argument("--queries", type=int, default=256, help="queries per N (single-query timing, one batched call)")
    p.add_argument("-m", "--m", type=int, default=256, help="pre-filter candidates re-ranked per query")
    p.add_argument("--nprobe", type=int, default=None, help="IVF nprobe (default: the index's policy)")
    p.add_argument("--ann-kind", choices=["auto", "flat", "pq", "ivf", "hnsw"], default=None,
                   help="pre-filter kind (default: configs/index/ann.yaml's size policy); a reused index of "
                        "another kind gets its FAISS index rebuilt (ann_rebuild_s)")
    p.add_argument("--ivf-codec", choices=["auto", "flat", "sq8", "pq4"], default=None,
                   help="IVF codes (default: configs/index/ann.yaml); a reused index built with other codes "
                        "gets its FAISS index rebuilt (ann_rebuild_s)")
    p.add_argument("--pq-refine", type=int, default=None, help="pq4: vectors re-scored exactly per candidate")
    p.add_argument("--segments", type=int, default=3, help="pre-filter vectors per video")
    p.add_argument("--exhaustive-queries", type=int, default=20, help="queries with exhaustive scoring (N small)")
    p.add_argument("--exhaustive-queries-big", type=int, default=20,
                   help="queries scored exhaustively in one sweep for N >= --exhaustive-batch-from")
    p.add_argument("--exhaustive-batch-from", type=int, default=50000)
    p.add_argument("--exhaustive-pairs-max", type=int, default=None,
                   help="fewer exhaustive queries where queries x N would exceed this many exact pairs")
    p.add_argument("--exhaustive-max", type=int, default=10 ** 7, help="skip exhaustive scoring above this N")
    p.add_argument("--exhaustive-block", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256, help="queries searched in one batched call")
    p.add_argument("--cold", action="store_true",
                   help="time the searches without first reading the index files into the page cache "
                        "(CorpusIndex.warm)")
    p.add_argument("--e2e-at", type=int, default=100000,
                   help="N whose index also times the end-to-end engine (stage 1 + grounding of the top 10)")
    p.add_argument("--e2e-queries", type=int, default=20, help="queries of the end-to-end timing")
    p.add_argument("--encode-batch", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2, help="threads of the timed searches")
    p.add_argument("--build-threads", type=int, default=None, help="threads of the index build (default --threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="folder for the temporary indexes (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folders")
    p.add_argument("--index-dir", default=None,
                   help="build each N's index once into this folder and reuse it in later runs (the row "
                        "then reports the build time of the run that built it; index_reused: true)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import lavis_c2f.models.retriever  # noqa: F401

    set_threads(args.threads)
    model = make_model(args.seed)
    rows = []
    for n in args.n_videos:
        t0 = time.perf_counter()
        start = host_state()
        row = run_one(n, model, args, args.workdir or tempfile.gettempdir())
        row["wall_s"] = time.perf_counter() - t0
        row["host_at_start"], row["host_at_end"] = start, host_state()
        row["loadavg_1min_at_end"] = os.getloadavg()[0]
        rows.append(row)
        print(f"N={n:,} done in {row['wall_s']:.0f} s: {row['ms_per_query']:.1f} ms/query, recall@10 "
              f"{fmt(row['recall_at_10'], '.3f')}", file=sys.stderr)
        gc.collect()
    loads = ", ".join(f"{r['host_at_start']['loadavg'][0]:.1f} -> {r['loadavg_1min_at_end']:.1f}" for r in rows)
    clocks = ", ".join(fmt(r["host_at_end"]["cpu_mhz"], ".0f") for r in rows)
    print(f"\nstage-1 search, D={D}, {FRAMES} frames/video, {args.threads} threads, k=10, "
          f"T-MASS {model.num_trials} trials, {args.segments} pre-filter vectors/video; host load average "
          f"(1 min) at the start -> end of each N: {loads} on {os.cpu_count()} cores (other jobs share the host); "
          f"CPU clock MHz at the end of each N: {clocks}")
    print_table(rows)
    if args.json:
        from lavis_c2f.common.io import write_json

        write_json(rows, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
