"""Stage 3 inside the corpus pipeline: the ``run.refine`` switch of ``c2f_corpus_moment_retrieval``.

After stage 2 has grounded a query in its top-K retrieved videos, the windows of the
``top_videos`` best videos of the fused list (:func:`lavis_c2f.pipeline.fusion.fuse_candidates`
with the task's fusion) are refined one (query, video) pair at a time by
:class:`lavis_c2f.models.refiner.hook.CaptionRefiner`, and the refined windows replace the
stage-2 ones before the final fusion and ranking. Refinement is per query, so the result does
not depend on the number of processes.

``run.refine`` keys (:class:`RefineOptions`; unknown keys raise :class:`ConfigError`)::

    enabled: false          # the switch; off = lavis_c2f.models.refiner is never imported
    config: null            # the refiner: a mapping of CaptionRefiner.from_config keys (model,
                            # checkpoint, sampler, video_fps, video_ext, captions_dir, device,
                            # cache_videos) or a YAML file holding them (optionally under a
                            # 'refiner:' node; a model YAML with a 'model:' node also works)
    top_videos: 3           # videos refined per query: the best of the fused list
    gt_video: true          # also refine the GT video of labelled queries (single-video and
                            # oracle metrics then measure stage 2 + 3; reused when it is among
                            # the top videos)
    splits: null            # refine only these splits (null: every evaluated split)
    frame_source: video     # where frames come from: video | folder | feature_image
    video_root: null        # video: files <video_root>/<vid><video_ext> (decoded by the refiner
    video_ext: .mp4         #        at its video_fps)
    frames_root: null       # folder: pre-extracted frames <frames_root>/<vid>/*.jpg|png ...
    frames_fps: 1.0         #         written at this rate (frame k at (k + 0.5) / frames_fps s)
    features: null          # feature_image: a feature store (path of an npz folder or a store
                            # mapping); null = the dataset's first video-feature stream. Rows
                            # are drawn as images (the demo corpus has no videos)
    captions_dir: null      # folder of <vid>.srt (speech); null = the refiner config's own

Paths are resolved against the working directory; a relative ``config`` file or refiner
``model:`` YAML that does not exist there is looked up in the checkout
(:data:`lavis_c2f.paths.PROJECT_ROOT`), so ``lavis_c2f/configs/models/...`` works anywhere.
The refiner runs on the evaluation device unless its config names a ``device``.

Per pair: videos without stage-2 windows are not refined (nothing to look around).
A generation that does not parse, or frames that cannot be read (missing video file, broken
image), *fall back*: the pair keeps its stage-2 windows unchanged, the reason is counted
(``empty``, ``no_windows``, ``invalid``, ``frames_unavailable``) and nothing raises. Each
candidate row of a refined query gets a ``refine`` entry::

    {"vids": [vid, ...],                        # refined videos (fused order; + the GT video)
     "stage2_windows": {vid: [[st, ed, s2], ...]},   # their windows before refinement
     "n_refined": int, "n_fallback": int, "n_dropped_windows": int,
     "fallback_reasons": {reason: count}}

:func:`refine_counts` sums them (the task's ``refine_*`` metrics and its summary line).

This module does not import the refiner (BLIP-2) at import time; :meth:`CorpusRefiner.build`
and :func:`build_caption_refiner` do, when the switch is on. The coarse-to-fine engine
(:mod:`lavis_c2f.pipeline.engine`) calls :meth:`CorpusRefiner.refine_query` for every caller:
the corpus task, and the searches of :class:`lavis_c2f.predictor.C2FPredictor`
(:meth:`CorpusRefiner.for_videos`, frames from the indexed video files).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.data.cfg import check_keys, to_plain
from lavis_c2f.models.checkpoint import find_yaml, model_node_from
from lavis_c2f.pipeline.fusion import fuse_candidates
from lavis_c2f.paths import resolve_path

logger = logging.getLogger(__name__)

FRAME_SOURCES = ("video", "folder", "feature_image")
FALLBACK_FRAMES = "frames_unavailable"


# =========================================================================== options
@dataclass(frozen=True)
class RefineOptions:
    """The ``run.refine`` block (module docstring)."""

    enabled: bool = False
    config: Any = None
    top_videos: int = 3
    gt_video: bool = True
    splits: Optional[Tuple[str, ...]] = None
    frame_source: str = "video"
    video_root: Optional[str] = None
    video_ext: str = ".mp4"
    frames_root: Optional[str] = None
    frames_fps: float = 1.0
    features: Any = None
    captions_dir: Optional[str] = None

    @classmethod
    def from_mapping(cls, cfg: Any, where: str = "run.refine") -> "RefineOptions":
        """Validate a ``run.refine`` mapping (None = off). Types are always checked; when
        ``enabled``, the config must be given and the frame source's folder must exist."""
        d = check_keys(cfg, {f.name for f in fields(cls)}, where)
        if not isinstance(d.get("enabled", False), bool):
            raise ConfigError(f"{where}.enabled: expected true/false, got {d['enabled']!r}")
        if not isinstance(d.get("gt_video", True), bool):
            raise ConfigError(f"{where}.gt_video: expected true/false, got {d['gt_video']!r}")
        top = d.get("top_videos", 3)
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ConfigError(f"{where}.top_videos: expected a positive integer, got {top!r}")
        fps = d.get("frames_fps", 1.0)
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise ConfigError(f"{where}.frames_fps: expected a positive number, got {fps!r}")
        d["frames_fps"] = float(fps)
        kind = d.get("frame_source", "video")
        if kind not in FRAME_SOURCES:
            raise ConfigError(f"{where}.frame_source: expected one of {list(FRAME_SOURCES)}, got {kind!r}")
        splits = d.get("splits")
        if splits is not None:
            if isinstance(splits, str):
                splits = [splits]
            if not isinstance(splits, (list, tuple)) or not all(isinstance(s, str) for s in splits):
                raise ConfigError(f"{where}.splits: expected a list of split names or null, got {splits!r}")
            d["splits"] = tuple(splits)
        for key in ("video_root", "frames_root", "captions_dir"):
            v = d.get(key)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise ConfigError(f"{where}.{key}: expected a path or null, got {v!r}")
            if v in ("",):
                d[key] = None
        ext = d.get("video_ext", ".mp4")
        if not isinstance(ext, str):
            raise ConfigError(f"{where}.video_ext: expected a string such as .mp4, got {ext!r}")
        conf = d.get("config")
        if conf is not None and not isinstance(conf, (str, os.PathLike, Mapping)):
            raise ConfigError(f"{where}.config: expected a refiner YAML path or mapping, got {conf!r}")
        feats = d.get("features")
        if feats is not None and not isinstance(feats, (str, os.PathLike, Mapping)):
            raise ConfigError(f"{where}.features: expected a feature-store path or mapping, got {feats!r}")
        opts = cls(**d)
        if opts.enabled:
            opts.check_paths(where)
        return opts

    def check_paths(self, where: str = "run.refine") -> None:
        """Errors an enabled refinement would otherwise meet only after stage 2."""
        if self.config in (None, ""):
            raise ConfigError(f"{where}.config: missing (the refiner: a YAML path or a mapping of "
                              "CaptionRefiner.from_config keys)")
        need = {"video": "video_root", "folder": "frames_root"}.get(self.frame_source)
        if need is not None:
            root = getattr(self, need)
            if not root:
                raise ConfigError(f"{where}.{need}: missing (frame_source: {self.frame_source})")
            if not os.path.isdir(resolve_path(root)):
                raise ConfigError(f"{where}.{need}: folder not found: {resolve_path(root)}")
        if self.captions_dir and not os.path.isdir(resolve_path(self.captions_dir)):
            raise ConfigError(f"{where}.captions_dir: folder not found: {resolve_path(self.captions_dir)}")

    def applies_to(self, split: Optional[str]) -> bool:
        """Whether evaluation of ``split`` refines (enabled and the split selected)."""
        return self.enabled and (self.splits is None or split in self.splits)

    def describe(self) -> Dict[str, Any]:
        """JSON-able summary for the metrics report (the refiner config by name only)."""
        conf = self.config if isinstance(self.config, (str, os.PathLike)) else "mapping"
        return {"enabled": self.enabled, "config": str(conf) if conf is not None else None,
                "top_videos": self.top_videos, "gt_video": self.gt_video,
                "splits": list(self.splits) if self.splits is not None else None,
                "frame_source": self.frame_source}


