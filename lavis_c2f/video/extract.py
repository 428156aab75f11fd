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

Across processes (``python -m torch.distributed.run --nproc_per_node N -m lavis_c2f.cli extract
...``, on one or several nodes; the process group started by the caller,
:func:`lavis_c2f.common.dist.init_from_env`): rank ``r`` of ``w`` extracts every ``w``-th video
of the sorted list from position ``r``, and writes their features and done markers itself
(each video's files are its own, so ranks never write the same file); the ranks then gather
what each did, and rank 0 writes ``videos.jsonl`` and ``extract.json`` (and packs the ``wds``
shards) as one process would have. The output equals a one-process run's, and an interrupted
sharded run resumes like any other (with any process count: the done markers are per video).

Decoding runs in ``workers`` processes (0: in the main process), overlapped with encoding in
the main process; memory is bounded by ``batch_clips`` clips per message and a queue of
``2 * workers`` messages.

Errors of one video (unreadable, truncated, audio-only, ...) are recorded and the run goes
on; the summary is printed at the end. :func:`extract_corpus` returns an
:class:`ExtractResult`; the CLI exits with 0 when at least one video has features (new or
from an earlier run), 1 otherwise.
"""
from __future__ import annotations

import hashlib
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

from lavis_c2f.common import dist as c2f_dist
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.io import atomic_path, read_jsonl, write_json, write_jsonl
from lavis_c2f.common.progress import progress_bar
from lavis_c2f.data.cfg import yaml_defaults
from lavis_c2f.data.features import WdsStore, save_npz_deterministic, write_wds_shards
from lavis_c2f.video.backbones import resolve_backbone
from lavis_c2f.video.decode import VideoDecodeError, iter_clip_batches
from lavis_c2f.video.probe import DecodeSummary, list_videos, probe, require_video

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
#: defaults of extraction (clip sampling included): lavis_c2f/configs/video/extract.yaml
EXTRACT_DEFAULTS = yaml_defaults("video/extract.yaml", "extract")
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
        require_video(info)
        yield ("info", vid, info.to_dict())
        used: List[str] = []
        offsets = params["sampler"].offsets(params["clip_length"], info.fps)  # the backbone's frames per clip
        for b in iter_clip_batches(info, params["clip_length"], params["frames_per_clip"], params["size"],
                                   batch_clips=params["batch_clips"], backend=params["decode_backend"],
                                   used_backends=used, offsets=offsets):
            yield ("batch", vid, (b.start, b.frames))
        yield ("done", vid, {"decoder": "+".join(dict.fromkeys(used))})
    except VideoDecodeError as e:
        yield ("error", vid, e.reason)
    except Exception as e:
        yield ("error", vid, f"{type(e).__name__}: {e}")


# =========================================================================== main entry


def _read_marker(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def extract_corpus(video_dir: PathLike, out_dir: PathLike, backbone: Any = EXTRACT_DEFAULTS["backbone"],
                   clip_length: float = EXTRACT_DEFAULTS["clip_length"],
                   frames_per_clip: int = EXTRACT_DEFAULTS["frames_per_clip"], batch_size: Optional[int] = None,
                   workers: int = EXTRACT_DEFAULTS["workers"], store: str = EXTRACT_DEFAULTS["store"], *,
                   batch_clips: int = EXTRACT_DEFAULTS["batch_clips"],
                   decode_backend: str = EXTRACT_DEFAULTS["decode_backend"],
                   backbone_config: Optional[Mapping[str, Any]] = None, videos: Optional[Sequence[PathLike]] = None,
                   size: Any = "auto", progress: bool = True, print_summary: bool = True,
                   wds_maxcount: int = 1000) -> ExtractResult:
    """Extract features of every video under ``video_dir`` into ``out_dir`` (module docstring).

    Args:
        video_dir: folder searched recursively for video files (by extension).
        out_dir: output folder (created; reruns resume).
        backbone: a :class:`~lavis_c2f.video.backbones.FeatureBackbone` or a name
            (``offline`` | ``clip_hf`` | ``clip_lavis`` | ``random`` | ``slowfast``, or several
            joined by ``+`` such as ``slowfast+clip_hf``) built with ``backbone_config``.
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
    bb = resolve_backbone(backbone, backbone_config)
    if batch_size is not None:
        bb.batch_size = int(batch_size)
    params = {"clip_length": float(clip_length), "frames_per_clip": int(frames_per_clip),
              "size": bb.decode_size if size == "auto" else size, "batch_clips": int(batch_clips),
              "decode_backend": decode_backend, "sampler": bb.sampler(int(frames_per_clip))}
    run = _Extraction(os.path.abspath(os.fspath(out_dir)), store, bb, params)
    vids = assign_vids(paths, root)            # over the whole list: every rank names the videos alike
    rank, world = c2f_dist.get_rank(), c2f_dist.get_world_size()
    if world > 1 and len({*c2f_dist.all_gather_objects(hashlib.sha1("\n".join(paths).encode()).hexdigest())}) > 1:
        raise ConfigError(f"the ranks see different video lists under {root}: put the videos on a filesystem every "
                          "node sees at the same path")
    todo = run.plan(c2f_dist.rank_items(paths), vids)
    run.encode(todo, int(workers), progress)
    if world > 1:
        run.merge(c2f_dist.all_gather_objects(run.state()), paths)
    if rank == 0:
        if store == "wds":
            _pack_wds(run.feat_dir, run.stage_dir, maxcount=wds_maxcount)
        _write_index_files(run.out, [run.rows[vids[p]] for p in paths if vids[p] in run.rows], run.desc, params,
                           store, run.summary)
    c2f_dist.barrier()                         # the others return once rank 0 has written the listing
    ordered = [run.rows[vids[p]] for p in paths if vids[p] in run.rows]
    dt = time.time() - t0
    stats = {"frames_encoded": run.frames_encoded, "encode_seconds": round(run.encode_seconds, 3),
             "seconds": round(dt, 3)}
    if print_summary and rank == 0:
        print(f"extract: {run.summary.format()}\nfeatures in {run.out} ({run.desc['weights_id']}, {dt:.1f} s)")
    return ExtractResult(out_dir=run.out, rows=ordered, summary=run.summary, backbone=run.desc, seconds=dt,
                         stats=stats)


class _Extraction:
    """One run of :func:`extract_corpus`: the output folder's layout, the backbone, and what
    happened to each video (``rows`` by vid, ``summary``, encoding counters)."""

    def __init__(self, out: str, store: str, backbone: Any, params: Dict[str, Any]):
        self.out, self.store, self.bb, self.params = out, store, backbone, params
        self.desc = backbone.describe()
        self.feat_dir = os.path.join(out, FEATURES_DIR)
        self.done_dir = os.path.join(out, DONE_DIR)
        self.stage_dir = os.path.join(out, STAGING_DIR)
        os.makedirs(self.done_dir, exist_ok=True)
        os.makedirs(self.feat_dir if store == "npz" else self.stage_dir, exist_ok=True)
        self.wds_keys = _wds_keys(self.feat_dir) if store == "wds" else set()
        self.rows: Dict[str, Dict[str, Any]] = {}
        self.summary = DecodeSummary()
        self.frames_encoded = 0
        self.encode_seconds = 0.0

    def state(self) -> Dict[str, Any]:
        """What this process did (rows, summary, counters): gathered from every rank."""
        return {"rows": self.rows, "summary": self.summary.to_dict(), "frames": self.frames_encoded,
                "encode_seconds": self.encode_seconds}

    def merge(self, states: Sequence[Mapping[str, Any]], paths: Sequence[str]) -> None:
        """Take the :meth:`state` of every rank: the rows and counters of all, and the summary
        in input order (what one process would have reported)."""
        status: Dict[str, Tuple[str, Optional[str]]] = {}
        self.rows, self.frames_encoded, self.encode_seconds = {}, 0, 0.0
        for st in states:
            self.rows.update(st["rows"])
            self.frames_encoded += int(st["frames"])
            self.encode_seconds += float(st["encode_seconds"])
            summ = st["summary"]
            status.update({p: ("ok", None) for p in summ["ok"]})
            status.update({p: ("skipped", None) for p in summ["skipped"]})
            status.update({p: ("failed", r) for p, r in summ["failed"].items()})
        self.summary = DecodeSummary()
        for p in paths:
            kind, reason = status.get(p, (None, None))
            if kind == "failed":
                self.summary.failed[p] = str(reason)
            elif kind is not None:
                getattr(self.summary, kind).append(p)

    def feature_present(self, vid: str) -> bool:
        if self.store == "npz":
            return os.path.isfile(os.path.join(self.feat_dir, f"{vid}.npz"))
        return vid in self.wds_keys or os.path.isfile(os.path.join(self.stage_dir, f"{vid}.npy"))

    def plan(self, paths: Sequence[str], vids: Mapping[str, str]) -> List[Tuple[str, str]]:
        """``(vid, path)`` of the videos to extract; finished ones (same encoder, sampling and
        source file, features present) are kept as they are and counted as skipped."""
        todo: List[Tuple[str, str]] = []
        for p in paths:
            vid = vids[p]
            m = _read_marker(os.path.join(self.done_dir, f"{vid}.json"))
            try:
                sig = _source_sig(p)
            except OSError:
                sig = None
            if (m is not None and m.get("status") == "ok" and m.get("weights_id") == self.desc["weights_id"]
                    and float(m.get("clip_length", -1)) == self.params["clip_length"]
                    and int(m.get("frames_per_clip", -1)) == self.params["frames_per_clip"]
                    and m.get("source") == sig and self.feature_present(vid)):
                self.rows[vid] = m
                self.summary.skipped.append(p)
                continue
            todo.append((vid, p))
        if self.summary.skipped:
            logger.info("%d of %d videos already extracted with %s; skipped", len(self.summary.skipped), len(paths),
                        self.desc["weights_id"])
        return todo

    def encode(self, todo: List[Tuple[str, str]], workers: int, progress: bool) -> None:
        """Decode ``todo`` (in ``workers`` processes) and encode the clips here, writing each
        video's features and done marker as soon as it is finished."""
        world = c2f_dist.get_world_size()
        where = f" rank {c2f_dist.get_rank()}/{world}" if world > 1 else ""
        bar = (progress_bar(total=len(todo), desc=f"extract ({self.desc['name']}){where}", unit="video", leave=True)
               if progress and todo else None)
        pending: Dict[str, Dict[str, Any]] = {}
        path_of = {v: p for v, p in todo}
        try:
            for kind, vid, payload in _decoded_messages(todo, self.params, workers):
                st = pending.setdefault(vid, {"feats": [], "info": None})
                if kind == "info":
                    st["info"] = payload
                elif kind == "batch":
                    if not st.get("failed"):
                        self._encode_batch(st, payload[1])
                else:
                    pending.pop(vid, None)
                    self._finish(vid, path_of[vid], st, payload if kind == "error" else st.get("failed"),
                                 payload if kind == "done" else {})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(failed=len(self.summary.failed), refresh=False)
        finally:
            if bar is not None:
                bar.close()

    def _encode_batch(self, st: Dict[str, Any], frames: np.ndarray) -> None:
        try:
            te = time.time()
            st["feats"].append(self.bb.encode_clips(frames))
            self.encode_seconds += time.time() - te
            self.frames_encoded += int(frames.shape[0] * frames.shape[1])
        except Exception as e:  # encoder failure on this video's frames
            st["failed"] = f"encoding failed: {type(e).__name__}: {e}"

    def _finish(self, vid: str, path: str, st: Dict[str, Any], reason: Optional[str], done: Mapping[str, Any]
                ) -> None:
        """Write a finished video's features and marker (or record why it failed)."""
        info = st.get("info") or {}
        row = {"vid": vid, "path": path, "duration": info.get("duration"), "n_clips": None,
               "fps": info.get("fps"), "backbone": self.desc["name"], "weights_id": self.desc["weights_id"],
               "clip_length": self.params["clip_length"], "frames_per_clip": self.params["frames_per_clip"]}
        if reason is None:
            try:
                feats = np.concatenate(st["feats"], axis=0).astype(np.float32)
                _write_features(feats, vid, self.store, self.feat_dir, self.stage_dir)
                row.update({"n_clips": int(feats.shape[0]), "status": "ok", "error": None,
                            "decoder": done.get("decoder"), "source": _source_sig(path)})
                _write_marker(row, self.done_dir)
                self.summary.ok.append(path)
            except (OSError, ValueError) as e:
                reason = f"cannot write features: {e}"
        if reason is not None:
            row.update({"status": "failed", "error": reason})
            self.summary.failed[path] = reason
            marker = os.path.join(self.done_dir, f"{vid}.json")
            if os.path.exists(marker):
                os.remove(marker)  # an old result of other settings is stale now
            logger.warning("%s: %s", path, reason)
        self.rows[vid] = row


def _write_features(feats: np.ndarray, vid: str, store: str, feat_dir: str, stage_dir: str) -> None:
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
    with WdsStore(feat_dir) as s:
        return set(s.keys())


def _pack_wds(feat_dir: str, stage_dir: str, maxcount: int) -> None:
    """Merge staged ``.npy`` files with the existing shards into a new shard folder."""
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
    return read_jsonl(os.path.join(os.fspath(out_dir), "videos.jsonl"))


def write_query_features(backbone: Any, queries: Iterable[Tuple[Any, str]], out_dir: PathLike) -> List[str]:
    """Encode ``(qid, text)`` pairs into ``OUT/clip_text_features/qid{qid}.npz`` with
    ``last_hidden_state`` (T, Dt) and ``pooler_output`` (D,) (Moment-DETR's text layout);
    returns the written paths."""
    qs = list(queries)
    bb = resolve_backbone(backbone)
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
