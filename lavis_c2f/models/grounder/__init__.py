"""Stage-2 grounder: QD-DETR (official checkpoints load strictly) and MESM on top of it.

Importing this package registers the LAVIS models ``c2f_qd_detr`` and ``c2f_mesm_qd_detr``.

Public API:
    QDDETR, MESMQDDETR                        the networks (typed keyword arguments)
    HungarianMatcher, SetCriterion, MESMCriterion
    PostProcessConfig, postprocess_batch      official inference post-processing
    load_qd_detr_checkpoint(path)             official QD-DETR checkpoint -> QDDETR (eval)
    load_mesm_checkpoint(path)                official MESM checkpoint -> MESMQDDETR (eval)
    grounder_checkpoint_kind(ckpt)            which layout a loaded checkpoint has
    load_grounder(path)                       any grounder checkpoint -> (model, postprocess)
    C2FQDDETR, C2FMESMQDDETR                  the registered LAVIS models
    GrounderPredictor                         windows of one query in one or many videos
"""
from lavis_c2f.common.errors import CheckpointMismatchError
from lavis_c2f.models.grounder.checkpoint import (grounder_checkpoint_kind, load_grounder, load_mesm_checkpoint,
                                                  load_official_grounder, load_qd_detr_checkpoint)
from lavis_c2f.models.grounder.criterion import SetCriterion
from lavis_c2f.models.grounder.lavis_models import C2FMESMQDDETR, C2FQDDETR
from lavis_c2f.models.grounder.matcher import HungarianMatcher
from lavis_c2f.models.grounder.mesm import MESMCriterion, MESMQDDETR
from lavis_c2f.models.grounder.model import QDDETR
from lavis_c2f.models.grounder.postprocess import PostProcessConfig, postprocess_batch
from lavis_c2f.models.grounder.predictor import GrounderPredictor

__all__ = [
    "QDDETR", "MESMQDDETR", "HungarianMatcher", "SetCriterion", "MESMCriterion",
    "PostProcessConfig", "postprocess_batch", "load_grounder", "load_qd_detr_checkpoint", "load_mesm_checkpoint",
    "load_official_grounder", "grounder_checkpoint_kind",
    "CheckpointMismatchError", "C2FQDDETR", "C2FMESMQDDETR", "GrounderPredictor",
]