def load_refiner_config(config: Any, where: str = "run.refine.config") -> Dict[str, Any]:
    """The refiner's :meth:`CaptionRefiner.from_config` mapping from ``config`` (a mapping, or a
    YAML file whose ``refiner:`` node, or whole content, holds it; found as every YAML is,
    :func:`~lavis_c2f.models.checkpoint.find_yaml`). A relative ``model:`` YAML path is resolved
    against the working directory, the config file's folder, then the checkout."""
    config = to_plain(config)
    if not isinstance(config, (str, os.PathLike, Mapping)):
        raise ConfigError(f"{where}: expected a refiner YAML path or mapping, got {config!r}")
    node, path = model_node_from(config, where, key="refiner")
    model = node.get("model")
    if isinstance(model, (str, os.PathLike)):
        with contextlib.suppress(ConfigError):     # left as given: the refiner reports it
            node["model"] = find_yaml(model, f"{where}.model", base=os.path.dirname(path) if path else None)
    return node


def check_refiner_config(config: Any, where: str = "run.refine.config") -> Dict[str, Any]:
    """:func:`load_refiner_config` + the hook's key check (imports the refiner package)."""
    from lavis_c2f.models.refiner.hook import HOOK_KEYS

    d = load_refiner_config(config, where)
    check_keys(d, HOOK_KEYS, where)
    if "model" not in d:
        raise ConfigError(f"{where}.model: missing (a model mapping or a model YAML path)")
    return d


