"""Videos -> features -> a stage-1 index: ``lavis-c2f index videos VIDEO_DIR --out INDEX``.

Extraction (:func:`lavis_c2f.video.extract.extract_corpus`, resumable) writes the features
(default ``INDEX.features``); the T-MASS retriever of a model YAML (plus a trained checkpoint)
encodes them into a :class:`~lavis_c2f.index.corpus_index.CorpusIndex`; the sidecar
``INDEX.c2f-video.json`` (:mod:`lavis_c2f.index.corpora`) records the backbone, the features
folder, the clip sampling and the retriever, so queries are later encoded like the videos were.

Across processes (``python -m torch.distributed.run --nproc_per_node N -m lavis_c2f.cli index
videos ...``): the extraction is split by rank (:mod:`lavis_c2f.video.extract`); then the
videos are cut into the batches of a one-process build (``index_batch_size``), rank ``r`` of
``w`` encodes every ``w``-th batch and writes it to ``INDEX.parts/batch-B.npz`` (the rows the
index stores, :meth:`CorpusIndex.video_rows`, with a key of the retriever and the features),
and rank 0 appends the parts in batch order (:meth:`CorpusIndex.add_row_batches`), saves the
index and the sidecar and removes the parts. Same batches, same rows: the index equals a
one-process build's. An interrupted run resumes: finished videos are not extracted again and
parts whose key matches are not encoded again.

``--out`` may name a Milvus collection (``corpus.db[#COLLECTION]`` or ``http(s)://host:port#COLLECTION``,
:mod:`lavis_c2f.index.milvus_index`): the rows are upserted there by video id, the sidecar goes
into the collection's manifest (``corpus``), and ``--features-dir`` (required for a server URI)
names the stage-2 feature store every serving node reads. An existing collection of the same
model is resumed (``--overwrite`` drops it first). Across ranks, an embedded ``corpus.db`` (one
process per data folder) is filled by rank 0 from the parts; a server is filled by every rank
with its own batches, no parts (:mod:`lavis_c2f.index.milvus_ingest`; batches already stored are
skipped on a re-run).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from lavis_c2f.common import dist as c2f_dist
from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.common.io import atomic_path, write_json
from lavis_c2f.common.progress import progress_bar
from lavis_c2f.data.features import NpzDirStore, VideoFeatureLoader, combine_video_streams
from lavis_c2f.index.corpora import sidecar_path
from lavis_c2f.index.corpus_index import CorpusIndex
from lavis_c2f.index.locator import backend_of, locator_text
from lavis_c2f.index.milvus_index import DEFAULT_TIMEOUT_S, MilvusIndex, parse_milvus_locator
from lavis_c2f.index.milvus_ingest import finish_ranks, open_for_ranks, upsert_rank_batches
from lavis_c2f.models.checkpoint import load_retriever, model_node_from
from lavis_c2f.paths import resolve_path
from lavis_c2f.video.backbones import resolve_backbone
from lavis_c2f.video.extract import EXTRACT_DEFAULTS, FEATURES_DIR, ExtractResult, extract_corpus

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
#: ``INDEX.parts/batch-B.npz``: the encoded batches of a build across processes (removed once merged)
PARTS_SUFFIX = ".parts"


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
    milvus = backend_of(out_index) == "milvus"
    out_index = locator_text(out_index)
    if int(index_batch_size) < 1:
        raise ConfigError(f"index_batch_size must be >= 1, got {index_batch_size}")
    if not milvus and os.path.exists(out_index) and not overwrite:
        raise FileExistsError(f"{out_index} exists; pass overwrite=True (--overwrite) to replace it")
    local = out_index.split("#", 1)[0]                 # where files beside the index go
    if milvus and local.startswith(("http://", "https://")):
        if not features_dir:
            raise ConfigError(f"--out {out_index} is a Milvus server: give --features-dir (a path every serving "
                              "node reads the stage-2 clip features from)")
        local = os.path.join(os.path.abspath(os.fspath(features_dir)), "index")
    bb = resolve_backbone(backbone, backbone_config)
    feats_out = os.path.abspath(os.fspath(features_dir)) if features_dir else local + ".features"
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

    rank, world = c2f_dist.get_rank(), c2f_dist.get_world_size()
    try:
        vids = [r["vid"] for r in ok]
        durations = {r["vid"]: r.get("duration") for r in ok}
        sources = {r["vid"]: r.get("path") for r in ok}
        corpus = {"backbone": res.backbone, "features_dir": feats_out, "clip_length": float(clip_length),
                  "frames_per_clip": int(frames_per_clip), "model_cfg": cfg_file,
                  "backbone_config": {k: v for k, v in dict(backbone_config or {}).items() if k != "device"},
                  "retriever_checkpoint": resolve_path(retriever_checkpoint) if retriever_checkpoint else None,
                  "videos": len(vids)}
        if milvus and world > 1 and not parse_milvus_locator(out_index).embedded:
            # a server: every rank upserts its own batches (lavis_c2f.index.milvus_ingest)
            index = open_for_ranks(parse_milvus_locator(out_index), model, lambda: MilvusIndex.create(
                out_index, model, frame_dtype=frame_dtype, overwrite=overwrite), DEFAULT_TIMEOUT_S)
            upsert_rank_batches(index, vids, stage1_features, durations, sources, batch_size=index_batch_size,
                                progress=progress)
            info = finish_ranks(index, lambda ix: (ix.set_corpus(corpus), ix.info())[1])
            index.close()
            return res, info
        encoder = CorpusIndex.for_model(model, frame_dtype=frame_dtype, work_dir=os.path.dirname(local))
        # the index written: the FAISS one itself, or (rank 0) the Milvus collection, created or resumed
        index: Any = encoder
        if milvus and rank == 0:
            index = MilvusIndex.create(out_index, model, frame_dtype=frame_dtype, overwrite=overwrite)
        if world > 1:
            batches = _encode_parts(encoder, ok, stage1_features, (col_a, col_b), local + PARTS_SUFFIX,
                                    index_batch_size, progress)
            if rank == 0:
                parts = (_read_part(local + PARTS_SUFFIX, b, chunk, durations) for b, chunk in enumerate(batches))
                index.add_row_batches(parts, sources=sources) if milvus else index.add_row_batches(parts)
        elif milvus:
            index.add_features(vids, stage1_features, durations, batch_size=index_batch_size, progress=progress,
                               sources=sources)
        else:
            index.add_features(vids, stage1_features, durations, batch_size=index_batch_size, progress=progress)
        info: Dict[str, Any] = {}
        if rank == 0:
            if milvus:
                index.set_corpus(corpus)        # the sidecar lives in the collection's manifest
                index.save()
            else:
                if os.path.exists(out_index) and overwrite:
                    shutil.rmtree(out_index) if os.path.isdir(out_index) else os.remove(out_index)
                index.save(out_index)
                write_json(corpus, sidecar_path(out_index))
            info = index.info()
            shutil.rmtree(local + PARTS_SUFFIX, ignore_errors=True)
        info = c2f_dist.broadcast_object(info)
    finally:
        loader.close()
    return res, info


def _part_key(rows: Sequence[Mapping[str, Any]], model: Any, columns: Tuple[int, int]) -> str:
    """What a part's rows depend on: the retriever, the stage-1 columns and, per video, the
    features (encoder, sampling, source file, clip count)."""
    fp = model.fingerprint()
    what = [fp.get("config_hash"), fp.get("weights_hash"), list(columns)]
    what += [[r["vid"], r.get("weights_id"), r.get("clip_length"), r.get("frames_per_clip"), r.get("source"),
              r.get("n_clips"), r.get("duration")] for r in rows]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _part_path(parts_dir: str, b: int) -> str:
    return os.path.join(parts_dir, f"batch-{b:06d}.npz")


def _encode_parts(index: CorpusIndex, ok: Sequence[Mapping[str, Any]], load: Callable[[str], np.ndarray],
                  columns: Tuple[int, int], parts_dir: str, batch_size: int, progress: bool) -> List[List[str]]:
    """Across processes: the videos in batches of ``batch_size`` (the batches of a one-process
    build), every ``world``-th batch encoded by this rank into ``parts_dir/batch-B.npz`` (a
    part whose key matches, left by an interrupted run, is kept); returns the batches once
    every rank is done."""
    batches = [list(ok[s:s + batch_size]) for s in range(0, len(ok), batch_size)]
    os.makedirs(parts_dir, exist_ok=True)
    mine = c2f_dist.rank_items(range(len(batches)))
    it: Iterable[int] = mine
    if progress:
        it = progress_bar(mine, desc=f"index: encode videos rank {c2f_dist.get_rank()}/{c2f_dist.get_world_size()}",
                          unit="batch", leave=True)
    for b in it:
        rows, path = batches[b], _part_path(parts_dir, b)
        key = _part_key(rows, index.model, columns)
        if _read_key(path) == key:
            continue
        frames, lengths, pre = index.video_rows(index.encode_features([r["vid"] for r in rows], load))
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), vids=np.array([r["vid"] for r in rows]), frames=frames,
                         lengths=lengths, prefilter=pre)
    c2f_dist.barrier()
    return [[r["vid"] for r in rows] for rows in batches]


def _read_key(path: str) -> Optional[str]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["key"])
    except (OSError, ValueError, KeyError):
        return None


def _read_part(parts_dir: str, b: int, vids: Sequence[str], durations: Mapping[str, Any]):
    """``(vids, frames, lengths, prefilter, durations)`` of part ``b`` (:meth:`CorpusIndex.add_rows`)."""
    path = _part_path(parts_dir, b)
    with np.load(path, allow_pickle=False) as z:
        if [str(v) for v in z["vids"]] != list(vids):
            raise DataFormatError(f"holds other videos than batch {b}; remove {parts_dir} and rerun", path=path)
        return list(vids), z["frames"], z["lengths"], z["prefilter"], [durations.get(v) for v in vids]


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
