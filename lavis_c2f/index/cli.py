"""``lavis-c2f index build|add|remove|info|search|videos`` (registered by lavis_c2f/cli.py).

Features are read like the stage-1 datasets read them: every video stream of ``--features``
is L2-normalised per clip and the streams are concatenated (no TEF columns); query token and
pooled features are L2-normalised (``--no-normalize`` turns both off).

``lavis-c2f index videos VIDEO_DIR --out INDEX`` extracts features of raw videos and builds an
index of them in one step (:func:`lavis_c2f.index.build.index_videos`); ``lavis-c2f index
VIDEO_DIR ...`` is short for it (:func:`lavis_c2f.cli.expand_shorthands`).

Errors are reported by :func:`lavis_c2f.cli.main`, as for every command.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lavis_c2f.common import dist as c2f_dist
from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.common.io import write_jsonl
from lavis_c2f.data.features import VideoFeatureLoader, l2_normalize, open_store
from lavis_c2f.data.readers import detect_format, read_annotations
from lavis_c2f.index.ann import AnnConfig
from lavis_c2f.index.build import index_videos
from lavis_c2f.index.corpus_index import CorpusIndex, search_shards
from lavis_c2f.index.locator import backend_of, locator_text, open_index
from lavis_c2f.index.milvus_index import MilvusIndex, parse_milvus_locator
from lavis_c2f.index.milvus_ingest import check_ranks_can_share, finish_ranks, open_for_ranks, upsert_rank_batches
from lavis_c2f.models.checkpoint import load_retriever as load_model_retriever
from lavis_c2f.models.retriever.embeddings import TextEmbedding
from lavis_c2f.paths import resolve_path
from lavis_c2f.video.cli import add_video_arguments, start_ranks
from lavis_c2f.video.extract import EXTRACT_DEFAULTS

logger = logging.getLogger(__name__)

#: the sub-commands of ``lavis-c2f index`` (a first word that is none of them may be a video folder)
SUBCOMMANDS = ("build", "add", "remove", "info", "search", "videos")


# ------------------------------------------------------------------------------ helpers

def load_retriever(model_cfg: str, checkpoint: Optional[str] = None):
    """The stage-1 model of a YAML (``model:`` section or a bare mapping, merged over its
    ``model_type`` defaults) with a checkpoint's weights (:func:`lavis_c2f.models.checkpoint.load_retriever`)."""
    return load_model_retriever(resolve_path(checkpoint) if checkpoint else None, model_cfg, where="--model-cfg")


def _store_spec(text: str, field: Optional[str]) -> Any:
    text = text.strip()
    try:
        spec: Dict[str, Any] = json.loads(text) if text.startswith("{") else {"path": text}
    except ValueError as e:
        raise ConfigError(f"store spec {text!r} is not valid JSON: {e}") from None
    if field and "field" not in spec:
        spec["field"] = field
    return spec


def _open_video_loader(specs: Sequence[str], field: Optional[str], normalize: bool):
    stores = [open_store(_store_spec(s, field)) for s in specs]
    return stores, VideoFeatureLoader(stores, normalize=normalize, max_len=None, use_tef=False)


def _shard_of(vid: str, n: int) -> int:
    return int.from_bytes(hashlib.sha1(vid.encode("utf-8")).digest()[:8], "big") % n


