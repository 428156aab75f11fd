"""``c2f_video_retrieval``: stage-1 training and corpus-level text-to-video evaluation.

Training is the base loop: the retriever's ``forward`` on a retrieval batch returns the
in-batch InfoNCE loss (``lavis_c2f.models.retriever.tmass``).

Evaluation ignores the runner's data loader and scores every query of the split against
every video of the split (``dataset.queries`` x ``.videos``). The dataset is a
``VideoRetrievalDataset`` (features) or a ``VideoFramesRetrievalDataset`` (decoded frames for
a model with a CLIP tower); the model encodes either batch (``encode_text_batch`` /
``encode_video_batch``).

1. **Videos** are encoded once, on every rank, in blocks of ``video_block_size``
   (``dataset.video_batch`` -> ``model.encode_video_batch``; with ``video_loader_workers``
   > 0 the blocks are decoded by that many data-loader workers) and kept: a video embedding
   is at most ``num_frames x embed_dim`` floats.
2. **Queries** are sharded contiguously across ranks (rank r of w gets
   ``[r Q / w, (r+1) Q / w)``, as the runner's evaluation sampler). Each rank encodes its
   queries in blocks of ``query_block_size`` and scores each block against all videos
   (``model.score``, a (B, V) block, with the queries' global indices as ``text_ids``, so
   ``per_pair`` noise is the same whatever the blocks and ranks). Only blocks are
   materialised, never the whole (Q, V) matrix (unless it fits ``eval_cache_mb``, see below).
3. **Metrics** are exact for t2v and v2t (:mod:`lavis_c2f.evaluation.retrieval`
   conventions): pass 1 feeds each block to a :class:`RetrievalAccumulator` (t2v ranks) and
   records, per video, the best score of its ground-truth queries; these maxima are
   all-gathered (max over ranks), then pass 2 counts per video the rows scoring strictly
   above that bar (summed over ranks). Pass 2 re-reads the blocks kept from pass 1 when this
   rank's (Q_r, V) float32 scores fit in ``eval_cache_mb`` MiB, and otherwise recomputes
   them (scoring is deterministic, so both give the same numbers).
4. **Top-K**: each query keeps its ``stage1_top_k`` best ``[vid, score]`` (ties: lower
   video index first). Rows are gathered across ranks in rank order, so a distributed run
   writes the same file and metrics as a single process.
5. **DSL** (``dsl: true``): the t2v metrics again on the dual-softmax scores
   (:func:`lavis_c2f.evaluation.retrieval.dual_softmax`, the ``--DSL`` option of CLIP4Clip /
   X-Pool / T-MASS), reported with a ``dsl_`` prefix. The column normalisers need every
   query: pass 1 accumulates per-video log-sum-exps, combined over ranks, and pass 2
   re-weights each block. The ranks file keeps the plain scores.

Sinkhorn (UCoFiA). With ``model.sinkhorn`` on, scores are ``sum_l w_l (S_l / T + b_l(v))``
with per-video biases ``b`` from Sinkhorn-Knopp over a *fixed query bank* against all videos
of the split (``model.compute_video_bias``), as the retriever's module docstring recommends:
UCoFiA computes them from training queries. ``sinkhorn_bank: train`` (default) uses the
first ``sinkhorn_bank_size`` queries of the ``train`` split, ``eval`` those of the evaluated
split. The bank never depends on the query blocks or the number of ranks, so neither do the
scores. (Without a bank, ``model.score`` would normalise each block by its own queries and
results would change with ``query_block_size``.)

Baseline. In the same run a training-free mean-pooling cosine baseline
(:class:`~lavis_c2f.models.retriever.baseline.MeanPoolingBaseline`: sentence feature vs the mean
of the normalised clip features) is scored over the same queries and videos; its metrics are
reported with a ``baseline_`` prefix. It needs equal text and video widths: set
``baseline_video_columns: [start, end]`` to use a slice of the video features (e.g. the CLIP
stream of SlowFast+CLIP features); with different widths and no slice it is skipped. Frames
datasets have no features: the baseline is skipped.

Outputs (atomic, in the runner's result folder): ``<split>_<epoch>_ranks.jsonl`` (one row per
query: ``qid, query, ranked_vids [[vid, score], ...]``, docs/ARCHITECTURE.md) and
``<split>_<epoch>_metrics.json``.

``run:`` options (:attr:`VideoRetrievalTask.TASK_OPTIONS`):

* ``stage1_top_k`` (100, ``ranks_top_k`` of ``lavis_c2f/configs/pipeline/search.yaml``): videos kept per
  query in the ranks file (also reported as t2v R@K); the corpus task grounds the first
  ``stage1_top_k`` (10) of them.
* ``agg_metric`` (``t2v_rsum``): the value that selects the best epoch. ``t2v_rsum`` is
  t2v R@1 + R@5 + R@10 (the usual "rsum" of text-video retrieval): on small validation
  splits R@1 alone moves in coarse steps, the sum is a steadier selection signal. Any flat
  metric key works, e.g. ``t2v_R@1``.
* ``query_block_size`` (256), ``video_block_size`` (256): encoding/scoring blocks.
* ``sinkhorn_bank`` (``train`` | ``eval``), ``sinkhorn_bank_size`` (2000): see above.
* ``baseline`` (true), ``baseline_video_columns`` (null): see above.
* ``eval_cache_mb`` (512): per-rank memory for keeping pass-1 score blocks.
* ``dsl`` (false): also report the DSL-re-weighted t2v metrics (``dsl_t2v_*``).
* ``video_loader_workers`` (0): data-loader workers decoding video blocks (frames datasets).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from lavis.common.registry import registry

from lavis_c2f.common import dist as c2f_dist
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.io import write_json, write_jsonl
from lavis_c2f.common.progress import progress_bar
from lavis_c2f.evaluation.retrieval import (RetrievalAccumulator, column_logsumexp, dual_softmax, rank_metrics,
                                            topk_from_scores)
from lavis_c2f.models.retriever.embeddings import VideoEmbedding
from lavis_c2f.models.retriever.baseline import MeanPoolingBaseline
from lavis_c2f.pipeline.engine import SEARCH_DEFAULTS
from lavis_c2f.tasks.base import C2FTask, move_to_device, result_dir as default_result_dir, unwrap_model

logger = logging.getLogger(__name__)

BASE_KS = (1, 5, 10, 50)


def shard_range(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Contiguous shard ``[start, end)`` of ``n`` items for ``rank`` of ``world_size``."""
    return rank * n // world_size, (rank + 1) * n // world_size


