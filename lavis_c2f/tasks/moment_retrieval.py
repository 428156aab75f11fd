"""``c2f_moment_retrieval``: stage-2 training and official evaluation.

``valid_step`` turns a batch into official prediction rows (``qid, query, vid,
pred_relevant_windows [[st, ed, score]...], pred_saliency_scores``). ``after_evaluation``
writes them atomically to ``<result_dir>/<split>_<epoch>_preds.jsonl``, evaluates them against
the split's annotations with the pure functions of :mod:`lavis_c2f.evaluation`, writes
``<split>_<epoch>_metrics.json`` and returns the brief metrics plus ``agg_metrics``.

``run:`` options:

* ``eval_protocol``: ``qvh`` (official QVHighlights MR + HL metrics) or ``r1miou``
  (Charades-STA / TACoS convention: R1@{0.3,0.5,0.7}, R5@..., mIoU).
* ``agg_metric``: the metric that selects the best epoch (default ``MR-full-mAP`` for ``qvh``,
  ``R1@0.7`` for ``r1miou``); any key of the brief metrics.
* ``max_pred_windows``: windows per query kept in the evaluation (official: 10).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional

from lavis.common.registry import registry

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.io import write_json, write_jsonl
from lavis_c2f.evaluation.qvh import eval_r1_miou, eval_submission
from lavis_c2f.tasks.base import C2FTask, result_dir as default_result_dir, unwrap_model

logger = logging.getLogger(__name__)

DEFAULT_AGG = {"qvh": "MR-full-mAP", "r1miou": "R1@0.7"}


def gt_rows_of(dataset) -> List[Dict[str, Any]]:
    """Ground-truth rows (QVHighlights format) of a dataset built by a c2f builder."""
    records = getattr(dataset, "records", None)
    if records is None:
        raise ConfigError(f"{type(dataset).__name__} has no 'records': cannot evaluate it")
    return [r.to_qvh_dict() for r in records]


def evaluate_predictions(preds: List[Dict[str, Any]], gt_rows: List[Dict[str, Any]], protocol: str,
                         max_pred_windows: int = 10, clip_length: Optional[float] = None) -> Dict[str, Any]:
    """Metrics of prediction rows against GT rows (``qvh`` or ``r1miou`` protocol).

    ``clip_length``: seconds per saliency clip of the dataset (its YAML's); None for datasets
    without clips (the refiner's frames), which the official protocol then scores with its own
    2 s clips. Returns the full metrics dict (for ``qvh`` the official nested structure with
    ``brief``; for ``r1miou`` a flat dict, also under ``brief``).
    """
    labelled = [g for g in gt_rows if g.get("relevant_windows")]
    if not labelled:
        return {"brief": {}, "note": "no ground-truth windows in this split"}
    if protocol == "qvh":
        return eval_submission(preds, labelled, match_number=False, max_pred_windows=max_pred_windows,
                               **({} if clip_length is None else {"clip_length": clip_length}))
    if protocol == "r1miou":
        return eval_r1_miou(preds, labelled, match_number=False)
    raise ConfigError(f"run.eval_protocol: unknown protocol '{protocol}' (qvh or r1miou)")


@registry.register_task("c2f_moment_retrieval")
class MomentRetrievalTask(C2FTask):
    TASK_OPTIONS = {"eval_protocol": "qvh", "agg_metric": None, "max_pred_windows": 10}

    def __init__(self, **options: Any):
        super().__init__(**options)
        if self.options["eval_protocol"] not in DEFAULT_AGG:
            raise ConfigError(f"run.eval_protocol: unknown protocol '{self.options['eval_protocol']}' "
                              f"(known: {sorted(DEFAULT_AGG)})")
        self.agg_metric = self.options["agg_metric"] or DEFAULT_AGG[self.options["eval_protocol"]]

    def valid_step(self, model, samples) -> List[Dict[str, Any]]:
        return unwrap_model(model).predict_batch(samples)

    def after_evaluation(self, val_result, split_name: str, epoch, dataset=None,
                         result_dir: Optional[str] = None, **kwargs) -> Dict[str, Any]:
        out_dir = result_dir or default_result_dir()
        tag = f"{split_name}_{epoch}"
        preds_path = write_jsonl(val_result, f"{out_dir}/{tag}_preds.jsonl")
        gt = gt_rows_of(dataset)
        clip_length = getattr(dataset, "clip_length", None)   # None: no clips (the refiner's frames)
        metrics = evaluate_predictions(val_result, gt, self.options["eval_protocol"],
                                       int(self.options["max_pred_windows"]), clip_length)
        write_json(metrics, f"{out_dir}/{tag}_metrics.json")
        brief = dict(metrics.get("brief", {}))
        if not brief:
            logger.info("%s: %d predictions written to %s (no ground truth to evaluate)",
                        split_name, len(val_result), preds_path)
            return {"agg_metrics": -math.inf, "n_predictions": len(val_result)}
        if self.agg_metric not in brief:
            raise ConfigError(f"run.agg_metric '{self.agg_metric}' is not among the metrics: {sorted(brief)}")
        return {**brief, "agg_metrics": float(brief[self.agg_metric]), "n_predictions": len(val_result)}
