"""Videos -> features -> a stage-1 index: ``lavis-c2f index videos VIDEO_DIR --out INDEX``.

Extraction (:func:`lavis_c2f.video.extract.extract_corpus`, resumable) writes the features
(default ``INDEX.features``); the T-MASS retriever of a model YAML (plus a trained checkpoint)
encodes them into a :class:`~lavis_c2f.index.corpus_index.CorpusIndex`; the sidecar
``INDEX.c2f-video.json`` (:mod:`lavis_c2f.index.corpora`) records the backbone, the features
folder, the clip sampling and the retriever, so queries are later encoded like the videos were.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.io import write_json
from lavis_c2f.data.features import NpzDirStore, VideoFeatureLoader, combine_video_streams
from lavis_c2f.index.corpora import sidecar_path
from lavis_c2f.index.corpus_index import CorpusIndex
from lavis_c2f.models.checkpoint import load_retriever, model_node_from
from lavis_c2f.paths import resolve_path
from lavis_c2f.video.backbones import resolve_backbone
from lavis_c2f.video.extract import EXTRACT_DEFAULTS, FEATURES_DIR, ExtractResult, extract_corpus

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


def index_videos(video_dir: PathLike, out_index: PathLike, backbone: Any = EXTRACT_DEFAULTS["backbone"],
                 retriever_checkpoint: Optional[str] = None, *, model_cfg: str = "models/c2f_tmass_default.yaml",
                 features_dir: Optional[PathLike] = None, clip_length: float = EXTRACT_DEFAULTS["clip_length"],
                 frames_per_clip: int = EXTRACT_DEFAULTS["frames_per_clip"], workers: int = EXTRACT_DEFAULTS["workers"],
                 batch_size: Optional[int] = None, backbone_config: Optional[Mapping[str, Any]] = None,
                 overwrite: bool = False, frame_dtype: str = "float16", index_batch_size: int = 64,
                 progress: bool = True) -> Tuple[ExtractResult, Dict[str, Any]]:
    """Extract features of ``video_dir`` (resumable, into ``features_dir``, default
    ``<out_index>.features``) and build a stage-1 index at ``out_index`` with the T-MASS
    retriever of ``model_cfg`` (+ ``retriever_checkpoint``).

    Stage 1 reads the backbone's ``text_columns`` (all columns, but the CLIP stream of a
    CLIP+SlowFast backbone). The retriever's input widths must equal their width
    (``video_input_dim``, ``text_input_dim``); without a checkpoint they are set from the backbone and the
    retriever is untrained (a warning says so: rankings are then only a smoke test). Writes
    ``<out_index>.c2f-video.json`` beside the index. Returns (extraction result, index info).
    """
    out_index = os.path.abspath(os.fspath(out_index))
    if os.path.exists(out_index) and not overwrite:
        raise FileExistsError(f"{out_index} exists; pass overwrite=True (--overwrite) to replace it")
    bb = resolve_backbone(backbone, backbone_config)
    feats_out = os.path.abspath(os.fspath(features_dir)) if features_dir else out_index + ".features"
    res = extract_corpus(video_dir, feats_out, bb, clip_length=clip_length, frames_per_clip=frames_per_clip,
                         batch_size=batch_size, workers=workers, store="npz", progress=progress)
    ok = [r for r in res.rows if r.get("status") == "ok"]
    if not ok:
        raise RuntimeError(f"no video of {video_dir} could be extracted; nothing to index")
    # stage 1 sees the columns in the text space (all of them, but the CLIP stream of CLIP+SlowFast)
    col_a, col_b = bb.text_columns
    model, cfg_file = _retriever_for(bb, col_b - col_a, model_cfg, retriever_checkpoint)
    store = NpzDirStore(os.path.join(feats_out, FEATURES_DIR))
    loader = VideoFeatureLoader([store], normalize=True, max_len=None, use_tef=False)

    def stage1_features(vid: str) -> np.ndarray:
        return combine_video_streams([loader.raw(vid)[0][:, col_a:col_b]], normalize=True, use_tef=False)

    try:
        vids = [r["vid"] for r in ok]
        index = CorpusIndex.for_model(model, frame_dtype=frame_dtype, work_dir=os.path.dirname(out_index))
        index.add_features(vids, stage1_features, {r["vid"]: r.get("duration") for r in ok},
                           batch_size=index_batch_size, progress=progress)
        if os.path.exists(out_index) and overwrite:
            shutil.rmtree(out_index) if os.path.isdir(out_index) else os.remove(out_index)
        index.save(out_index)
        info = index.info()
        write_json({"backbone": res.backbone, "features_dir": feats_out, "clip_length": float(clip_length),
                    "frames_per_clip": int(frames_per_clip), "model_cfg": cfg_file,
                    "backbone_config": {k: v for k, v in dict(backbone_config or {}).items() if k != "device"},
                    "retriever_checkpoint": resolve_path(retriever_checkpoint) if retriever_checkpoint else None,
                    "videos": len(vids)}, sidecar_path(out_index))
    finally:
        loader.close()
    return res, info


def _retriever_for(bb: Any, dim: int, model_cfg: Any, checkpoint: Optional[str]) -> Tuple[Any, Optional[str]]:
    """(retriever, its YAML file) of ``model_cfg`` for the ``dim``-d stage-1 columns of the
    backbone ``bb``: with a checkpoint its input width must be ``dim``; without, its input widths
    are set to it (untrained: a warning)."""
    node, cfg_file = model_node_from(model_cfg, "--model-cfg")
    if checkpoint is None:
        node.update(video_input_dim=int(dim), text_input_dim=int(dim))
        logger.warning("index_videos: no retriever checkpoint; the T-MASS retriever is UNTRAINED (inputs sized "
                       "to the %s backbone, D=%d): rankings are a smoke test only", bb.name, dim)
    elif int(node.get("video_input_dim", dim)) != dim:
        raise ConfigError(f"{cfg_file or model_cfg}: model.video_input_dim is {node.get('video_input_dim')} but the "
                          f"{bb.name} backbone gives {dim}-d features; use a retriever trained on this backbone")
    return load_retriever(resolve_path(checkpoint) if checkpoint else None, node, where="--model-cfg"), cfg_file


__all__ = ["index_videos"]
