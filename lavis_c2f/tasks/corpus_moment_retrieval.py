"""``c2f_corpus_moment_retrieval``: coarse-to-fine video corpus moment retrieval.

One model per YAML, as in LAVIS: ``model:`` is the stage-2 grounder (``c2f_qd_detr`` /
``c2f_mesm_qd_detr``); stage 1 enters as its *results*, the ranked videos of each query:

* the annotation files of the YAML are stage-2 files made by ``lavis-c2f merge-stage1``
  (every row carries ``stage1_result: [[vid, score], ...]``), or
* ``run.stage1_ranks`` names stage-1 ranks files (``<split>_<epoch>_ranks.jsonl`` of the
  ``c2f_video_retrieval`` task): a path template with ``{split}``, a mapping
  ``split -> path``, or one path for every split. It wins over ``stage1_result``.

So the retriever checkpoint is used once, by ``evaluate.py`` on the stage-1 YAML, and the
grounder checkpoint by this task (``run.checkpoint`` with ``evaluate.py``, or training).

Evaluation (the runner's loader is not used): queries are sharded contiguously across ranks;
each query is grounded in its first ``stage1_top_k`` retrieved videos and, when it has
ground truth, in its GT video too (single-video metrics and the perfect-stage-1 bound), by
the grounder's ``predict_batch`` on batches of ``pair_batch_size`` (query, video) pairs. The
grounders predict each pair independently of the batch (batch-independent T2V mask, MESM
groups of one), so the rows gathered in rank order equal a single-process run. Fusion and
metrics are :mod:`lavis_c2f.pipeline.fusion` (documented there): VCMR R@{1,5,10,100} at IoU
{0.5, 0.7}, stage-1 video recall, single-video moment retrieval in the GT video (official
``eval_submission`` for ``eval_protocol: qvh``, R1/R5@IoU + mIoU for ``r1miou``), and the
VCMR upper bound with a perfect stage 1 (``oracle-VCMR-...``).

Outputs (atomic, result folder, ``<tag> = <split>_<epoch>``):
``<tag>_vcmr.jsonl`` (``qid, query, pred_moments [[vid, st, ed, score], ...]``),
``<tag>_candidates.jsonl`` (per query: stage-1 list, grounded candidates with windows, GT-video
windows; the input of ``lavis-c2f tune-fusion``), ``<tag>_gt_preds.jsonl`` (official rows of
the grounder in the GT video) and ``<tag>_metrics.json``.

Training: the base loop on the grounder. With ``hard_negative_ratio > 0`` the training split
is wrapped in :class:`~lavis_c2f.pipeline.hard_negatives.HardNegativeMomentDataset` (its
stage-1 lists from ``stage1_ranks`` or ``stage1_result``).

``run:`` options (:attr:`CorpusMomentRetrievalTask.TASK_OPTIONS`):

* ``stage1_ranks`` (null), ``stage1_top_k`` (10, ``lavis_c2f/configs/pipeline/search.yaml``): see above.
* ``fusion`` ({form: product, weight: 1.0, s1_norm: zscore, max_moments: 100}) or
  ``fusion_file`` (the JSON of ``lavis-c2f tune-fusion``; wins over ``fusion``).
* ``pair_batch_size`` (64): (query, video) pairs per forward pass.
* ``eval_protocol`` (``qvh`` | ``r1miou``), ``max_pred_windows`` (10): single-video metrics.
* ``agg_metric`` (``VCMR-R@1-IoU@0.5``): selects the best epoch.
* ``ground_truth_video`` (true): also ground each labelled query in its GT video.
* ``hard_negative_ratio`` (0 = off), ``hard_negative_top_k`` (5), ``hard_negative_seed`` (0).
* ``refine`` (off): stage 3, the caption refiner, in evaluation. A mapping (every key optional;
  unknown keys raise ``ConfigError``; :mod:`lavis_c2f.pipeline.refine` has the details)::

      enabled: false       # the switch. Off: lavis_c2f.models.refiner is never imported
      config: null         # refiner: mapping of CaptionRefiner.from_config keys (model, checkpoint,
                           # sampler, video_fps, video_ext, captions_dir, device, cache_videos) or
                           # a YAML file with them (optionally under 'refiner:'); required when on
      top_videos: 3        # per query, the windows of this many best videos of the fused list
                           # are refined
      gt_video: true       # also refine the GT video of labelled queries (single-video and
                           # oracle metrics then measure stage 2 + 3)
      splits: null         # only these splits (null: every evaluated split)
      frame_source: video  # video (files) | folder (pre-extracted frames) | feature_image
                           # (feature rows drawn as images: the demo corpus, which has no videos)
      video_root: null     # video: <video_root>/<vid><video_ext>, decoded at the config's video_fps
      video_ext: .mp4
      frames_root: null    # folder: <frames_root>/<vid>/*.jpg|png, written at frames_fps
      frames_fps: 1.0
      features: null       # feature_image: npz folder or store mapping (null: the dataset's
                           # first video-feature stream, at its clip_length)
      captions_dir: null   # <vid>.srt speech captions (null: the refiner config's)

  When on, after stage-2 grounding of a query the windows of its ``top_videos`` best fused
  videos go through ``CaptionRefiner.refine`` and replace the stage-2 ones before the final
  fusion. A generation that does not parse or frames that cannot be read fall back to the
  stage-2 windows (counted by reason, never raised). Candidate rows get a ``refine`` entry
  (refined videos, their stage-2 windows, counters); the metrics get ``refine_n_refined``,
  ``refine_n_fallback``, ``refine_n_pairs``, ``refine_n_dropped_windows`` and
  ``refine_fallback_<reason>``, the report a ``refine`` block, and one summary line is logged.
  Refinement applies to every corpus evaluation of the selected splits, validation during
  training included; with the BLIP-2 refiner, switch it on for ``evaluate.py`` only
  (``run_scripts/eval_c2f.sh`` with ``REFINE=...``).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lavis.common.registry import registry

from lavis_c2f.common import dist as c2f_dist
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.io import write_json, write_jsonl
from lavis_c2f.common.progress import progress_bar
from lavis_c2f.data.cfg import to_plain
from lavis_c2f.data.records import MomentRecord
from lavis_c2f.paths import resolve_path
from lavis_c2f.pipeline.engine import SEARCH_DEFAULTS, CoarseToFine, Grounding, Query
from lavis_c2f.pipeline.fusion import FusionConfig, evaluate_candidates, load_fusion_choice
from lavis_c2f.pipeline.hard_negatives import HardNegativeMomentDataset
from lavis_c2f.pipeline.merge import stage1_lists
from lavis_c2f.pipeline.refine import (CorpusRefiner, RefineOptions, check_refiner_config, flat_refine_metrics,
                                       refine_counts, summary_line)
from lavis_c2f.pipeline.stages import RankedLists
from lavis_c2f.tasks.base import (C2FTask, dataset_clip_length, move_to_device, result_dir as default_result_dir,
                                  unwrap_model)
from lavis_c2f.tasks.video_retrieval import shard_range

logger = logging.getLogger(__name__)


@registry.register_task("c2f_corpus_moment_retrieval")
class CorpusMomentRetrievalTask(C2FTask):
    """Coarse-to-fine task (see the module docstring)."""

    TASK_OPTIONS = {
        "stage1_ranks": None,
        "stage1_top_k": SEARCH_DEFAULTS["stage1_top_k"],
        "fusion": None,
        "fusion_file": None,
        "pair_batch_size": 64,
        "eval_protocol": "qvh",
        "agg_metric": "VCMR-R@1-IoU@0.5",
        "max_pred_windows": 10,
        "ground_truth_video": True,
        "hard_negative_ratio": 0.0,
        "hard_negative_top_k": 5,
        "hard_negative_seed": 0,
        "refine": None,
    }

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.options
        for key in ("stage1_top_k", "pair_batch_size", "max_pred_windows", "hard_negative_top_k"):
            v = o[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"run.{key}: expected a positive integer, got {v!r}")
        if o["eval_protocol"] not in ("qvh", "r1miou"):
            raise ConfigError(f"run.eval_protocol: expected 'qvh' or 'r1miou', got {o['eval_protocol']!r}")
        r = o["hard_negative_ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or r < 0 or not math.isfinite(r):
            raise ConfigError(f"run.hard_negative_ratio: expected a number >= 0, got {r!r}")
        if not isinstance(o["ground_truth_video"], bool):
            raise ConfigError(f"run.ground_truth_video: expected true/false, got {o['ground_truth_video']!r}")
        if o["fusion_file"]:
            self.fusion = load_fusion_choice(resolve_path(o["fusion_file"]))
        else:
            self.fusion = FusionConfig.from_mapping(to_plain(o["fusion"]), where="run.fusion")
        ranks = to_plain(o["stage1_ranks"])
        if ranks is not None and not isinstance(ranks, (str, dict)):
            raise ConfigError(f"run.stage1_ranks: expected a path (template with {{split}}) or a mapping "
                              f"split -> path, got {ranks!r}")
        self.stage1_ranks = ranks
        self.agg_metric = str(o["agg_metric"])
        self.datasets: Dict[str, Dict[str, Any]] = {}
        # stage 3: validated here (pure); the refiner is imported and built on first use only
        self.refine = RefineOptions.from_mapping(to_plain(o["refine"]), where="run.refine")
        if self.refine.enabled:
            check_refiner_config(self.refine.config)
        self._refiner = None

    # ------------------------------------------------------------------ build
    def stage1_source(self, split: Optional[str]) -> Optional[str]:
        """The stage-1 ranks file of ``split`` (None: use the annotations' ``stage1_result``)."""
        r = self.stage1_ranks
        if r is None or r == "":
            return None
        if isinstance(r, dict):
            p = r.get(split)
            return resolve_path(p) if p else None
        return resolve_path(r.replace("{split}", split or ""))

    def build_datasets(self, cfg) -> Dict[str, Dict[str, Any]]:
        """As the base; checks the stage-2 dataset type, keeps the datasets and wraps the
        training split with hard negatives when ``hard_negative_ratio > 0``."""
        datasets = super().build_datasets(cfg)
        train_splits = list(cfg.run_cfg.get("train_splits", []) or [])
        ratio = float(self.options["hard_negative_ratio"])
        for name, splits in datasets.items():
            for split, ds in list(splits.items()):
                if not hasattr(ds, "labels") or not hasattr(ds, "records"):
                    raise ConfigError(f"datasets.{name}: {split} is a {type(ds).__name__}; the corpus task needs "
                                      "dataset_type: moment_retrieval")
                if ratio > 0 and split in train_splits:
                    k = int(self.options["hard_negative_top_k"])
                    source = self.stage1_source(split)

                    def lists(ds=ds, source=source, k=k, split=split):   # read when training starts
                        return stage1_lists(ds.records, source, top_k=k, where=f"run.stage1_ranks ({split})")

                    splits[split] = HardNegativeMomentDataset(ds, lists, ratio=ratio, top_k=k,
                                                              seed=int(self.options["hard_negative_seed"]))
        self.datasets = datasets
        return datasets

    def _split_of(self, dataset) -> Optional[str]:
        for splits in self.datasets.values():
            for split, ds in splits.items():
                if ds is dataset or getattr(ds, "base", None) is dataset:
                    return split
        name = str(getattr(dataset, "name", ""))
        return name.rsplit("/", 1)[-1] if "/" in name else None

    # ------------------------------------------------------------------ evaluation
    @staticmethod
    def pair_sample(dataset, rec: MomentRecord, vid: str, duration: float, query_feat: torch.Tensor
                    ) -> Dict[str, Any]:
        """A moment-retrieval sample pairing ``rec``'s query with video ``vid`` (no labels)."""
        video = dataset.video_features(vid)
        probe = MomentRecord(qid=rec.qid, query=rec.query, vid=vid, duration=duration, relevant_windows=[])
        sample = {"qid": rec.qid, "query": rec.query, "vid": vid, "clip_length": dataset.clip_length,
                  "relevant_windows": [], "video_feat": video, "query_feat": query_feat}
        sample.update(dataset.labels(probe, int(video.shape[0]), None))
        return sample

    @torch.no_grad()
    def evaluation(self, model, data_loader, device: Optional[torch.device] = None, dataset=None,
                   desc: str = "evaluate", **_: Any) -> Dict[str, Any]:
        """Ground every query of this rank's shard in its candidates; returns, on every rank,
        ``{"rows": candidate rows of all ranks in dataset order, "split"}``."""
        device = device or torch.device("cpu")
        dataset = dataset if dataset is not None else getattr(data_loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "records") or not hasattr(dataset, "labels"):
            raise ConfigError(f"{type(self).__name__} evaluates a MomentRetrievalDataset, got "
                              f"{type(dataset).__name__}")
        split = self._split_of(dataset)
        records = dataset.records
        stage1 = stage1_lists(records, self.stage1_source(split), where=f"run.stage1_ranks ({split})")
        model = unwrap_model(model)
        was_training = model.training
        model.eval()
        try:
            rows = self._ground(model, dataset, records, stage1, device, desc, split=split)
        finally:
            model.train(was_training)
        gathered = c2f_dist.all_gather_objects(rows)
        return {"rows": [r for part in gathered for r in part], "split": split}

    def corpus_refiner(self, dataset, device: Optional[torch.device] = None):
        """The stage-3 :class:`~lavis_c2f.pipeline.refine.CorpusRefiner` (built once, on first
        use; None when ``run.refine`` is off)."""
        if not self.refine.enabled:
            return None
        if self._refiner is None:
            self._refiner = CorpusRefiner.build(self.refine, dataset, device)
            logger.info("stage 3 on: caption refiner on the %d best videos per query%s, frames: %s",
                        self.refine.top_videos, " (+ the GT video)" if self.refine.gt_video else "",
                        self.refine.frame_source)
        return self._refiner

    def _ground(self, model, dataset, records: Sequence[MomentRecord], stage1: List[List[List[Any]]],
                device: torch.device, desc: str, split: Optional[str] = None) -> List[Dict[str, Any]]:
        """Candidate rows of this rank's shard of ``records``: the coarse-to-fine engine with the
        given stage-1 lists and the dataset's batches of (query, video) pairs."""
        start, end = shard_range(len(records), c2f_dist.get_rank(), c2f_dist.get_world_size())
        show = self.show_progress and c2f_dist.is_main_process()
        engine = CoarseToFine(RankedLists(stage1[start:end]), _DatasetPairs(self, model, dataset, records, device,
                                                                            desc, show),
                              self.fusion, stage1_top_k=int(self.options["stage1_top_k"]),
                              ground_gt=bool(self.options["ground_truth_video"]))
        queries = [Query(text=rec.query, qid=rec.qid, gt_vid=rec.vid if rec.relevant_windows else None,
                         items=rec.items, record=rec) for rec in records[start:end]]
        refiner = self.corpus_refiner(dataset, device) if self.refine.applies_to(split) else None
        rows = []
        for rec, res in zip(records[start:end], engine.run(queries, refiner=refiner,
                                                           progress=f"{desc} (stage 3)" if show else None)):
            gt = res.groundings.get(rec.vid) if rec.relevant_windows else None
            row = {
                "qid": rec.qid, "query": rec.query, "gt_vid": rec.vid, "duration": rec.duration,
                "relevant_windows": [[float(s), float(e)] for s, e in rec.relevant_windows],
                "relevant_clip_ids": rec.relevant_clip_ids, "saliency_scores": rec.saliency_scores,
                "stage1": [[v, s] for v, s in res.stage1],
                "candidates": res.candidates,
                "gt_windows": res.gt_windows,
                "gt_saliency": None if gt is None else gt.saliency}
            if res.refine is not None:
                row["refine"] = res.refine
            rows.append(row)
        return rows

    def after_evaluation(self, val_result, split_name: str, epoch, dataset=None,
                         result_dir: Optional[str] = None, **kwargs) -> Dict[str, Any]:
        out_dir = result_dir or default_result_dir()
        tag = f"{split_name}_{epoch}"
        rows = val_result["rows"]
        clip_length = dataset_clip_length(dataset)
        flat, report, vcmr_rows = evaluate_candidates(
            rows, self.fusion, protocol=self.options["eval_protocol"], clip_length=clip_length,
            max_pred_windows=int(self.options["max_pred_windows"]))
        cand_path = write_jsonl(rows, f"{out_dir}/{tag}_candidates.jsonl")
        vcmr_path = write_jsonl(vcmr_rows, f"{out_dir}/{tag}_vcmr.jsonl")
        gt_preds = [{"qid": r["qid"], "query": r["query"], "vid": r["gt_vid"],
                     "pred_relevant_windows": r["gt_windows"], "pred_saliency_scores": r["gt_saliency"] or []}
                    for r in rows if r.get("gt_windows") is not None]
        files = {"vcmr": vcmr_path, "candidates": cand_path}
        if gt_preds:
            files["gt_preds"] = write_jsonl(gt_preds, f"{out_dir}/{tag}_gt_preds.jsonl")
        report.update({"split": split_name, "epoch": epoch, "stage1_top_k": int(self.options["stage1_top_k"]),
                       "eval_protocol": self.options["eval_protocol"], "metrics": flat, "files": files})
        refine_flat: Dict[str, Any] = {}
        if any(r.get("refine") is not None for r in rows):
            counts = refine_counts(rows)
            refine_flat = flat_refine_metrics(counts)
            report["refine"] = {**self.refine.describe(), **counts}
            logger.info("%s", summary_line(counts, split_name))
        if not flat:
            report["metrics"] = dict(refine_flat)
            write_json(report, f"{out_dir}/{tag}_metrics.json")
            logger.info("%s: %d queries grounded; no ground truth to evaluate (%s)", split_name, len(rows),
                        vcmr_path)
            return {**refine_flat, "agg_metrics": -math.inf, "num_queries": len(rows)}
        flat.update(refine_flat)
        if self.agg_metric not in flat:
            raise ConfigError(f"run.agg_metric '{self.agg_metric}' is not among the metrics: {sorted(flat)}")
        report["agg_metric"], report["agg_metrics"] = self.agg_metric, float(flat[self.agg_metric])
        write_json(report, f"{out_dir}/{tag}_metrics.json")
        return {**flat, "agg_metrics": float(flat[self.agg_metric]), "num_queries": len(rows)}


class _DatasetPairs:
    """Stage 2 of the engine on the task's dataset: (query, video) pairs as moment-retrieval
    samples (:meth:`CorpusMomentRetrievalTask.pair_sample`), collated in batches of
    ``pair_batch_size`` across queries and predicted by the grounder's ``predict_batch``. A
    pair's duration is the GT video's annotated one, else the first annotation of that video."""

    def __init__(self, task: "CorpusMomentRetrievalTask", model, dataset, records: Sequence[MomentRecord],
                 device: torch.device, desc: str, show: bool):
        self.task, self.model, self.dataset, self.device = task, model, dataset, device
        self.desc, self.show = desc, show
        self.durations: Dict[str, float] = {}
        for rec in records:
            self.durations.setdefault(rec.vid, float(rec.duration))

    def ground(self, queries: Sequence[Query], pairs: Sequence[Tuple[int, str]]) -> List[Grounding]:
        bs = int(self.task.options["pair_batch_size"])
        out: List[Grounding] = []
        qcache: Dict[int, torch.Tensor] = {}
        for b0 in progress_bar(range(0, len(pairs), bs), desc=self.desc, enabled=self.show, unit="batch"):
            samples = []
            for qi, vid in pairs[b0:b0 + bs]:
                rec = queries[qi].record
                if qi not in qcache:
                    qcache.clear()
                    qcache[qi] = self.dataset.text_features(rec.qid)
                dur = float(rec.duration) if vid == rec.vid else self.durations.get(vid, math.inf)
                samples.append(self.task.pair_sample(self.dataset, rec, vid, dur, qcache[qi]))
            batch = move_to_device(self.dataset.collater(samples), self.device)
            for sample, pred in zip(samples, self.model.predict_batch(batch)):
                out.append(Grounding(windows=pred["pred_relevant_windows"], saliency=pred.get("pred_saliency_scores"),
                                     duration=float(sample["duration"])))
        return out