def _parse_shard(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard expects I/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _durations(args, stores) -> Tuple[Dict[str, Optional[float]], Optional[List[str]]]:
    """(vid -> seconds, vids of the annotation file or None)."""
    durations: Dict[str, Optional[float]] = {}
    ann_vids = None
    if args.ann:
        fmt = detect_format(args.ann)
        kw: Dict[str, Any] = {}
        if fmt == "charades_sta":
            if args.clip_length is None:
                raise ConfigError("--ann with a Charades-STA file needs --clip-length (durations come from the "
                                  "number of feature rows)")
            kw = {"durations": stores[0], "clip_length": args.clip_length}
        records = read_annotations(args.ann, fmt, **kw)
        ann_vids = []
        for r in records:
            if r.vid not in durations:
                ann_vids.append(r.vid)
            durations[r.vid] = float(r.duration) if r.duration is not None else None
    return durations, ann_vids


def _select_vids(args, stores, ann_vids: Optional[List[str]]) -> List[str]:
    keys = list(stores[0].keys())
    have = set(keys)
    for s in stores[1:]:
        have &= set(s.keys())
    if args.only_ann_vids:
        if ann_vids is None:
            raise ConfigError("--only-ann-vids needs --ann")
        missing = [v for v in ann_vids if v not in have]
        if missing:
            logger.warning("%d annotated videos have no features (e.g. %s); skipped", len(missing), missing[0])
        vids = [v for v in ann_vids if v in have]
    else:
        vids = [k for k in keys if k in have]
    shard = _parse_shard(getattr(args, "shard", None))
    if shard is not None:
        vids = [v for v in vids if _shard_of(v, shard[1]) == shard[0]]
    if args.limit is not None:
        vids = vids[: args.limit]
    return vids


def _ann_config(args, base: Optional[Dict[str, Any]] = None):
    d = dict(base or {})
    for opt, key in (("ann_type", "kind"), ("flat_max", "flat_max"), ("pq_max", "pq_max"), ("nlist", "ivf_nlist"),
                     ("nprobe", "ivf_nprobe"), ("ivf_codec", "ivf_codec"), ("hnsw_m", "hnsw_m")):
        v = getattr(args, opt, None)
        if v is not None:
            d[key] = v
    return AnnConfig.from_dict(d)


def _milvus_ann(args, n_videos: int) -> Dict[str, Any]:
    """The Milvus pre-filter of the build options: ``--ann-type`` flat | hnsw | ivf (auto: flat up
    to ``--flat-max`` pre-filter vectors, else HNSW), ``--hnsw-m``, ``--nlist``, ``--nprobe``."""
    kind = args.ann_type or "auto"
    if kind == "auto":
        flat_max = args.flat_max if args.flat_max is not None else AnnConfig().flat_max
        kind = "flat" if n_videos * args.prefilter_segments <= flat_max else "hnsw"
    if args.ivf_codec not in (None, "auto", "flat"):
        raise ConfigError(f"--ivf-codec {args.ivf_codec} is FAISS-only (Milvus IVF here is IVF_FLAT)")
    if kind == "pq":
        raise ConfigError("--ann-type pq is FAISS-only (Milvus: flat, ivf or hnsw)")
    params: Dict[str, Any] = {}
    search: Dict[str, Any] = {}
    if kind == "hnsw" and args.hnsw_m is not None:
        params["M"] = int(args.hnsw_m)
    if kind == "ivf" and args.nlist is not None:
        params["nlist"] = int(args.nlist)
    if kind == "ivf" and args.nprobe is not None:
        search["nprobe"] = int(args.nprobe)
    return {"kind": kind, "params": params, "search_params": search}


def _durations_for(vids, durations, stores, clip_length):
    out = {}
    for v in vids:
        d = durations.get(v)
        if d is None and clip_length is not None:
            d = stores[0].num_rows(v) * float(clip_length)
        out[v] = d
    return out


def _check_width(loader, vid: str, model) -> None:
    width = loader.load(vid).shape[-1]
    if width != model.video_input_dim:
        raise ConfigError(f"--features give {width}-d clip features (all streams concatenated) but the model's "
                          f"video_input_dim is {model.video_input_dim}")


def _sinkhorn_bank(args, model):
    """TextEmbedding of the bank queries (``--sinkhorn-bank`` store, ``--sinkhorn-bank-ann`` qids)."""
    if not args.sinkhorn_bank:
        return None
    if not model.sinkhorn:
        raise ConfigError("--sinkhorn-bank given but the model config has sinkhorn: false")
    store = open_store(_store_spec(args.sinkhorn_bank, None))
    if args.sinkhorn_bank_ann:
        keys = [f"qid{r.qid}" for r in read_annotations(args.sinkhorn_bank_ann)]
    else:
        keys = list(store.keys())
    keys = [k for k in keys if k in store][: args.sinkhorn_bank_size]
    if not keys:
        raise ConfigError("--sinkhorn-bank: no query features found")
    emb = _encode_queries(model, [store.get_all(k) for k in keys], [k for k in keys], not args.no_normalize)
    store.close()
    return emb


def _query_arrays(fields: Dict[str, Any], where: str):
    tok = None
    for k in ("src_txt", "last_hidden_state", "tokens"):
        if k in fields:
            tok = np.asarray(fields[k], np.float32)
            break
    pooled = None
    for k in ("txt_pooled", "pooler_output", "pooled"):
        if k in fields:
            pooled = np.asarray(fields[k], np.float32).reshape(-1)
            break
    if tok is None and pooled is None:
        raise DataFormatError("no query features: expected 'last_hidden_state'/'src_txt' and/or "
                              "'pooler_output'/'txt_pooled'", path=where)
    if tok is not None and tok.ndim != 2:
        raise DataFormatError(f"token features must be (tokens, dim), got {tok.shape}", path=where)
    return tok, pooled


def _encode_queries(model, field_dicts: Sequence[Dict[str, Any]], names: Sequence[str], normalize: bool):
    embs = []
    for fields, name in zip(field_dicts, names):
        tok, pooled = _query_arrays(fields, name)
        for arr in (tok, pooled):
            if arr is not None and arr.shape[-1] != model.text_input_dim:
                raise DataFormatError(f"query features are {arr.shape[-1]}-d but the model's text_input_dim is "
                                      f"{model.text_input_dim}", path=name)
        if normalize:
            tok = None if tok is None else l2_normalize(tok)
            pooled = None if pooled is None else l2_normalize(pooled)
        with torch.no_grad():
            embs.append(model.encode_text(
                None if tok is None else torch.from_numpy(tok)[None],
                None if tok is None else torch.ones(1, tok.shape[0]),
                None if pooled is None else torch.from_numpy(np.asarray(pooled))[None]))
    return TextEmbedding.cat(embs)


# ------------------------------------------------------------------------------ commands

def _backend(args: argparse.Namespace, locator: str) -> str:
    """The backend of ``--out`` / INDEX, checked against ``--backend`` when given."""
    found = backend_of(locator)
    want = getattr(args, "backend", None)
    if want and want != found:
        raise ConfigError(f"--backend {want} but {locator!r} names a {found} index (FAISS: a folder; Milvus: a "
                          "*.db path or an http(s):// URI, with --collection or #COLLECTION)")
    return found


def cmd_build(args: argparse.Namespace) -> int:
    """Encode the feature store(s) into a new FAISS folder, or into a Milvus collection (created,
    dropped first with ``--overwrite``, or resumed: rows are upserted by video id, so a re-run
    adds nothing twice, and batches already stored are skipped), by one process or, for a
    Milvus server, by each rank of ``torch.distributed.run`` (:mod:`lavis_c2f.index.milvus_ingest`)."""
    milvus = _backend(args, args.out) == "milvus"
    if not milvus and args.collection:
        raise ConfigError("--collection is for a Milvus --out (a *.db path or an http(s):// URI)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if milvus:
        check_ranks_can_share(parse_milvus_locator(args.out, args.collection), world)
    elif world > 1:
        raise ConfigError(f"index build runs in one process for a FAISS folder ({world} ranks given): fill a Milvus "
                          "server collection across ranks (--out http://HOST:PORT#COLLECTION), or build one FAISS "
                          "index per machine with --shard I/N")
    out = locator_text(args.out, args.collection)
    if not milvus and os.path.exists(out) and not args.overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it (or use 'index add')")
    model = load_retriever(args.model_cfg, args.checkpoint)
    stores, loader = _open_video_loader(args.features, args.field, not args.no_normalize)
    try:
        durations, ann_vids = _durations(args, stores)
        vids = _select_vids(args, stores, ann_vids)
        if not vids:
            raise ConfigError("no videos to index (check --features / --ann / --shard / --limit)")
        durs = _durations_for(vids, durations, stores, args.clip_length)
        _check_width(loader, vids[0], model)
        if milvus:
            return _build_milvus(args, out, model, vids, loader, durs, world)
        index = CorpusIndex.for_model(model, ann=_ann_config(args), frame_dtype=args.frame_dtype,
                                      work_dir=os.path.dirname(out), prefilter_segments=args.prefilter_segments)
        index.add_features(vids, loader.load, durs, batch_size=args.batch_size, progress=not args.no_progress)
        bank = _sinkhorn_bank(args, model)
        if bank is not None:
            index.compute_video_bias(bank, progress=not args.no_progress)
        index.save(out)
    finally:
        loader.close()
    info = index.info()
    print(f"indexed {len(vids)} videos into {out} ({info['ann']['kind']} pre-filter, {info['size_bytes'] / 1e6:.1f} MB)")
    return 0


def _build_milvus(args: argparse.Namespace, out: str, model, vids: List[str], loader, durs, world: int) -> int:
    """``index build`` into a Milvus collection, by one process or by each rank of
    ``torch.distributed.run`` (:mod:`lavis_c2f.index.milvus_ingest`): rank 0 creates or resumes
    the collection, every rank upserts its batches not stored yet, rank 0 adds the Sinkhorn
    biases and the manifest counts."""
    if world > 1:
        c2f_dist.init_from_env("cpu", timeout_s=int(EXTRACT_DEFAULTS["dist_timeout_s"]))  # gloo: barriers only
    loc = parse_milvus_locator(out)
    index = open_for_ranks(loc, model, lambda: MilvusIndex.create(
        loc, model, ann=_milvus_ann(args, len(vids)), prefilter_segments=args.prefilter_segments,
        frame_dtype=args.frame_dtype, overwrite=args.overwrite, timeout=args.timeout), args.timeout)
    encoded, skipped = upsert_rank_batches(index, vids, loader.load, durs, batch_size=args.batch_size,
                                           progress=not args.no_progress)
    done = c2f_dist.all_gather_objects((encoded, skipped))

    def after(ix: MilvusIndex) -> Dict[str, Any]:
        bank = _sinkhorn_bank(args, model)
        if bank is not None:
            ix.compute_video_bias(bank, progress=not args.no_progress)
        return ix.info()

    info = finish_ranks(index, after)
    index.close()
    if c2f_dist.is_main_process():
        enc, skip = sum(e for e, _ in done), sum(s for _, s in done)
        ranks = f" by {len(done)} ranks" if len(done) > 1 else ""
        print(f"indexed {len(vids)} videos into {out}{ranks} ({info['ann']['kind']} pre-filter, {info['videos']} in "
              f"the collection; {enc} encoded, {skip} already stored)")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    model = load_retriever(args.model_cfg, args.checkpoint)
    milvus = backend_of(args.index) == "milvus"
    index = open_index(args.index, model, verify=not args.no_verify, collection=args.collection,
                       work_dir=None if milvus else os.path.dirname(os.path.abspath(args.index)), timeout=args.timeout)
    stores, loader = _open_video_loader(args.features, args.field, not args.no_normalize)
    try:
        durations, ann_vids = _durations(args, stores)
        vids = _select_vids(args, stores, ann_vids)
        present = index.present(vids) if milvus else {v for v in vids if v in index}
        if args.replace:
            if not milvus:   # Milvus upserts replace rows by video id
                index.remove(sorted(present))
        else:
            if present:
                logger.info("%d videos are already indexed; skipped (use --replace to re-encode)", len(present))
            vids = [v for v in vids if v not in present]
        if vids:
            _check_width(loader, vids[0], model)
            index.add_features(vids, loader.load, _durations_for(vids, durations, stores, args.clip_length),
                               batch_size=args.batch_size, progress=not args.no_progress)
            index.save(None if milvus else index.path)
    finally:
        loader.close()
    print(f"added {len(vids)} videos; {len(index)} videos in {index.path}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    milvus = backend_of(args.index) == "milvus"
    if milvus and args.compact:
        raise ConfigError("--compact is for a FAISS index folder (Milvus compacts its segments itself)")
    index = open_index(args.index, verify=not args.no_verify, collection=args.collection,
                       timeout=args.timeout)  # no model needed: stored vectors
    n = index.remove(args.vids, missing_ok=args.missing_ok)
    if args.compact:
        index.compact(work_dir=os.path.dirname(index.path))
    index.save(None if milvus else index.path)
    print(f"removed {n} videos; {len(index)} videos left in {index.path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = open_index(args.index, verify=not args.no_verify, collection=args.collection, timeout=args.timeout).info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    if info.get("backend") == "milvus":
        ann = info["ann"] or {}
        print(f"index      {info['path']} (Milvus collection {info['collection']})")
        print(f"format     {info['format']} v{info['version']}")
        print(f"videos     {info['videos']}")
        print(f"dims       D={info['dim']}, frames<={info['max_frames']}, {info['frame_dtype']} precision, "
              f"{info['prefilter_segments']} pre-filter vectors/video")
        print(f"pre-filter {ann.get('kind')} ({', '.join(f'{k}={v}' for k, v in ann.items() if k != 'kind')})")
        print(f"model      {info['model']['arch']} config {str(info['model']['config_hash'])[:12]} "
              f"weights {str(info['model']['weights_hash'])[:12]}")
        return 0
    ann = info["ann"] or {}
    params = ", ".join(f"{k}={v}" for k, v in ann.items() if k != "kind")
    print(f"index      {info['path']}")
    print(f"format     {info['format']} v{info['version']}")
    print(f"videos     {info['videos']} ({info['removed_rows']} removed rows, {info['frames_stored']} frames)")
    print(f"dims       D={info['dim']}, frames<={info['max_frames']}, {info['frame_dtype']}, "
          f"{info['prefilter_segments']} pre-filter vectors/video")
    print(f"pre-filter {ann.get('kind')} ({params})")
    print(f"model      {info['model']['arch']} config {str(info['model']['config_hash'])[:12]} "
          f"weights {str(info['model']['weights_hash'])[:12]}")
    print(f"sinkhorn   {'levels ' + ', '.join(info['video_bias']) if info['video_bias'] else 'no stored biases'}")
    print(f"size       {info['size_bytes'] / 1e6:.1f} MB on disk")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    model = load_retriever(args.model_cfg, args.checkpoint)
    indexes = [open_index(p, model, verify=not args.no_verify, collection=args.collection, timeout=args.timeout)
               for p in args.index]
    if args.nprobe is not None:
        for ix in indexes:
            if isinstance(ix, MilvusIndex):
                ix.search_params["nprobe"] = int(args.nprobe)
            elif ix.ann_kind is not None:
                ix.prefilter.set_nprobe(args.nprobe)
    fields, names = [], []
    for p in args.query_features:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"--query-features: no such file: {p}")
        try:
            with np.load(p, allow_pickle=False) as z:
                fields.append({k: z[k] for k in z.files})
        except ValueError as e:
            raise DataFormatError(f"cannot read query features: {e}", path=p) from None
        names.append(p)
    text = _encode_queries(model, fields, names, not args.no_normalize)
    results = search_shards(indexes, text, k=args.k, m=args.m)
    rows = []
    for p, res in zip(names, results):
        stem = os.path.splitext(os.path.basename(p))[0]
        qid = stem[3:] if stem.startswith("qid") else stem
        rows.append({"qid": qid, "query": "", "ranked_vids": [[v, s] for v, s in res]})
    if args.out:
        write_jsonl(rows, args.out)
        print(f"wrote {len(rows)} rankings to {args.out}")
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


def cmd_videos(args: argparse.Namespace) -> int:
    res, info = index_videos(args.video_dir, args.out, backbone=args.backbone,
                             retriever_checkpoint=args.checkpoint, model_cfg=args.model_cfg,
                             features_dir=args.features_dir, clip_length=args.clip_length,
                             frames_per_clip=args.frames_per_clip, workers=args.workers, batch_size=args.batch_size,
                             backbone_config=start_ranks(args), overwrite=args.overwrite,
                             index_batch_size=args.index_batch_size, progress=not args.no_progress)
    if c2f_dist.is_main_process():
        print(f"indexed {info['videos']} videos into {args.out} ({len(res.summary.failed)} failed to extract)")
    return 0


# ------------------------------------------------------------------------------ parser

def _common_features(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", nargs="+", required=True, metavar="STORE_SPEC",
                   help="video feature store(s), one per stream (path or JSON spec); streams are "
                        "L2-normalised per clip and concatenated")
    p.add_argument("--field", default=None, help="default field of the stores (e.g. 'features')")
    p.add_argument("--ann", default=None, metavar="SPLIT",
                   help="annotation file (QVH .jsonl, Charades-STA .txt, TACoS .json) for durations")
    p.add_argument("--only-ann-vids", action="store_true", help="index only the videos of --ann")
    p.add_argument("--clip-length", type=float, default=None,
                   help="seconds per feature row (durations = rows x this when the annotation has none)")
    p.add_argument("--limit", type=int, default=None, help="index at most this many videos")
    p.add_argument("--batch-size", type=int, default=64, help="videos per encoder call")
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalise input features")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collection", default=None,
                   help="Milvus collection of a *.db / http(s):// locator (default c2f_index; or LOCATOR#COLLECTION)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds a Milvus store may take to answer before it counts as unreachable (default 10)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-cfg", required=True, help="retriever model YAML")
    p.add_argument("--checkpoint", default=None, help="trained retriever checkpoint (.pth)")


def register(subparsers: "argparse._SubParsersAction") -> None:
    index = subparsers.add_parser(
        "index", help="build, update, inspect and search stage-1 corpus indexes",
        description="Stage-1 corpus index: FAISS pre-filter over pooled video vectors + exact T-MASS re-ranking.")
    sub = index.add_subparsers(dest="index_command", metavar="INDEX_COMMAND")
    index.set_defaults(func=lambda a: (index.print_help(), 2)[1])

    b = sub.add_parser("build", help="encode a feature store and write a new index",
                       description="Encode every video of the feature store(s) with the retriever and write an "
                                   "index folder atomically.")
    _common_features(b)
    _model_args(b)
    b.add_argument("--out", required=True, metavar="LOCATOR",
                   help="index to write: a folder (FAISS), or a *.db path / http(s):// URI (Milvus; an existing "
                        "collection is resumed: rows are upserted by video id)")
    b.add_argument("--backend", choices=["faiss", "milvus"], default=None,
                   help="check that --out names this backend (default: from --out)")
    _store_args(b)
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    b.add_argument("--shard", default=None, metavar="I/N",
                   help="index only the videos with sha1(vid) %% N == I (one shard of a big corpus)")
    b.add_argument("--ann-type", choices=["auto", "flat", "pq", "ivf", "hnsw"], default=None,
                   help="pre-filter kind (default auto: flat up to --flat-max pre-filter vectors, pq (every "
                        "vector's 4-bit PQ code scanned, re-scored exactly) up to --pq-max, else IVF)")
    b.add_argument("--flat-max", type=int, default=None,
                   help="most pre-filter vectors (videos x segments) given a flat index (60000)")
    b.add_argument("--pq-max", type=int, default=None,
                   help="most pre-filter vectors given a pq index (configs/index/ann.yaml: 1e7)")
    b.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(N), power of two)")
    b.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query (default: configs/index/ann.yaml: every list up to 2048 "
                        "with pq4 codes, nlist/4 in [16, 512] with sq8)")
    b.add_argument("--ivf-codec", choices=["auto", "flat", "sq8", "pq4"], default=None,
                   help="IVF vector codes (auto: configs/index/ann.yaml; pq4: 4-bit fast-scan PQ re-scored exactly)")
    b.add_argument("--hnsw-m", type=int, default=None, help="HNSW graph degree")
    b.add_argument("--prefilter-segments", type=int, default=3,
                   help="pre-filter vectors per video (segment means; a video scores by its best segment)")
    b.add_argument("--frame-dtype", choices=["float16", "float32"], default="float16",
                   help="storage type of the frame embeddings")
    b.add_argument("--sinkhorn-bank", default=None, metavar="TEXT_STORE",
                   help="query features (e.g. training queries) for per-video Sinkhorn biases (sinkhorn: true)")
    b.add_argument("--sinkhorn-bank-ann", default=None, metavar="SPLIT",
                   help="take the bank's qids from this annotation file (keys qid{qid})")
    b.add_argument("--sinkhorn-bank-size", type=int, default=2000, help="at most this many bank queries")
    b.set_defaults(func=cmd_build)

    a = sub.add_parser("add", help="encode more videos into an existing index",
                       description="Add the videos of the feature store(s) that are not indexed yet (or all with "
                                   "--replace); the index is rewritten atomically.")
    a.add_argument("index", metavar="LOCATOR", help="index folder (FAISS) or *.db / http(s):// URI (Milvus)")
    _store_args(a)
    _common_features(a)
    _model_args(a)
    a.add_argument("--replace", action="store_true", help="re-encode videos that are already indexed")
    a.add_argument("--no-verify", action="store_true", help="skip sha256 verification on load")
    a.set_defaults(func=cmd_add, shard=None)

    r = sub.add_parser("remove", help="remove videos from an index")
    r.add_argument("index", metavar="LOCATOR", help="index folder (FAISS) or *.db / http(s):// URI (Milvus)")
    r.add_argument("vids", nargs="+", metavar="VID")
    _store_args(r)
    r.add_argument("--missing-ok", action="store_true", help="ignore ids that are not indexed")
    r.add_argument("--compact", action="store_true", help="rewrite the frame files without removed videos")
    r.add_argument("--no-verify", action="store_true", help="skip sha256 verification on load")
    r.set_defaults(func=cmd_remove)

    i = sub.add_parser("info", help="counts, dims, pre-filter type, format version, size on disk")
    i.add_argument("index", metavar="LOCATOR", help="index folder (FAISS) or *.db / http(s):// URI (Milvus)")
    _store_args(i)
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("search", help="search one index (or shards) with precomputed query features",
                       description="Rank the indexed videos for queries given as feature files (Moment-DETR "
                                   "qid*.npz with 'last_hidden_state' and 'pooler_output', or 'src_txt' / "
                                   "'txt_pooled'). Several DIRs are shards; their top-k lists are merged.")
    s.add_argument("index", nargs="+", metavar="LOCATOR",
                   help="index folder(s) (FAISS) or *.db / http(s):// URI(s) (Milvus)")
    _store_args(s)
    s.add_argument("--query-features", nargs="+", required=True, metavar="NPZ")
    _model_args(s)
    s.add_argument("-k", type=int, default=10, help="results per query")
    s.add_argument("-m", type=int, default=None, help="pre-filter candidates re-ranked per query (default 256)")
    s.add_argument("--nprobe", type=int, default=None, help="override the IVF nprobe")
    s.add_argument("--out", default=None, help="write stage-1 ranking rows (jsonl) here instead of stdout")
    s.add_argument("--no-normalize", action="store_true", help="do not L2-normalise query features")
    s.add_argument("--no-verify", action="store_true", help="skip sha256 verification on load")
    s.set_defaults(func=cmd_search)

    v = sub.add_parser("videos", help="extract features of raw videos and build an index",
                       description="lavis-c2f extract + index build in one step (see 'lavis-c2f extract -h').")
    add_video_arguments(v)
    v.add_argument("--out", required=True, metavar="LOCATOR",
                   help="index to write: a folder (FAISS), or a Milvus *.db path / http(s):// URI (with #COLLECTION)")
    v.add_argument("--features-dir", default=None, help="where features go (default: OUT.features; resumable)")
    v.add_argument("--model-cfg", default="models/c2f_tmass_default.yaml",
                   help="retriever model YAML (package-relative or a path)")
    v.add_argument("--checkpoint", default=None,
                   help="trained retriever checkpoint for this backbone (without: untrained, smoke test only)")
    v.add_argument("--overwrite", action="store_true", help="replace an existing --out index")
    v.add_argument("--index-batch-size", type=int, default=64,
                   help="videos per retriever call (default 64); across processes each rank encodes whole batches, "
                        "so keep it when comparing with a one-process build")
    v.set_defaults(func=cmd_videos)