def flatten_metrics(metrics: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"t2v": {"R@1": ..}, "v2t": {...}}`` -> ``{"t2v_R@1": .., "v2t_R@1": ..}`` (numbers only)."""
    out: Dict[str, Any] = {}
    for direction in ("t2v", "v2t"):
        for k, v in (metrics.get(direction) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}{direction}_{k}"] = v
    if "t2v" in metrics and all(metrics["t2v"].get(f"R@{k}") is not None for k in (1, 5, 10)):
        out[f"{prefix}t2v_rsum"] = round(sum(metrics["t2v"][f"R@{k}"] for k in (1, 5, 10)), 2)
    return out


class ShardedRetrievalMetrics:
    """Exact t2v / v2t metrics of a (Q, V) score matrix whose rows are spread over ranks
    and arrive in blocks (see the module docstring, step 3).

    Each rank calls :meth:`add` on its blocks (pass 1), then :meth:`sync`, then
    :meth:`add_v2t` on the same blocks (pass 2, any order), then :meth:`compute`. Every rank
    must call :meth:`sync` and :meth:`compute` (they are collectives). In one process the
    numbers equal :func:`lavis_c2f.evaluation.retrieval.retrieval_metrics` on the full matrix.
    """

    def __init__(self, num_videos: int, ks: Sequence[int] = BASE_KS):
        self.num_videos = int(num_videos)
        self.ks = tuple(ks)
        self.acc = RetrievalAccumulator(self.num_videos, self.ks)
        self.best = np.full(self.num_videos, -np.inf)
        self.has_query = np.zeros(self.num_videos, dtype=bool)
        self.above = np.zeros(self.num_videos, dtype=np.int64)
        self.rows_v2t = 0
        self.synced = False

    def add(self, sim_block: np.ndarray, gt_block: np.ndarray) -> np.ndarray:
        """Pass 1: (B, V) scores and (B,) GT video indices; returns the t2v ranks (B,)."""
        ranks = self.acc.add(sim_block, gt_block)
        gt = np.asarray(gt_block, dtype=np.int64)
        np.maximum.at(self.best, gt, sim_block[np.arange(len(gt)), gt].astype(np.float64))
        self.has_query[gt] = True
        return ranks

    def sync(self) -> None:
        """Combine the per-video GT maxima of all ranks (collective)."""
        parts = c2f_dist.all_gather_objects((self.best, self.has_query))
        self.best = np.max(np.stack([p[0] for p in parts]), axis=0)
        self.has_query = np.any(np.stack([p[1] for p in parts]), axis=0)
        self.synced = True

    def add_v2t(self, sim_block: np.ndarray) -> None:
        """Pass 2: the same (B, V) rows again (after :meth:`sync`)."""
        if not self.synced:
            raise RuntimeError("add_v2t() before sync()")
        bar = self.best.astype(sim_block.dtype) if sim_block.dtype.kind == "f" else self.best
        self.above += (sim_block > bar[None, :]).sum(0)
        self.rows_v2t += len(sim_block)

    def compute(self) -> Dict[str, Any]:
        """``{"t2v", "v2t", "num_videos_without_query", "num_queries"}`` over all ranks (collective)."""
        parts = c2f_dist.all_gather_objects((self.acc.t2v_ranks(), self.above, self.acc.num_queries,
                                             self.rows_v2t))
        t2v = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        n1, n2 = sum(p[2] for p in parts), sum(p[3] for p in parts)
        out: Dict[str, Any] = {"t2v": rank_metrics(t2v, self.ks), "num_queries": int(n1)}
        if n2:
            if n2 != n1:
                raise RuntimeError(f"v2t pass saw {n2} rows, pass 1 saw {n1}")
            above = np.sum(np.stack([p[1] for p in parts]), axis=0)
            videos = np.nonzero(self.has_query)[0]
            out["v2t"] = rank_metrics(1 + above[videos], self.ks)
            out["num_videos_without_query"] = int(self.num_videos - len(videos))
        return out


@registry.register_task("c2f_video_retrieval")
class VideoRetrievalTask(C2FTask):
    """Stage-1 task (see the module docstring)."""

    TASK_OPTIONS = {
        "stage1_top_k": SEARCH_DEFAULTS["ranks_top_k"],
        "agg_metric": "t2v_rsum",
        "query_block_size": 256,
        "video_block_size": 256,
        "sinkhorn_bank": "train",
        "sinkhorn_bank_size": 2000,
        "baseline": True,
        "baseline_video_columns": None,
        "eval_cache_mb": 512,
        "dsl": False,
        "video_loader_workers": 0,
    }

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.options
        for key in ("stage1_top_k", "query_block_size", "video_block_size", "sinkhorn_bank_size"):
            v = o[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"run.{key}: expected a positive integer, got {v!r}")
        if o["sinkhorn_bank"] not in ("train", "eval"):
            raise ConfigError(f"run.sinkhorn_bank: expected 'train' or 'eval', got {o['sinkhorn_bank']!r}")
        if not isinstance(o["baseline"], bool):
            raise ConfigError(f"run.baseline: expected true/false, got {o['baseline']!r}")
        cols = o["baseline_video_columns"]
        if cols is not None:
            cols = list(cols)
            if len(cols) != 2 or not all(isinstance(c, int) and not isinstance(c, bool) for c in cols) \
                    or not 0 <= cols[0] < cols[1]:
                raise ConfigError(f"run.baseline_video_columns: expected [start, end] with 0 <= start < end, "
                                  f"got {o['baseline_video_columns']!r}")
            o["baseline_video_columns"] = cols
        if not isinstance(o["eval_cache_mb"], (int, float)) or o["eval_cache_mb"] < 0:
            raise ConfigError(f"run.eval_cache_mb: expected a number >= 0, got {o['eval_cache_mb']!r}")
        if not isinstance(o["dsl"], bool):
            raise ConfigError(f"run.dsl: expected true/false, got {o['dsl']!r}")
        w = o["video_loader_workers"]
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"run.video_loader_workers: expected an integer >= 0, got {w!r}")
        self.top_k = int(o["stage1_top_k"])
        self.agg_metric = str(o["agg_metric"])
        self.datasets: Dict[str, Dict[str, Any]] = {}

    # ------------------------------------------------------------------ build
    def build_datasets(self, cfg) -> Dict[str, Dict[str, Any]]:
        """As the base, and keeps the datasets (the Sinkhorn bank may come from ``train``)."""
        datasets = super().build_datasets(cfg)
        for name, splits in datasets.items():
            for split, ds in splits.items():
                if not hasattr(ds, "query_batch") or not hasattr(ds, "video_batch"):
                    raise ConfigError(f"datasets.{name}: {split} is a {type(ds).__name__}; the stage-1 task "
                                      "needs dataset_type: video_retrieval")
        self.datasets = datasets
        return datasets

    def _bank_dataset(self, dataset):
        if self.options["sinkhorn_bank"] == "eval":
            return dataset
        for splits in self.datasets.values():
            if "train" in splits:
                return splits["train"]
        raise ConfigError("run.sinkhorn_bank is 'train' but no train split was built; build one "
                          "(datasets.<name>.splits) or set run.sinkhorn_bank: eval")

    # ------------------------------------------------------------------ encoding helpers
    def encode_videos(self, model, dataset, device: torch.device):
        """All videos of ``dataset`` -> (the model's video embedding (``VideoEmbedding`` (V, F, D),
        ``UCoFiAVideo``, ...), baseline VideoEmbedding or None). Same blocks on every rank."""
        blocks = _VideoBlocks(dataset, int(self.options["video_block_size"]))
        workers = int(self.options["video_loader_workers"])
        loader = (torch.utils.data.DataLoader(blocks, batch_size=None, num_workers=workers) if workers > 0
                  else (blocks[i] for i in range(len(blocks))))
        parts, base_parts = [], []
        baseline = self._baseline()
        for batch in progress_bar(loader, total=len(blocks), desc="encode videos", unit="block",
                                  enabled=self.show_progress and c2f_dist.is_main_process()):
            parts.append(model.encode_video_batch(move_to_device(batch, device)).detach())
            if baseline is not None and batch.get("src_vid") is not None:
                base_parts.append(baseline.encode_video(self._baseline_cols(batch["src_vid"]), batch["src_vid_mask"]))
        video = type(parts[0]).cat(parts)
        base = VideoEmbedding.cat(base_parts) if base_parts else None
        return video, base

    def encode_queries(self, model, dataset, idx: Sequence[int], device: torch.device):
        """Queries ``idx`` -> (batch dict, the model's text embedding)."""
        batch = dataset.query_batch(list(idx))
        emb = model.encode_text_batch(move_to_device(batch, device)).detach()
        return batch, emb

    def _baseline(self):
        if not self.options["baseline"]:
            return None

        return MeanPoolingBaseline()

    def _baseline_cols(self, src_vid: torch.Tensor) -> torch.Tensor:
        cols = self.options["baseline_video_columns"]
        if cols is None:
            return src_vid
        if cols[1] > src_vid.shape[-1]:
            raise ConfigError(f"run.baseline_video_columns {cols} exceed the video feature width "
                              f"{src_vid.shape[-1]}")
        return src_vid[..., cols[0]:cols[1]]

    def video_bias(self, model, dataset, video_emb, device: torch.device) -> Optional[torch.Tensor]:
        """Per-video Sinkhorn biases (V, L) from the fixed query bank, or None without Sinkhorn.
        A model with ``video_bias_from_levels`` (UCoFiA) has its bank scored block by block
        (only the (bank, V) level logits are kept, not the bank's word features)."""
        if not getattr(model, "sinkhorn", False):
            return None
        bank = self._bank_dataset(dataset)
        n = min(len(bank), int(self.options["sinkhorn_bank_size"]))
        if n == 0:
            raise ConfigError("run.sinkhorn_bank: the bank split has no queries")
        bs = int(self.options["query_block_size"])
        blocks = [range(q0, min(n, q0 + bs)) for q0 in range(0, n, bs)]
        if hasattr(model, "video_bias_from_levels"):
            levels: Dict[str, List[torch.Tensor]] = {}
            for idx in progress_bar(blocks, desc="SK-norm bank", unit="block",
                                    enabled=self.show_progress and c2f_dist.is_main_process()):
                _, raw = model.score(self.encode_queries(model, bank, idx, device)[1], video_emb, return_levels=True)
                for k, v in raw.items():
                    levels.setdefault(k, []).append(v.cpu())
            return model.video_bias_from_levels({k: torch.cat(v) for k, v in levels.items()})
        embs = [self.encode_queries(model, bank, idx, device)[1] for idx in blocks]
        return model.compute_video_bias(type(embs[0]).cat(embs), video_emb)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluation(self, model, data_loader, device: Optional[torch.device] = None,
                   dataset=None, desc: str = "evaluate", **_: Any) -> Dict[str, Any]:
        """Corpus-level evaluation of ``dataset`` (the loader is not used). Returns, on every
        rank, ``{"rows", "metrics", "baseline", "num_queries", "num_videos"}`` with all
        ranks' rows in dataset order."""
        device = device or torch.device("cpu")
        dataset = dataset if dataset is not None else getattr(data_loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "query_batch"):
            raise ConfigError(f"{type(self).__name__} evaluates a VideoRetrievalDataset "
                              f"(dataset_type: video_retrieval), got {type(dataset).__name__}")
        model = unwrap_model(model)
        was_training = model.training
        model.eval()
        try:
            return self._evaluate(model, dataset, device, desc)
        finally:
            model.train(was_training)

    def _evaluate(self, model, dataset, device: torch.device, desc: str) -> Dict[str, Any]:
        nq, nv = len(dataset), dataset.num_videos
        if nq == 0 or nv == 0:
            raise ConfigError(f"{getattr(dataset, 'name', 'dataset')}: nothing to evaluate ({nq} queries, "
                              f"{nv} videos)")
        video_emb, base_video = self.encode_videos(model, dataset, device)
        bias = self.video_bias(model, dataset, video_emb, device)
        baseline = self._baseline()
        if base_video is not None and baseline is not None:
            probe = dataset.query_batch([0])["txt_pooled"]
            if probe.shape[-1] != base_video.dim:
                logger.warning("baseline skipped: text width %d != video width %d (set "
                               "run.baseline_video_columns)", probe.shape[-1], base_video.dim)
                base_video = None
        ks = tuple(sorted(set(BASE_KS) | {self.top_k}))
        acc = ShardedRetrievalMetrics(nv, ks)
        base_acc = ShardedRetrievalMetrics(nv, ks) if base_video is not None else None
        dsl_acc = ShardedRetrievalMetrics(nv, ks) if self.options["dsl"] else None
        lse = np.full(nv, -np.inf)
        gts: List[np.ndarray] = []

        start, end = shard_range(nq, c2f_dist.get_rank(), c2f_dist.get_world_size())
        bs = int(self.options["query_block_size"])
        blocks = [(q0, min(end, q0 + bs)) for q0 in range(start, end, bs)]
        cache_ok = (end - start) * nv * 4 * (2 if base_video is not None else 1) <= \
            float(self.options["eval_cache_mb"]) * 2**20
        cache: List[Tuple[np.ndarray, Optional[np.ndarray]]] = []
        rows: List[Dict[str, Any]] = []
        vids = list(dataset.videos)
        show = self.show_progress and c2f_dist.is_main_process()

        def score_block(q0: int, q1: int):
            batch, temb = self.encode_queries(model, dataset, range(q0, q1), device)
            sim = model.score(temb, video_emb, video_bias=bias, text_ids=list(range(q0, q1))).float().cpu().numpy()
            bsim = None
            if base_video is not None:
                btxt = baseline.encode_text(txt_pooled=batch["txt_pooled"])
                bsim = baseline.score(btxt, base_video).float().cpu().numpy()
            return batch, sim, bsim

        for q0, q1 in progress_bar(blocks, desc=desc, unit="block", enabled=show):
            batch, sim, bsim = score_block(q0, q1)
            gt = batch["gt_video_index"].numpy()
            gts.append(gt)
            acc.add(sim, gt)
            if dsl_acc is not None:
                lse = np.logaddexp(lse, column_logsumexp(sim))
            if base_acc is not None:
                base_acc.add(bsim, gt)
            if cache_ok:
                cache.append((sim, bsim))
            rows.extend(self._rank_rows(batch, sim, vids))
        acc.sync()
        if base_acc is not None:
            base_acc.sync()
        if dsl_acc is not None:
            lse = np.logaddexp.reduce(np.stack(c2f_dist.all_gather_objects(lse)), axis=0)
        for bi, (q0, q1) in enumerate(progress_bar(blocks, desc=f"{desc} (v2t)", unit="block",
                                                   enabled=show and not cache_ok)):
            sim, bsim = cache[bi] if cache_ok else score_block(q0, q1)[1:]
            acc.add_v2t(sim)
            if dsl_acc is not None:
                dsl_acc.add(dual_softmax(sim, col_lse=lse), gts[bi])
            if base_acc is not None:
                base_acc.add_v2t(bsim)
        metrics = acc.compute()
        base_metrics = base_acc.compute() if base_acc is not None else None
        dsl_metrics = dsl_acc.compute() if dsl_acc is not None else None
        gathered = c2f_dist.all_gather_objects(rows)
        all_rows = [r for part in gathered for r in part]
        return {"rows": all_rows, "metrics": metrics, "baseline": base_metrics, "dsl": dsl_metrics, "num_queries": nq,
                "num_videos": nv, "sinkhorn_bank": None if bias is None else self.options["sinkhorn_bank"]}

    def _rank_rows(self, batch: Dict[str, Any], sim: np.ndarray, vids: List[str]) -> List[Dict[str, Any]]:
        top = topk_from_scores(sim, vids, self.top_k)
        return [{"qid": qid, "query": query, "ranked_vids": ranked}
                for qid, query, ranked in zip(batch["qid"], batch["query"], top)]

    def after_evaluation(self, val_result, split_name: str, epoch, dataset=None,
                         result_dir: Optional[str] = None, **kwargs) -> Dict[str, Any]:
        out_dir = result_dir or default_result_dir()
        tag = f"{split_name}_{epoch}"
        ranks_path = write_jsonl(val_result["rows"], f"{out_dir}/{tag}_ranks.jsonl")
        flat = flatten_metrics(val_result["metrics"])
        if val_result.get("baseline"):
            flat.update(flatten_metrics(val_result["baseline"], prefix="baseline_"))
        if val_result.get("dsl"):
            flat.update(flatten_metrics(val_result["dsl"], prefix="dsl_"))
        if self.agg_metric not in flat:
            raise ConfigError(f"run.agg_metric '{self.agg_metric}' is not among the metrics: {sorted(flat)}")
        agg = float(flat[self.agg_metric])
        report = {"split": split_name, "epoch": epoch, "num_queries": val_result["num_queries"],
                  "num_videos": val_result["num_videos"], "top_k": self.top_k,
                  "sinkhorn_bank": val_result.get("sinkhorn_bank"),
                  "agg_metric": self.agg_metric, "agg_metrics": agg,
                  "model": val_result["metrics"], "baseline_mean_pooling": val_result.get("baseline"),
                  "dsl": val_result.get("dsl"),
                  "ranks_file": ranks_path}
        write_json(report, f"{out_dir}/{tag}_metrics.json")
        if math.isnan(agg):
            raise FloatingPointError(f"{split_name}: agg metric {self.agg_metric} is NaN")
        return {**flat, "agg_metrics": agg, "num_queries": val_result["num_queries"],
                "num_videos": val_result["num_videos"], "ranks_file": ranks_path}


class _VideoBlocks(torch.utils.data.Dataset):
    """Blocks of ``block`` consecutive videos of a dataset: item i = ``video_batch`` of block i
    (data-loader workers decode them in parallel)."""

    def __init__(self, dataset, block: int):
        self.dataset, self.block = dataset, int(block)

    def __len__(self) -> int:
        return (self.dataset.num_videos + self.block - 1) // self.block

    def __getitem__(self, i: int) -> Dict[str, Any]:
        v0 = i * self.block
        return self.dataset.video_batch(list(range(v0, min(self.dataset.num_videos, v0 + self.block))))
