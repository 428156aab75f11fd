"""Extract per-clip features of a folder of videos into the Moment-DETR layout.

Output (``OUT``)::

    OUT/clip_features/{vid}.npz        'features' (n_clips, D) float32   (store="npz")
    OUT/clip_features/shard-000000.tar {vid}.npy members                (store="wds")
    OUT/videos.jsonl                   one row per video: vid, path, duration, n_clips, fps,
                                       backbone, weights_id, clip_length, frames_per_clip,
                                       status ("ok" | "failed"), error, decoder
    OUT/extract.json                   backbone description, parameters, counts
    OUT/.done/{vid}.json               per-video done markers (resumability)

Video ids are file stems; when two files share a stem (``a.mp4`` and ``sub/a.mkv``), every
such file gets its relative path without extension with ``/`` replaced by ``__``.

Resumability: a video is skipped when its done marker names the same backbone
``weights_id``, clip length and frames per clip, the source file has the same size and
mtime, and its features are present. Each video's features are written atomically
(temporary name + rename) before its marker, so an interrupted run loses at most the
videos in flight. Failed videos are retried by the next run. With ``store="wds"`` finished
videos are staged as ``OUT/.staging/{vid}.npy`` and packed into shards at the end of every
run (existing shards are merged in; the folder is replaced atomically).

Decoding runs in ``workers`` processes (0: in the main process), overlapped with encoding in
the main process; memory is bounded by ``batch_clips`` clips per message and a queue of
``2 * workers`` messages.

Errors of one video (unreadable, truncated, audio-only, ...) are recorded and the run goes
on; the summary is printed at the end. :func:`extract_corpus` returns an
:class:`ExtractResult`; the CLI exits with 0 when at least one video has features (new or
from an earlier run), 1 otherwise.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.io import atomic_path, write_json, write_jsonl
from lavis_c2f.video.decode import (DecodeSummary, VideoDecodeError, iter_clip_batches, list_videos, probe,
                                    _require_video)

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
FEATURES_DIR = "clip_features"
DONE_DIR = ".done"
STAGING_DIR = ".staging"


@dataclass
class ExtractResult:
    """What :func:`extract_corpus` did: ``rows`` (videos.jsonl rows of every video of this
    run, in input order), ``summary`` (ok / failed / skipped), ``out_dir``, ``backbone``."""

    out_dir: str
    rows: List[Dict[str, Any]]
    summary: DecodeSummary
    backbone: Dict[str, Any]
    seconds: float = 0.0
    stats: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_with_features(self) -> int:
        return sum(1 for r in self.rows if r.get("status") == "ok")


def assign_vids(paths: Sequence[str], root: str) -> Dict[str, str]:
    """path -> video id (stem; colliding stems use the relative path, '/' -> '__')."""
    stems: Dict[str, List[str]] = {}
    for p in paths:
        stems.setdefault(os.path.splitext(os.path.basename(p))[0], []).append(p)
    out: Dict[str, str] = {}
    for stem, ps in stems.items():
        if len(ps) == 1:
            out[ps[0]] = stem
        else:
            for p in ps:
                rel = os.path.splitext(os.path.relpath(p, root))[0]
                out[p] = rel.replace(os.sep, "__").replace("/", "__")
    return out


def _source_sig(path: str) -> Dict[str, int]:
    st = os.stat(path)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


# =========================================================================== decode workers


def _worker_main(tasks, results, params) -> None:  # pragma: no cover - runs in a child process
    while True:
        task = tasks.get()
        if task is None:
            results.put(("exit", None, None))
            return
        for msg in _inline(task, params):
            results.put(msg)


def _decoded_messages(tasks: List[Tuple[str, str]], params: Dict[str, Any], workers: int
                      ) -> Iterator[Tuple[str, str, Any]]:
    """Messages of every task, from ``workers`` processes (or in-process when 0)."""
    if workers <= 0 or len(tasks) == 0:
        for t in tasks:
            yield from _inline(t, params)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    n = min(workers, len(tasks))
    task_q = ctx.Queue()
    res_q = ctx.Queue(maxsize=max(2, 2 * n))
    for t in tasks:
        task_q.put(t)
    for _ in range(n):
        task_q.put(None)
    procs = [ctx.Process(target=_worker_main, args=(task_q, res_q, params), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    exited = 0
    try:
        while exited < n:
            try:
                msg = res_q.get(timeout=5.0)
            except queue_mod.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead and len(dead) + exited >= n:
                    raise RuntimeError(f"decode worker died (exit code {dead[0].exitcode})")
                continue
            if msg[0] == "exit":
                exited += 1
                continue
            yield msg
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)


def _inline(task: Tuple[str, str], params: Dict[str, Any]) -> Iterator[Tuple[str, str, Any]]:
    """Decode one video as messages: ("info", vid, dict), ("batch", vid, (start, frames))*,
    then ("done", vid, {"decoder"}) or ("error", vid, reason)."""
    vid, path = task
    try:
        info = probe(path)
        _require_video(info)
        yield ("info", vid, info.to_dict())
        used: List[str] = []
        for b in iter_clip_batches(info, params["clip_length"], params["frames_per_clip"], params["size"],
                                   batch_clips=params["batch_clips"], backend=params["decode_backend"],
                                   used_backends=used):
            yield ("batch", vid, (b.start, b.frames))
        yield ("done", vid, {"decoder": "+".join(dict.fromkeys(used))})
    except VideoDecodeError as e:
        yield ("error", vid, e.reason)
    except Exception as e:
        yield ("error", vid, f"{type(e).__name__}: {e}")


# =========================================================================== main entry


def _resolve_backbone(backbone: Any, backbone_config: Optional[Mapping[str, Any]]):
    from lavis_c2f.video.backbones import FeatureBackbone, build_backbone

    if isinstance(backbone, FeatureBackbone):
        if backbone_config:
            raise ConfigError("backbone_config is only used when the backbone is given by name")
        return backbone
    return build_backbone(str(backbone), config=backbone_config)


def _read_marker(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def extract_corpus(video_dir: PathLike, out_dir: PathLike, backbone: Any = "offline", clip_length: float = 2.0,
                   frames_per_clip: int = 1, batch_size: Optional[int] = None, workers: int = 1,
                   store: str = "npz", *, batch_clips: int = 64, decode_backend: str = "auto",
                   backbone_config: Optional[Mapping[str, Any]] = None, videos: Optional[Sequence[PathLike]] = None,
                   size: Any = "auto", progress: bool = True, print_summary: bool = True,
                   wds_maxcount: int = 1000) -> ExtractResult:
    """Extract features of every video under ``video_dir`` into ``out_dir`` (module docstring).

    Args:
        video_dir: folder searched recursively for video files (by extension).
        out_dir: output folder (created; reruns resume).
        backbone: a :class:`~lavis_c2f.video.backbones.FeatureBackbone` or a name
            (``offline`` | ``clip_hf`` | ``clip_lavis`` | ``random``) built with ``backbone_config``.
        clip_length: seconds per clip.
        frames_per_clip: frames sampled per clip (features are averaged over them).
        batch_size: frames per encoder call (None: the backbone's).
        workers: decoding processes (0: decode in this process).
        store: ``npz`` or ``wds``.
        batch_clips: clips decoded per message (memory bound).
        decode_backend: ``auto`` | ``decord`` | ``pyav`` | ``ffmpeg``.
        videos: explicit list of files (instead of listing ``video_dir``; ids are still
            relative to ``video_dir``).
        size: decode size; ``"auto"`` = the backbone's ``decode_size``.
    """
    t0 = time.time()
    if store not in ("npz", "wds"):
        raise ConfigError(f"store must be 'npz' or 'wds', got {store!r}")
    if clip_length <= 0:
        raise ConfigError(f"clip_length must be > 0, got {clip_length}")
    if int(frames_per_clip) < 1:
        raise ConfigError(f"frames_per_clip must be >= 1, got {frames_per_clip}")
    root = os.path.abspath(os.fspath(video_dir))
    paths = [os.path.abspath(os.fspath(p)) for p in videos] if videos is not None else list_videos(root)
    if not paths:
        raise FileNotFoundError(f"no video files found under {root}")
    bb = _resolve_backbone(backbone, backbone_config)
    if batch_size is not None:
        bb.batch_size = int(batch_size)
    desc = bb.describe()
    out = os.path.abspath(os.fspath(out_dir))
    feat_dir = os.path.join(out, FEATURES_DIR)
    done_dir = os.path.join(out, DONE_DIR)
    stage_dir = os.path.join(out, STAGING_DIR)
    os.makedirs(done_dir, exist_ok=True)
    if store == "npz":
        os.makedirs(feat_dir, exist_ok=True)
    else:
        os.makedirs(stage_dir, exist_ok=True)
    params = {"clip_length": float(clip_length), "frames_per_clip": int(frames_per_clip),
              "size": bb.decode_size if size == "auto" else size, "batch_clips": int(batch_clips),
              "decode_backend": decode_backend}
    vids = assign_vids(paths, root)
    wds_keys = _wds_keys(feat_dir) if store == "wds" else set()

    def feature_present(vid: str) -> bool:
        if store == "npz":
            return os.path.isfile(os.path.join(feat_dir, f"{vid}.npz"))
        return vid in wds_keys or os.path.isfile(os.path.join(stage_dir, f"{vid}.npy"))

    rows: Dict[str, Dict[str, Any]] = {}
    summary = DecodeSummary()
    todo: List[Tuple[str, str]] = []
    for p in paths:
        vid = vids[p]
        m = _read_marker(os.path.join(done_dir, f"{vid}.json"))
        try:
            sig = _source_sig(p)
        except OSError:
            sig = None
        if (m is not None and m.get("status") == "ok" and m.get("weights_id") == desc["weights_id"]
                and float(m.get("clip_length", -1)) == float(clip_length)
                and int(m.get("frames_per_clip", -1)) == int(frames_per_clip)
                and m.get("source") == sig and feature_present(vid)):
            rows[vid] = m
            summary.skipped.append(p)
            continue
        todo.append((vid, p))
    if summary.skipped:
        logger.info("%d of %d videos already extracted with %s; skipped", len(summary.skipped), len(paths),
                    desc["weights_id"])

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"extract ({desc['name']})", unit="video")
    pending: Dict[str, Dict[str, Any]] = {}
    n_frames_encoded = 0
    t_encode = 0.0
    path_of = {v: p for v, p in todo}
    try:
        for kind, vid, payload in _decoded_messages(todo, params, int(workers)):
            p = path_of[vid]
            st = pending.setdefault(vid, {"feats": [], "info": None})
            if kind == "info":
                st["info"] = payload
            elif kind == "batch":
                if st.get("failed"):
                    continue
                start, frames = payload
                try:
                    te = time.time()
                    st["feats"].append(bb.encode_clips(frames))
                    t_encode += time.time() - te
                    n_frames_encoded += int(frames.shape[0] * frames.shape[1])
                except Exception as e:  # encoder failure on this video's frames
                    st["failed"] = f"encoding failed: {type(e).__name__}: {e}"
            else:
                pending.pop(vid, None)
                reason = payload if kind == "error" else st.get("failed")
                info = st.get("info") or {}
                row = {"vid": vid, "path": p, "duration": info.get("duration"), "n_clips": None,
                       "fps": info.get("fps"), "backbone": desc["name"], "weights_id": desc["weights_id"],
                       "clip_length": float(clip_length), "frames_per_clip": int(frames_per_clip)}
                if reason is None:
                    try:
                        feats = np.concatenate(st["feats"], axis=0).astype(np.float32)
                        _write_features(feats, vid, store, feat_dir, stage_dir)
                        row.update({"n_clips": int(feats.shape[0]), "status": "ok", "error": None,
                                    "decoder": payload.get("decoder"), "source": _source_sig(p)})
                        _write_marker(row, done_dir)
                        summary.ok.append(p)
                    except (OSError, ValueError) as e:
                        reason = f"cannot write features: {e}"
                if reason is not None:
                    row.update({"status": "failed", "error": reason})
                    summary.failed[p] = reason
                    with_marker = os.path.join(done_dir, f"{vid}.json")
                    if os.path.exists(with_marker):
                        os.remove(with_marker)  # an old result of other settings is stale now
                    logger.warning("%s: %s", p, reason)
                rows[vid] = row
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(failed=len(summary.failed))
    finally:
        if bar is not None:
            bar.close()
    if store == "wds":
        _pack_wds(feat_dir, stage_dir, maxcount=wds_maxcount)
    ordered = [rows[vids[p]] for p in paths if vids[p] in rows]
    _write_index_files(out, ordered, desc, params, store, summary)
    dt = time.time() - t0
    stats = {"frames_encoded": n_frames_encoded, "encode_seconds": round(t_encode, 3),
             "seconds": round(dt, 3)}
    if print_summary:
        print(f"extract: {summary.format()}\nfeatures in {out} ({desc['weights_id']}, {dt:.1f} s)")
    return ExtractResult(out_dir=out, rows=ordered, summary=summary, backbone=desc, seconds=dt, stats=stats)


def _write_features(feats: np.ndarray, vid: str, store: str, feat_dir: str, stage_dir: str) -> None:
    from lavis_c2f.data.features import save_npz_deterministic

    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"features of {vid} have shape {feats.shape}")
    if store == "npz":
        target = os.path.join(feat_dir, f"{vid}.npz")
        with atomic_path(target) as tmp:
            save_npz_deterministic(tmp, {"features": feats})
    else:
        target = os.path.join(stage_dir, f"{vid}.npy")
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, feats, allow_pickle=False)


def _write_marker(row: Dict[str, Any], done_dir: str) -> None:
    write_json(row, os.path.join(done_dir, f"{row['vid']}.json"), indent=None)


def _wds_keys(feat_dir: str) -> set:
    if not os.path.isdir(feat_dir) or not any(n.endswith(".tar") for n in os.listdir(feat_dir)):
        return set()
    from lavis_c2f.data.features import WdsStore

    with WdsStore(feat_dir) as s:
        return set(s.keys())


def _pack_wds(feat_dir: str, stage_dir: str, maxcount: int) -> None:
    """Merge staged ``.npy`` files with the existing shards into a new shard folder."""
    from lavis_c2f.data.features import WdsStore, write_wds_shards

    staged = sorted(n[:-4] for n in os.listdir(stage_dir) if n.endswith(".npy")) if os.path.isdir(stage_dir) else []
    if not staged:
        return
    old = WdsStore(feat_dir) if _wds_keys(feat_dir) else None
    old_keys = [k for k in (old.keys() if old is not None else []) if k not in set(staged)]

    def items() -> Iterator[Tuple[str, np.ndarray]]:
        for k in sorted(old_keys + staged):
            if k in set(staged):
                yield k, np.load(os.path.join(stage_dir, f"{k}.npy"), allow_pickle=False)
            else:
                yield k, old.get(k)  # type: ignore[union-attr]

    parent = os.path.dirname(feat_dir)
    tmp = os.path.join(parent, f".{FEATURES_DIR}.packing")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_wds_shards(items(), os.path.join(tmp, "shard-%06d.tar"), maxcount=maxcount)
    finally:
        if old is not None:
            old.close()
    if os.path.isdir(feat_dir):
        trash = feat_dir + ".old"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(feat_dir, trash)
        os.rename(tmp, feat_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, feat_dir)
    for k in staged:
        os.remove(os.path.join(stage_dir, f"{k}.npy"))


def _write_index_files(out: str, rows: List[Dict[str, Any]], desc: Dict[str, Any], params: Dict[str, Any],
                       store: str, summary: DecodeSummary) -> None:
    """videos.jsonl (every video ever extracted here + this run's failures) and extract.json."""
    done_dir = os.path.join(out, DONE_DIR)
    by_vid: Dict[str, Dict[str, Any]] = {}
    for n in sorted(os.listdir(done_dir)):
        if n.endswith(".json"):
            m = _read_marker(os.path.join(done_dir, n))
            if m is not None and m.get("status") == "ok":
                by_vid[m["vid"]] = m
    for r in rows:
        by_vid[r["vid"]] = r
    write_jsonl([{k: v for k, v in r.items() if k != "source"} for _, r in sorted(by_vid.items())],
                os.path.join(out, "videos.jsonl"))
    backbones = sorted({r.get("weights_id") for r in by_vid.values() if r.get("status") == "ok"})
    if len(backbones) > 1:
        logger.warning("%s holds features of several backbones %s; re-extract or use separate folders", out,
                       backbones)
    write_json({"backbone": desc, "clip_length": params["clip_length"], "frames_per_clip": params["frames_per_clip"],
                "decode_size": params["size"], "store": store, "layout": f"{FEATURES_DIR}/{{vid}}.npz['features']"
                if store == "npz" else f"{FEATURES_DIR}/shard-*.tar ({{vid}}.npy)",
                "videos_ok": sum(1 for r in by_vid.values() if r.get("status") == "ok"),
                "videos_failed": sum(1 for r in by_vid.values() if r.get("status") == "failed"),
                "last_run": summary.to_dict()}, os.path.join(out, "extract.json"))


def read_videos_jsonl(out_dir: PathLike) -> List[Dict[str, Any]]:
    """Rows of ``OUT/videos.jsonl``."""
    from lavis_c2f.common.io import read_jsonl

    return read_jsonl(os.path.join(os.fspath(out_dir), "videos.jsonl"))


def write_query_features(backbone: Any, queries: Iterable[Tuple[Any, str]], out_dir: PathLike) -> List[str]:
    """Encode ``(qid, text)`` pairs into ``OUT/clip_text_features/qid{qid}.npz`` with
    ``last_hidden_state`` (T, Dt) and ``pooler_output`` (D,) (Moment-DETR's text layout);
    returns the written paths."""
    from lavis_c2f.data.features import save_npz_deterministic

    qs = list(queries)
    bb = _resolve_backbone(backbone, None)
    feats = bb.encode_text([t for _, t in qs])
    root = os.path.join(os.fspath(out_dir), "clip_text_features")
    os.makedirs(root, exist_ok=True)
    paths = []
    for (qid, _), tf in zip(qs, feats):
        p = os.path.join(root, f"qid{qid}.npz")
        with atomic_path(p) as tmp:
            save_npz_deterministic(tmp, {"last_hidden_state": tf.tokens, "pooler_output": tf.pooled})
        paths.append(p)
    return paths


# =========================================================================== videos -> index


def index_videos(video_dir: PathLike, out_index: PathLike, backbone: Any = "offline",
                 retriever_checkpoint: Optional[str] = None, *, model_cfg: str = "models/c2f_tmass_default.yaml",
                 features_dir: Optional[PathLike] = None, clip_length: float = 2.0, frames_per_clip: int = 1,
                 workers: int = 1, batch_size: Optional[int] = None, backbone_config: Optional[Mapping[str, Any]] = None,
                 overwrite: bool = False, frame_dtype: str = "float16", index_batch_size: int = 64,
                 progress: bool = True) -> Tuple[ExtractResult, Dict[str, Any]]:
    """Extract features of ``video_dir`` (resumable, into ``features_dir``, default
    ``<out_index>.features``) and build a stage-1 :class:`~lavis_c2f.index.CorpusIndex` at
    ``out_index`` with the T-MASS retriever of ``model_cfg`` (+ ``retriever_checkpoint``).

    The retriever's input widths must equal the backbone's (``video_input_dim`` = ``dim``,
    ``text_input_dim`` = ``dim``); without a checkpoint they are set from the backbone and the
    retriever is untrained (a warning says so: rankings are then only a smoke test). Writes
    ``<out_index>.c2f-video.json`` beside the index with the backbone id, so queries are
    encoded with the same encoder. Returns (extraction result, index info).
    """
    from omegaconf import OmegaConf

    import lavis_c2f.models.retriever  # noqa: F401  (registers c2f_tmass_retriever)
    from lavis_c2f.data.features import NpzDirStore, VideoFeatureLoader
    from lavis_c2f.index.corpus_index import CorpusIndex
    from lavis_c2f.models.checkpoint import load_model_weights
    from lavis_c2f.paths import config_path, resolve_path
    from lavis_c2f.registry_utils import get

    out_index = os.path.abspath(os.fspath(out_index))
    if os.path.exists(out_index) and not overwrite:
        raise FileExistsError(f"{out_index} exists; pass overwrite=True (--overwrite) to replace it")
    bb = _resolve_backbone(backbone, backbone_config)
    feats_out = os.path.abspath(os.fspath(features_dir)) if features_dir else out_index + ".features"
    res = extract_corpus(video_dir, feats_out, bb, clip_length=clip_length, frames_per_clip=frames_per_clip,
                         batch_size=batch_size, workers=workers, store="npz", progress=progress)
    ok = [r for r in res.rows if r.get("status") == "ok"]
    if not ok:
        raise RuntimeError(f"no video of {video_dir} could be extracted; nothing to index")
    try:
        cfg_file = config_path(model_cfg)
    except FileNotFoundError:
        cfg_file = resolve_path(model_cfg)
        if not os.path.isfile(cfg_file):
            raise
    node = OmegaConf.load(cfg_file)
    node = node.model if "model" in node else node
    arch = node.get("arch", "c2f_tmass_retriever")
    cls = get("model", arch)
    if retriever_checkpoint is None:
        node.video_input_dim = int(bb.dim)
        node.text_input_dim = int(bb.dim)
        logger.warning("index_videos: no retriever checkpoint; the T-MASS retriever is UNTRAINED (inputs sized "
                       "to the %s backbone, D=%d): rankings are a smoke test only", bb.name, bb.dim)
    elif int(node.get("video_input_dim", bb.dim)) != bb.dim:
        raise ConfigError(f"{cfg_file}: model.video_input_dim is {node.get('video_input_dim')} but the {bb.name} "
                          f"backbone gives {bb.dim}-d features; use a retriever trained on this backbone")
    model = cls.from_config(node)
    if retriever_checkpoint is not None:
        load_model_weights(model, resolve_path(retriever_checkpoint), strict=True)
    model.eval()
    store = NpzDirStore(os.path.join(feats_out, FEATURES_DIR))
    loader = VideoFeatureLoader([store], normalize=True, max_len=None, use_tef=False)
    vids = [r["vid"] for r in ok]
    durations = {r["vid"]: r.get("duration") for r in ok}
    index = CorpusIndex.for_model(model, frame_dtype=frame_dtype, work_dir=os.path.dirname(out_index))
    index.add_features(vids, loader.load, durations, batch_size=index_batch_size, progress=progress)
    if os.path.exists(out_index) and overwrite:
        shutil.rmtree(out_index) if os.path.isdir(out_index) else os.remove(out_index)
    index.save(out_index)
    info = index.info()
    write_json({"backbone": res.backbone, "features_dir": feats_out, "clip_length": float(clip_length),
                "frames_per_clip": int(frames_per_clip), "model_cfg": cfg_file,
                "backbone_config": {k: v for k, v in dict(backbone_config or {}).items() if k != "device"},
                "retriever_checkpoint": resolve_path(retriever_checkpoint) if retriever_checkpoint else None,
                "videos": len(vids)},
               out_index + ".c2f-video.json")
    loader.close()
    return res, info