def build_caption_refiner(config: Any, device: Any = None, where: str = "run.refine.config"):
    """A :class:`~lavis_c2f.models.refiner.hook.CaptionRefiner` from its config
    (:func:`check_refiner_config`), on ``device`` unless the config names one. Imports the
    refiner package (BLIP-2): call it only when stage 3 is on."""
    from lavis_c2f.models.refiner.hook import CaptionRefiner

    cfg = check_refiner_config(config, where)
    if cfg.get("device") in (None, "", "auto") and device is not None:
        cfg["device"] = str(device)
    return CaptionRefiner.from_config(cfg)


# =========================================================================== counters
def _new_counts() -> Dict[str, Any]:
    return {"n_refined": 0, "n_fallback": 0, "n_dropped_windows": 0, "fallback_reasons": {}}


def _add_counts(total: Dict[str, Any], part: Mapping[str, Any]) -> None:
    for key in ("n_refined", "n_fallback", "n_dropped_windows"):
        total[key] += int(part.get(key, 0))
    reasons = Counter(total["fallback_reasons"])
    reasons.update({str(k): int(v) for k, v in (part.get("fallback_reasons") or {}).items()})
    total["fallback_reasons"] = dict(sorted(reasons.items()))


def refine_counts(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Sum of the rows' ``refine`` entries: ``{n_queries, n_pairs, n_refined, n_fallback,
    n_dropped_windows, fallback_reasons}`` (``n_queries``: rows that went through stage 3)."""
    total = _new_counts()
    n_queries = 0
    for r in rows:
        info = r.get("refine")
        if not info:
            continue
        n_queries += 1
        _add_counts(total, info)
    total["n_pairs"] = total["n_refined"] + total["n_fallback"]
    total["n_queries"] = n_queries
    return total


def flat_refine_metrics(counts: Mapping[str, Any]) -> Dict[str, int]:
    """``refine_n_refined``, ``refine_n_fallback``, ``refine_n_dropped_windows``,
    ``refine_n_pairs`` and ``refine_fallback_<reason>`` (numbers for the metrics dict)."""
    out = {f"refine_{k}": int(counts[k]) for k in ("n_refined", "n_fallback", "n_dropped_windows", "n_pairs")}
    out.update({f"refine_fallback_{k}": int(v) for k, v in counts["fallback_reasons"].items()})
    return out


def summary_line(counts: Mapping[str, Any], split: Optional[str] = None) -> str:
    """One log line, e.g. ``stage 3 (val): 3/42 (query, video) pairs refined, 39 fell back to
    stage 2 (no_windows=39), 0 invalid windows dropped, 14 queries``."""
    reasons = ", ".join(f"{k}={v}" for k, v in counts["fallback_reasons"].items())
    where = f" ({split})" if split else ""
    return (f"stage 3{where}: {counts['n_refined']}/{counts['n_pairs']} (query, video) pairs refined, "
            f"{counts['n_fallback']} fell back to stage 2" + (f" ({reasons})" if reasons else "")
            + f", {counts['n_dropped_windows']} invalid windows dropped, {counts['n_queries']} queries")


# =========================================================================== refiner
class CorpusRefiner:
    """Stage 3 of the corpus task: a :class:`CaptionRefiner` + the frame source of the options.

    Args:
        options: the validated ``run.refine`` block.
        refiner: a ``CaptionRefiner`` (its ``refine``, and its ``stats`` when it has them, are used).
        frames: a ``FrameSource`` for ``folder`` / ``feature_image`` (None for ``video``).
        videos: ``vid -> (video file, captions)`` for ``video`` when the files are not under
            ``video_root`` (the videos of an index: :meth:`for_videos`).
    """

    def __init__(self, options: RefineOptions, refiner: Any, frames: Any = None,
                 videos: Optional[Callable[[str], Tuple[str, Any]]] = None):
        self.options = options
        self.refiner = refiner
        self.frames = frames
        self.videos = videos
        self.video_root = resolve_path(options.video_root) if options.video_root else None
        self.captions_dir = resolve_path(options.captions_dir) if options.captions_dir else None

    @classmethod
    def for_videos(cls, refiner: Any, top_videos: int, videos: Callable[[str], Tuple[str, Any]]) -> "CorpusRefiner":
        """Stage 3 of a search: the windows of the ``top_videos`` best videos of each query,
        frames decoded from ``videos(vid) -> (video file, captions)``; no GT video."""
        return cls(RefineOptions(enabled=True, top_videos=int(top_videos), gt_video=False), refiner, videos=videos)

    @classmethod
    def build(cls, options: RefineOptions, dataset: Any = None, device: Any = None) -> "CorpusRefiner":
        """Build the refiner of ``options.config`` on ``device`` (unless the config names one) and
        the frame source (``feature_image`` defaults to ``dataset.video_stores[0]`` and
        ``dataset.clip_length``)."""
        from lavis_c2f.models.refiner.data import FeatureImageFrameSource, FolderFrameSource

        options.check_paths()
        refiner = build_caption_refiner(options.config, device)
        frames = None
        if options.frame_source == "folder":
            frames = FolderFrameSource(resolve_path(options.frames_root), fps=options.frames_fps)
        elif options.frame_source == "feature_image":
            store = options.features
            if store is None:
                stores = getattr(dataset, "video_stores", None)
                if not stores:
                    raise ConfigError("run.refine.features: missing, and the dataset has no video-feature store")
                store = stores[0]
            elif isinstance(store, (str, os.PathLike)):
                store = {"type": "npz", "path": resolve_path(store), "field": "features"}
            clip_length = getattr(dataset, "clip_length", None)
            if not clip_length:
                raise ConfigError("run.refine.frame_source: feature_image needs the dataset's clip_length")
            frames = FeatureImageFrameSource(store, clip_length=float(clip_length),
                                             image_size=refiner.image_size)
        return cls(options, refiner, frames)

    # ------------------------------------------------------------------ one pair
    def _stats(self) -> Tuple[int, int, int, Counter]:
        s = getattr(self.refiner, "stats", None)
        if s is None:                  # a duck-typed refiner without counters
            return 0, 0, 0, Counter()
        return s.n_refined, s.n_fallback, s.n_dropped_windows, Counter(s.fallback_reasons)

    def _captions(self, vid: str) -> Any:
        if self.captions_dir is None:
            return None            # the refiner config's captions_dir (if any)
        path = os.path.join(self.captions_dir, f"{vid}.srt")
        return path if os.path.isfile(path) else []

    def refine_pair(self, query: str, vid: str, duration: float, windows: Sequence[Sequence[float]],
                    items: Optional[Sequence[str]] = None, video_path: Optional[str] = None, captions: Any = None
                    ) -> Tuple[List[List[float]], Dict[str, Any]]:
        """Refined windows ``[[st, ed, score], ...]`` (seconds) of one (query, video) pair and the
        pair's counters (``n_refined``, ``n_fallback``, ``n_dropped_windows``,
        ``fallback_reasons``). A fallback returns ``windows`` unchanged. ``items``: the query's
        items (CALCE), when its record carries them. ``video_path`` (with its ``captions``) names
        the video file instead of the frame source of the options."""
        stage2 = [[float(x) for x in w[:3]] for w in windows]
        if self.frames is None and video_path is None:
            if self.videos is not None:
                video_path, captions = self.videos(vid)
            else:
                video_path = os.path.join(self.video_root, f"{vid}{self.options.video_ext}")
                captions = self._captions(vid)
        before = self._stats()
        if self.frames is None:
            out = self.refiner.refine(query, float(duration), stage2, video_path=video_path, captions=captions,
                                      vid=vid, items=items)
        else:
            from lavis_c2f.models.refiner.prompt import refine_region

            smp = self.refiner.sampler
            region = refine_region(stage2, float(duration), smp.margin_s, smp.margin_ratio, smp.n_ref_windows)
            try:      # CALCE: its frames of the whole video; else the region's candidates
                if getattr(self.refiner, "calce", False):
                    raw, times = self.frames.calce_frames(vid, self.refiner.n_frms)
                else:
                    raw, times = self.frames.frames_in(vid, region[0], region[1], smp.n_candidates)
            except (DataFormatError, OSError, RuntimeError, KeyError) as e:
                logger.warning("stage 3: frames of %s unavailable (%s); keeping stage-2 windows", vid, e)
                self.refiner.stats.record_fallback(FALLBACK_FRAMES)
                out = None
            else:
                out = self.refiner.refine(query, float(duration), stage2, frames=raw, timestamps=times,
                                          captions=self._captions(vid), vid=vid, items=items)
        after = self._stats()
        counts = {"n_refined": after[0] - before[0], "n_fallback": after[1] - before[1],
                  "n_dropped_windows": after[2] - before[2],
                  "fallback_reasons": dict(sorted((after[3] - before[3]).items()))}
        if out is None or counts["n_fallback"]:
            return [list(w) for w in stage2], counts
        return [[float(w[0]), float(w[1]), float(w[2])] for w in out], counts

    # ------------------------------------------------------------------ one query
    def refine_query(self, query: str, candidates: Sequence[Sequence[Any]], durations: Mapping[str, float],
                     fusion: Any, gt_vid: Optional[str] = None, gt_windows: Optional[List[List[float]]] = None,
                     items: Optional[Sequence[str]] = None
                     ) -> Tuple[List[List[Any]], Optional[List[List[float]]], Dict[str, Any]]:
        """Refine one query's candidates.

        Args:
            query: text.
            candidates: ``[[vid, s1, [[st, ed, s2], ...]], ...]`` in stage-1 order.
            durations: seconds of each candidate (and GT) video, as stage 2 used them.
            fusion: the task's :class:`~lavis_c2f.pipeline.fusion.FusionConfig` (picks the videos).
            gt_vid, gt_windows: the GT video and its stage-2 windows (None: unlabelled).
            items: the query's items (CALCE; None when the annotations have none).
        Returns:
            ``(candidates with refined windows, GT windows (refined when gt_video), refine entry)``.
        """
        fused = fuse_candidates(candidates, fusion)
        top = list(dict.fromkeys(m[0] for m in fused))[: self.options.top_videos]
        refined: Dict[str, List[List[float]]] = {}
        stage2: Dict[str, List[List[float]]] = {}
        total = _new_counts()
        by_vid = {str(c[0]): c for c in candidates}
        for vid in top:
            windows = by_vid[vid][2]
            if not windows:
                continue
            refined[vid], counts = self.refine_pair(query, vid, durations[vid], windows, items)
            stage2[vid] = [list(w) for w in windows]
            _add_counts(total, counts)
        if self.options.gt_video and gt_vid is not None and gt_windows and gt_vid not in refined:
            refined[gt_vid], counts = self.refine_pair(query, gt_vid, durations[gt_vid], gt_windows, items)
            stage2[gt_vid] = [list(w) for w in gt_windows]
            _add_counts(total, counts)
        out = [[c[0], c[1], refined.get(str(c[0]), c[2])] for c in candidates]
        if self.options.gt_video and gt_vid in refined and gt_windows is not None:
            gt_windows = refined[gt_vid]
        info = {"vids": list(refined), "stage2_windows": stage2, **total}
        return out, gt_windows, info
