"""Pipeline hook: :class:`CaptionRefiner` refines stage-2 windows of one query at a time.

Usage (the pipeline imports this only when the refiner is switched on)::

    from lavis_c2f.models.refiner.hook import CaptionRefiner

    refiner = CaptionRefiner.from_config({"model": {...} or "path/to/model.yaml",
                                          "checkpoint": "refiner.pth", "items": "none",
                                          "video_fps": 1.0, "captions_dir": "srts", "device": "cuda"})
    windows = refiner.refine(query, duration=150.0, stage2_windows=[[10, 24, 0.8], ...],
                             video_path="videos/abc.mp4", items=["man", "boots"])
    print(refiner.stats.summary())      # "refiner: 9/10 refined, 1 fell back to stage 2 (...)"

A ``calce`` model goes through the one public CALCE path (:func:`build_calce_inputs`,
:func:`calce_generate`, :func:`calce_post_process`): ``n_frms`` frames of the whole video by
CALCE's head sampling (decord for video files), the video's ``.srt`` text, the query's
``items`` (``items: required``, the default, makes a call without items an error;
``items: none`` writes the explicit no-items prompt), and for a stage-2 model the best
``sampler.n_ref_windows`` stage-2 windows as coarse windows (integer seconds; the whole video
when there are none). The global RNG is seeded with ``sampler.seed`` before each query, so
DPC-KNN results are reproducible. An ``interleaved`` model looks at the k-means key frames of
the search region around the stage-2 windows (:func:`build_sample`).

``refine`` never raises because of the model's output: a generation that does not parse falls
back to the stage-2 windows (counted in :attr:`CaptionRefiner.stats`). Frames that cannot be
read (missing or broken video) also fall back (reason ``frames_unavailable``, logged). Bad
arguments (no frames and no video, a non-positive duration) raise ``ValueError``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.models.checkpoint import model_node
from lavis_c2f.models.refiner.calce import build_calce_inputs, calce_generate_output
from lavis_c2f.models.refiner.calce_text import calce_windows, read_srt_text
from lavis_c2f.models.refiner.data import (ArrayFrameSource, FrameProcessor, SamplerConfig,
                                           VideoFileFrameSource, build_sample, collate_refiner)
from lavis_c2f.models.refiner.parsing import RefineStats
from lavis_c2f.models.refiner.prompt import refine_region
from lavis_c2f.models.refiner.srt import Caption, load_captions
from lavis_c2f.paths import resolve_path
from lavis_c2f.registry_utils import get as registry_get
from lavis_c2f.video.captions import format_srt

logger = logging.getLogger(__name__)

HOOK_KEYS = {"model", "checkpoint", "sampler", "video_fps", "video_ext", "captions_dir", "device",
             "cache_videos", "items", "n_frms"}
ITEMS_MODES = ("required", "none")


class CaptionRefiner:
    """Refine stage-2 windows with a :class:`C2FCaptionRefiner` (see module doc).

    Args:
        model: the refiner model (put in eval mode here).
        sampler: region / key-frame settings (CALCE: ``n_ref_windows`` coarse windows, ``seed``).
        items: ``required`` or ``none`` (CALCE; module doc).
        n_frms: CALCE frames per video (default: 75 for stage 1, 150 for stage 2).
        video_fps: decoding rate of ``video_path`` inputs (candidate frames per second).
        captions_dir: folder of ``<vid>.srt`` used when ``refine`` gets no ``captions``.
        device: where the model runs (default: the model's device).
    """

    def __init__(self, model: torch.nn.Module, sampler: Optional[SamplerConfig] = None,
                 video_fps: float = 1.0, video_ext: str = ".mp4", captions_dir: Optional[str] = None,
                 device: Optional[Union[str, torch.device]] = None, cache_videos: int = 2,
                 items: str = "required", n_frms: Optional[int] = None):
        if items not in ITEMS_MODES:
            raise ConfigError(f"refiner.items: expected one of {ITEMS_MODES}, got {items!r}")
        if n_frms is not None and (isinstance(n_frms, bool) or not isinstance(n_frms, int) or n_frms < 1):
            raise ConfigError(f"refiner.n_frms: expected a positive integer, got {n_frms!r}")
        self.items_mode = items
        self.calce = getattr(model, "variant", None) == "calce"
        self.n_frms = n_frms or (150 if self.calce and model.calce.stage == 2 else 75)
        self.model = model
        if device is not None:
            self.model.to(device)
        self.model.eval()
        self.sampler = sampler or SamplerConfig()
        self.image_size = int(model.visual_encoder.image_size)
        self.processor = FrameProcessor(self.image_size)
        self.video_fps, self.video_ext = float(video_fps), video_ext
        self.captions_dir = captions_dir
        self.cache_videos = cache_videos
        self._sources: Dict[str, VideoFileFrameSource] = {}
        self.stats = RefineStats()

    @classmethod
    def from_config(cls, cfg: Any) -> "CaptionRefiner":
        """From ``{model: mapping | YAML path (with a model: node), checkpoint, sampler,
        video_fps, video_ext, captions_dir, device, cache_videos, items, n_frms}`` (unknown keys
        raise). The model class is the registered one of ``model.arch``."""
        d = check_keys(cfg, HOOK_KEYS, "refiner")
        if d.get("model") is None:
            raise ConfigError("refiner.model: missing (a model mapping or a model YAML path)")
        model_cfg = model_node(d["model"], "refiner.model")
        model = registry_get("model", str(model_cfg.get("arch", "c2f_caption_refiner"))).from_config(model_cfg)
        if d.get("checkpoint"):
            model.load_checkpoint(d["checkpoint"])
        return cls(model, SamplerConfig.from_mapping(d.get("sampler"), "refiner.sampler"),
                   video_fps=float(d.get("video_fps", 1.0)), video_ext=d.get("video_ext", ".mp4"),
                   captions_dir=resolve_path(d["captions_dir"]) if d.get("captions_dir") else None,
                   device=d.get("device"), cache_videos=int(d.get("cache_videos", 2)),
                   items=d.get("items", "required"), n_frms=d.get("n_frms"))

    # ------------------------------------------------------------------ helpers
    def _video_source(self, video_path: str):
        folder, name = os.path.split(os.path.abspath(video_path))
        vid, ext = os.path.splitext(name)
        key = f"{folder}|{ext}"
        if key not in self._sources:
            self._sources[key] = VideoFileFrameSource(folder, ext=ext, fps=self.video_fps,
                                                      image_size=self.image_size, cache_videos=self.cache_videos)
        return self._sources[key], vid

    def _captions(self, captions: Any, vid: Optional[str]) -> List[Caption]:
        if captions is None:
            if self.captions_dir and vid:
                path = os.path.join(self.captions_dir, f"{vid}.srt")
                return load_captions(path) if os.path.isfile(path) else []
            return []
        if isinstance(captions, (str, os.PathLike)):
            return load_captions(captions)
        out = []
        for c in captions:
            if isinstance(c, Caption):
                out.append(c)
            elif isinstance(c, Mapping):
                out.append(Caption(float(c["start"]), float(c["end"]), str(c["text"])))
            else:
                st, ed, text = c
                out.append(Caption(float(st), float(ed), str(text)))
        return out

    def _srt_text(self, captions: Any, vid: Optional[str]) -> Optional[str]:
        """The ``.srt`` text CALCE reads: a path, captions (written as SRT), or
        ``captions_dir/<vid>.srt``; None without speech."""
        if isinstance(captions, (str, os.PathLike)):
            if not os.path.isfile(captions):
                raise DataFormatError("subtitle file not found", path=str(captions))
            return read_srt_text(str(captions))
        if captions is None:
            return read_srt_text(os.path.join(self.captions_dir, f"{vid}.srt")) if self.captions_dir and vid else None
        caps = self._captions(captions, vid)
        return format_srt(caps) if caps else None

    def _items(self, items: Optional[Sequence[str]]) -> List[str]:
        if items is not None:
            if isinstance(items, str) or not all(isinstance(x, str) for x in items):
                raise ValueError(f"items must be a list of strings, got {items!r}")
            return list(items)
        if self.items_mode == "none":
            return []
        raise ConfigError("the CALCE refiner needs the query's items (refine(..., items=[...]), e.g. from "
                          "annotations that carry them); set the refiner's 'items: none' to use the explicit "
                          "no-items prompt instead")

    def _refine_calce(self, query: str, duration: float, stage2: List[List[float]], source: Any, vid: str,
                      captions: Any, items: Optional[Sequence[str]]) -> List[List[float]]:
        """One pair through :func:`build_calce_inputs` / :func:`calce_generate` / parsing."""
        item_list = self._items(items)
        try:
            raw, times = source.calce_frames(vid, self.n_frms)
        except (DataFormatError, OSError, RuntimeError) as e:
            logger.warning("refiner: frames of %s unavailable (%s); keeping stage-2 windows", vid, e)
            self.stats.record_fallback("frames_unavailable")
            return self._fallback(stage2, (0.0, float(duration)))
        stage = self.model.calce.stage
        stamps = [round(float(t), 2) if stage == 2 else float(t) for t in times]
        coarse = None
        if stage == 2:
            best = sorted(stage2, key=lambda w: -(w[2] if len(w) > 2 else 0.0))[:self.sampler.n_ref_windows]
            coarse = calce_windows(best) or [[0, int(round(duration))]]
        dev = next(self.model.parameters()).device
        torch.manual_seed(self.sampler.seed)
        x = build_calce_inputs(self.model, self.processor(raw).to(dev), torch.tensor(stamps, dtype=torch.float32),
                               float(duration), query, item_list, self._srt_text(captions, vid), coarse)
        g = self.model.generation_cfg
        out = calce_generate_output(self.model, x, int(g["num_beams"]), int(g["max_new_tokens"]),
                                    int(g["min_length"]), float(g["repetition_penalty"]), float(g["length_penalty"]))
        texts = self.model.t5_tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        conf = out.sequences_scores.float().exp().tolist() if getattr(out, "sequences_scores", None) is not None \
            else [1.0]
        batch = {"duration": [float(duration)], "stage2_windows": [stage2], "region": [[0.0, float(duration)]]}
        windows, results = self.model.refine_rows(batch, texts, conf)
        self.stats.record(results[0])
        return windows[0]

    @staticmethod
    def _fallback(stage2: List[List[float]], region) -> List[List[float]]:
        if stage2:
            return [[w[0], w[1], w[2] if len(w) > 2 else 1.0] for w in stage2]
        return [[float(region[0]), float(region[1]), 0.0]]

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def refine(self, query: str, duration: float, stage2_windows: Sequence[Sequence[float]],
               video_path: Optional[str] = None, frames: Optional[np.ndarray] = None,
               timestamps: Optional[Sequence[float]] = None, captions: Any = None,
               vid: Optional[str] = None, items: Optional[Sequence[str]] = None) -> List[List[float]]:
        """Refined windows ``[[st, ed, score], ...]`` (seconds) of one query in one video.

        Args:
            query: query text.
            duration: video length in seconds.
            stage2_windows: stage-2 windows ``[[st, ed, score], ...]`` (best first or scored).
            video_path: a video file (decoded at ``video_fps``), or
            frames, timestamps: (N, H, W, 3) uint8 frames of the video and their (N,) seconds.
            captions: ``Caption`` s, ``(start, end, text)`` tuples, dicts, an ``.srt`` path, or
                None (``captions_dir/<vid>.srt`` when configured).
            vid: video id (for captions_dir; default: the video file name).
            items: the query's items (CALCE; module doc).
        """
        if not (isinstance(duration, (int, float)) and duration > 0):
            raise ValueError(f"duration must be a positive number of seconds, got {duration!r}")
        stage2 = [[float(x) for x in w[:3]] for w in stage2_windows or []]
        region = refine_region(stage2, float(duration), self.sampler.margin_s, self.sampler.margin_ratio,
                               self.sampler.n_ref_windows)
        if frames is not None:
            if timestamps is None:
                raise ValueError("frames need timestamps (seconds, one per frame)")
            vid = vid or "<frames>"
            source = ArrayFrameSource({vid: (np.asarray(frames), np.asarray(timestamps, dtype=np.float64))})
        elif video_path is not None:
            source, file_vid = self._video_source(video_path)
            vid = vid or file_vid
        else:
            raise ValueError("refine needs video_path or frames + timestamps")
        if self.calce:
            return self._refine_calce(query, float(duration), stage2, source, vid, captions, items)
        try:
            sample = build_sample(query, vid, float(duration), region,
                                  source, self.sampler, self.processor,
                                  captions=self._captions(captions, vid))
        except (DataFormatError, OSError, RuntimeError) as e:
            logger.warning("refiner: frames of %s unavailable (%s); keeping stage-2 windows", vid, e)
            self.stats.record_fallback("frames_unavailable")
            return self._fallback(stage2, region)
        sample.update(qid=None, stage2_windows=stage2, n_ref_windows=self.sampler.n_ref_windows)
        batch = collate_refiner([sample])
        dev = next(self.model.parameters()).device
        batch["frames"] = batch["frames"].to(dev)
        batch["frame_mask"] = batch["frame_mask"].to(dev)
        texts, conf = self.model.generate_text(batch)
        windows, results = self.model.refine_rows(batch, texts, conf)
        self.stats.record(results[0])
        return windows[0]
