"""User-facing coarse-to-fine predictor: from typed queries to moments in your videos.

    from lavis_c2f.predictor import C2FPredictor

    # your videos, indexed with `lavis-c2f index videos VIDEO_DIR --out INDEX`
    p = C2FPredictor.from_checkpoints(index="INDEX", backbone="offline")        # zero-shot mode
    p = C2FPredictor.from_checkpoints(retriever_ckpt="tmass.pth", grounder_ckpt="qd_detr.pth",
                                      backbone="clip_hf", backbone_cfg={"clip_path": "clip-vit-b32"},
                                      index="INDEX")                             # trained mode
    for m in p.search("a man opens the fridge", top_k=10):
        print(m.vid, m.start, m.end, m.score)
    p.search_many(["a man opens the fridge", "a dog runs"], top_k=10)   # batched, same results

    video = p.encode_video("clip.mp4")              # features + duration (+ captions of clip.srt)
    moments = p.predict("a man opens the fridge", video, top_k=5)
    moments.windows, moments.saliency               # [[st, ed, score], ...] seconds, (L,) per clip

    # the embedded demo corpus with the checkpoints of `lavis-c2f quickstart --out RUN`
    p = C2FPredictor.for_demo_corpus("RUN")
    p.search("a tired chef washes the bucket in the garage")

A thin front end: it loads the models (:mod:`lavis_c2f.models.checkpoint`,
:func:`~lavis_c2f.models.grounder.checkpoint.load_grounder`), opens the corpus
(:mod:`lavis_c2f.index.corpora`), picks each stage's backend (:mod:`lavis_c2f.pipeline.stages`:
*trained* when a checkpoint whose input widths match the backbone is configured, else
*zero-shot*) and runs the coarse-to-fine engine (:mod:`lavis_c2f.pipeline.engine`: stage-1
top-K, grounding in those videos with long videos in chunks, score fusion, the optional
caption refiner on the best videos). The active mode is logged and given by
:attr:`C2FPredictor.mode` / :meth:`describe_mode`.

Checks (clear errors instead of silent nonsense): searching without an index; a video encoded by
another backbone than the predictor's (``weights_id``); an index built with another backbone;
checkpoints whose input widths differ from the backbone's; an empty query; zero-shot scoring on
the demo corpus (its text and video features live in unrelated spaces by construction).

The predictor holds no per-query state: ``search`` and ``predict`` may be called in any order.
Defaults (``stage1_top_k``, ``top_k``, ``refine_videos``, clip sampling) come from
``lavis_c2f/configs/pipeline/search.yaml`` and ``lavis_c2f/configs/video/extract.yaml``.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from lavis_c2f.common import dist as c2f_dist
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.data.demo_corpus import default_demo_root
from lavis_c2f.data.demo_text import DemoTextEncoder
from lavis_c2f.index.corpora import (DEMO_ZERO_SHOT, Corpus, DemoCorpus, VideoIndexCorpus, index_backbone_name,
                                     is_demo_corpus)
from lavis_c2f.models import zero_shot as zs
from lavis_c2f.models.checkpoint import load_retriever
from lavis_c2f.models.grounder.checkpoint import load_grounder
from lavis_c2f.pipeline.engine import SEARCH_DEFAULTS, CoarseToFine, Query
from lavis_c2f.pipeline.fusion import FusionConfig, load_fusion_choice
from lavis_c2f.pipeline.quickstart_run import QuickstartRun
from lavis_c2f.pipeline.refine import CorpusRefiner, build_caption_refiner
from lavis_c2f.pipeline.results import Moment, Moments, SearchResults
from lavis_c2f.models.grounder.checkpoint import checkpoint_feature_streams
from lavis_c2f.pipeline.stages import (FeatureGrounder, IndexStage1, ZeroShotGrounder, ZeroShotStage1,
                                       check_input_widths, select_streams)
from lavis_c2f.video.backbones import FeatureBackbone, backbone_key, resolve_backbone
from lavis_c2f.video.encoded import EncodedVideo, encode_video
from lavis_c2f.video.extract import EXTRACT_DEFAULTS

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


def resolve_device(device: Optional[str] = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; an explicit ``cuda`` request without a
    GPU raises :class:`ConfigError` (see :func:`lavis_c2f.common.dist.resolve_device`)."""
    return str(c2f_dist.resolve_device(device, fallback=False))


# =========================================================================== predictor
class C2FPredictor:
    """Coarse-to-fine moment search over an index, and grounding in single videos (module doc).

    Build it with :meth:`from_checkpoints`, :meth:`from_config` or :meth:`for_demo_corpus`.

    Args:
        text_encoder: ``encode_text(list[str]) -> [obj with tokens (T, Dt), pooled (D,)]`` with
            ``weights_id`` (a feature backbone or the demo text encoder).
        backbone: the feature backbone that encodes video files (None for the demo corpus).
        corpus: what :meth:`search` searches (:class:`VideoIndexCorpus` / :class:`DemoCorpus`).
        retriever, grounder: trained stage-1 / stage-2 models (None: that stage is zero-shot).
        grounder_postprocess: post-processing of the grounder (default: the model's).
        refiner: stage 3: a ``CaptionRefiner``, its config (mapping or YAML path), or None.
        fusion: :class:`FusionConfig` (or mapping) of stage-1/stage-2 fusion.
        zero_shot: :class:`~lavis_c2f.models.zero_shot.ZeroShotConfig` (or mapping).
        stage1_top_k: videos grounded per query in :meth:`search`.
        clip_length, frames_per_clip: clip sampling of :meth:`encode_video`.
        refine_videos: videos whose windows stage 3 refines per search (the best ones).
        decode_backend: decoder of :meth:`encode_video`. device: where the models run.
        grounder_streams: the feature streams the grounder reads, in its input order (names of
            the backbone's / index's ``stream_names``); None: the features as stored.
    """

    CONFIG_KEYS = ("retriever_ckpt", "grounder_ckpt", "retriever_cfg", "grounder_cfg", "backbone", "backbone_cfg",
                   "index", "ann", "demo_corpus", "run_dir", "splits", "refiner", "device", "fusion", "zero_shot",
                   "stage1_top_k", "clip_length", "frames_per_clip", "trusted", "verify_index", "refine_videos",
                   "decode_backend", "grounder_streams")
    _DEMO_ONLY = ("splits",)
    _VIDEO_ONLY = ("backbone", "backbone_cfg", "index", "ann", "zero_shot", "clip_length", "frames_per_clip",
                   "verify_index", "decode_backend", "refine_videos", "grounder_streams")

    def __init__(self, *, text_encoder, backbone=None, corpus: Optional[Corpus] = None, retriever=None,
                 grounder=None, grounder_postprocess=None, refiner: Any = None, fusion: Any = None,
                 zero_shot: Any = None, stage1_top_k: Optional[int] = None, clip_length: Optional[float] = None,
                 frames_per_clip: Optional[int] = None, refine_videos: Optional[int] = None,
                 decode_backend: str = "auto", device: str = "cpu", sources: Optional[Dict[str, Any]] = None,
                 grounder_streams: Optional[Sequence[str]] = None):
        if text_encoder is None:
            raise ConfigError("C2FPredictor needs a text encoder (a feature backbone or the demo text encoder)")
        self.stage1_top_k = int(SEARCH_DEFAULTS["stage1_top_k"] if stage1_top_k is None else stage1_top_k)
        self.clip_length = float(EXTRACT_DEFAULTS["clip_length"] if clip_length is None else clip_length)
        self.frames_per_clip = int(EXTRACT_DEFAULTS["frames_per_clip"] if frames_per_clip is None else frames_per_clip)
        if self.stage1_top_k < 1:
            raise ConfigError(f"stage1_top_k must be >= 1, got {stage1_top_k}")
        if not self.clip_length > 0 or self.frames_per_clip < 1:
            raise ConfigError(f"clip_length must be > 0 and frames_per_clip >= 1, got {clip_length}, {frames_per_clip}")
        self.text_encoder, self.backbone, self.corpus = text_encoder, backbone, corpus
        self.retriever, self.grounder = retriever, grounder
        self.fusion = fusion if isinstance(fusion, FusionConfig) else FusionConfig.from_mapping(fusion)
        self.zero_shot = (zero_shot if isinstance(zero_shot, zs.ZeroShotConfig)
                          else zs.ZeroShotConfig.from_mapping(zero_shot))
        self.refine_videos = int(SEARCH_DEFAULTS["refine_videos"] if refine_videos is None else refine_videos)
        self.decode_backend, self.device, self.sources = decode_backend, device, dict(sources or {})
        is_refiner = refiner is not None and callable(getattr(refiner, "refine", None))
        self._refiner_cfg, self._refiner = (None, refiner) if is_refiner else (refiner, None)
        self._text_cache: Dict[str, Query] = {}
        self.features_id = corpus.weights_id if backbone is None and corpus is not None else text_encoder.weights_id
        self.video_dim = int(backbone.dim) if backbone is not None else int(getattr(corpus, "dim", 0))
        # feature streams: stage 1 reads the text-space columns, the grounder its own streams in its order
        src = backbone if backbone is not None else corpus
        names = list(getattr(src, "stream_names", None) or ["video"])
        dims = list(getattr(src, "stream_dims", None) or [self.video_dim])
        cols = getattr(src, "text_columns", None)
        stage1_cols = None if cols is None or tuple(cols) == (0, self.video_dim) else tuple(cols)
        self.grounder_streams = list(grounder_streams) if grounder_streams else None
        grounder_cols, grounder_dims = select_streams(names, dims, self.grounder_streams)
        check_input_widths(retriever, grounder, text_encoder,
                           self.video_dim if stage1_cols is None else stage1_cols[1] - stage1_cols[0], grounder_dims,
                           f"the {backbone.name} backbone" if backbone is not None
                           else f"the {getattr(corpus, 'kind', 'corpus')}", self.grounder_streams)
        refuse = DEMO_ZERO_SHOT if isinstance(corpus, DemoCorpus) or backbone is None else None
        self.stage2 = (FeatureGrounder(grounder, grounder_postprocess, grounder_dims, corpus, columns=grounder_cols)
                       if grounder is not None
                       else ZeroShotGrounder(self.zero_shot, corpus, refuse=refuse, columns=stage1_cols))
        self.engine = None
        if corpus is not None:
            stage1 = (IndexStage1(corpus.index_for(retriever), retriever) if retriever is not None
                      else ZeroShotStage1(corpus, self.zero_shot, refuse=refuse, columns=stage1_cols))
            self.engine = CoarseToFine(stage1, self.stage2, self.fusion, self.stage1_top_k)
        logger.info("C2FPredictor: %s", self.describe_mode())

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoints(cls, retriever_ckpt: Optional[PathLike] = None, grounder_ckpt: Optional[PathLike] = None,
                         backbone: Any = "offline", backbone_cfg: Optional[Mapping[str, Any]] = None,
                         index: Optional[PathLike] = None, refiner: Any = None, device: str = "auto", *,
                         retriever_cfg: Any = None, grounder_cfg: Any = None, fusion: Any = None,
                         zero_shot: Any = None, stage1_top_k: Optional[int] = None, clip_length: Optional[float] = None,
                         frames_per_clip: Optional[int] = None, ann: Optional[PathLike] = None,
                         verify_index: bool = True, trusted: bool = False, refine_videos: Optional[int] = None,
                         decode_backend: str = "auto", grounder_streams: Optional[Sequence[str]] = None,
                         index_timeout: Optional[float] = None) -> "C2FPredictor":
        """A predictor for video files (and an index of them): ``retriever_ckpt`` defaults to the
        one the index was built with (else zero-shot stage 1); ``grounder_ckpt`` is ours, the
        runner's or an official QD-DETR / MESM one (None: zero-shot stage 2); ``backbone`` is a
        name (``offline`` | ``clip_hf`` | ``clip_lavis`` | ``random`` | ``slowfast``, or streams
        joined by ``+`` such as ``slowfast+clip_hf``; configured by ``backbone_cfg`` over the
        index's settings) or a built backbone; ``index`` the locator of a ``lavis-c2f index videos``
        index (needed by :meth:`search`): a folder (FAISS) or a Milvus ``*.db`` path /
        ``http(s)://`` URI with ``#COLLECTION`` (:mod:`lavis_c2f.index.locator`); ``retriever_cfg`` / ``grounder_cfg`` model YAMLs for
        checkpoints that store none; clip sampling defaults to the index's; ``ann`` an
        annotation file of the indexed videos (ground truth for plots); ``trusted`` allows full
        unpickling of checkpoints (only for files you trust); ``grounder_streams`` the feature
        streams the grounder reads in its input order (e.g. ``["clip", "slowfast"]`` for MESM
        on a ``slowfast+clip_hf`` index; default: the order its checkpoint records, official
        ``v_feat_dirs`` / ``feat_files``, else the index's); ``index_timeout`` the seconds a Milvus
        store may take to answer (None: the index's default)."""
        dev = resolve_device(device)
        corpus = None
        if index is not None:
            if is_demo_corpus(index):
                raise ConfigError(f"{index} is a demo corpus: use C2FPredictor.for_demo_corpus (CLI: --demo-corpus)")
            corpus = VideoIndexCorpus(index, ann=ann, verify=verify_index,
                                      **({} if index_timeout is None else {"timeout": float(index_timeout)}))
        built = isinstance(backbone, FeatureBackbone)
        if not built and corpus is not None and corpus.backbone_name == backbone_key(str(backbone)):
            # the index's own encoder settings (clip_path, crop size...), updated with the given ones
            backbone_cfg = {**corpus.backbone_config, **dict(backbone_cfg or {})}
        bb = resolve_backbone(backbone, backbone_cfg if built else {**dict(backbone_cfg or {}), "device": dev},
                              where="backbone_cfg")
        if corpus is not None:
            if bb.weights_id != corpus.weights_id:
                raise ConfigError(f"the index {corpus.path_dir} was built with the {corpus.backbone_name} backbone "
                                  f"({corpus.weights_id}) but the predictor's backbone is {bb.name} ({bb.weights_id}):"
                                  " queries must be encoded by the encoder of the index (same backbone, weights and "
                                  "settings)")
            for name, given, have in (("clip_length", clip_length, corpus.clip_length),
                                      ("frames_per_clip", frames_per_clip, corpus.frames_per_clip)):
                if given is not None and float(given) != float(have):
                    raise ConfigError(f"{name}={given} but the index was extracted with {name}={have}")
            clip_length, frames_per_clip = corpus.clip_length, corpus.frames_per_clip
            if retriever_ckpt is None and corpus.retriever_checkpoint:
                retriever_ckpt = corpus.retriever_checkpoint
                logger.info("using the retriever the index was built with: %s", retriever_ckpt)
            if (retriever_cfg is None and corpus.model_cfg and corpus.retriever_checkpoint and retriever_ckpt
                    and os.path.exists(os.fspath(retriever_ckpt))
                    and os.path.samefile(os.fspath(retriever_ckpt), corpus.retriever_checkpoint)):
                retriever_cfg = corpus.model_cfg  # the model YAML the index was built with
        retriever = load_retriever(retriever_ckpt, retriever_cfg, dev) if retriever_ckpt else None
        grounder, post = load_grounder(grounder_ckpt, grounder_cfg, dev, trusted) if grounder_ckpt else (None, None)
        if grounder is not None and grounder_streams is None and len(bb.stream_names) > 1:
            try:
                grounder_streams = checkpoint_feature_streams(os.fspath(grounder_ckpt), bb.stream_names, trusted)
            except ValueError as e:
                raise ConfigError(f"{e}; pass grounder_streams (--grounder-streams) to choose them") from None
            if grounder_streams is None:
                logger.info("%s records no feature streams: the grounder gets %s in the index's order",
                            grounder_ckpt, "+".join(bb.stream_names))
        return cls(text_encoder=bb, backbone=bb, corpus=corpus, retriever=retriever, grounder=grounder,
                   grounder_postprocess=post, refiner=refiner, fusion=fusion, zero_shot=zero_shot,
                   stage1_top_k=stage1_top_k, clip_length=clip_length, frames_per_clip=frames_per_clip,
                   refine_videos=refine_videos, decode_backend=decode_backend, device=dev,
                   sources={"retriever": retriever_ckpt and os.fspath(retriever_ckpt),
                            "grounder": grounder_ckpt and os.fspath(grounder_ckpt),
                            "index": index and os.fspath(index)}, grounder_streams=grounder_streams)

    @classmethod
    def for_demo_corpus(cls, run: Any = None, corpus_root: Optional[PathLike] = None, *,
                        retriever_ckpt: Optional[PathLike] = None, grounder_ckpt: Optional[PathLike] = None,
                        retriever_cfg: Any = None, grounder_cfg: Any = None, fusion: Any = None,
                        splits: Optional[Sequence[str]] = None, stage1_top_k: Optional[int] = None,
                        refiner: Any = None, device: str = "auto", trusted: bool = False) -> "C2FPredictor":
        """A predictor over the embedded demo corpus with trained checkpoints: ``run`` is the run
        directory of ``lavis-c2f quickstart`` (:class:`~lavis_c2f.pipeline.quickstart_run.QuickstartRun`:
        its checkpoints, tuned fusion and corpus), a mapping ``{"stage1": ckpt, "stage2": ckpt}``,
        or None (then pass the checkpoints); ``corpus_root`` defaults to ``RUN/corpus``, else the
        default demo root; the other arguments override the run's. The text encoder is the demo
        corpus's own; zero-shot mode is refused (module docstring)."""
        dev = resolve_device(device)
        ckpts: Dict[str, Optional[str]] = {"stage1": None, "stage2": None}
        qs = None
        if isinstance(run, Mapping):
            ckpts.update({k: run.get(k) for k in ckpts})
        elif run is not None:
            qs = QuickstartRun(run)
            ckpts.update(qs.checkpoints())
        ckpts["stage1"] = os.fspath(retriever_ckpt) if retriever_ckpt else ckpts["stage1"]
        ckpts["stage2"] = os.fspath(grounder_ckpt) if grounder_ckpt else ckpts["stage2"]
        missing = [k for k, v in ckpts.items() if not v]
        if missing:
            raise ConfigError(f"demo corpus search needs trained checkpoints (missing {' and '.join(missing)}): "
                              + DEMO_ZERO_SHOT)
        if corpus_root is None:
            corpus_root = qs.corpus if qs is not None and qs.corpus.is_dir() else default_demo_root()
        if fusion is None and qs is not None and qs.fusion.is_file():
            fusion = load_fusion_choice(str(qs.fusion))
        corpus = DemoCorpus(corpus_root, splits=splits)
        grounder, post = load_grounder(ckpts["stage2"], grounder_cfg, dev, trusted)
        return cls(text_encoder=DemoTextEncoder.from_corpus(corpus.root), corpus=corpus,
                   retriever=load_retriever(ckpts["stage1"], retriever_cfg, dev), grounder=grounder,
                   grounder_postprocess=post, refiner=refiner, fusion=fusion, stage1_top_k=stage1_top_k,
                   clip_length=corpus.clip_length, device=dev,
                   sources={"retriever": ckpts["stage1"], "grounder": ckpts["stage2"], "demo_corpus": corpus.root,
                            "run": qs and str(qs.path)})

    @classmethod
    def from_config(cls, cfg: Optional[Mapping[str, Any]]) -> "C2FPredictor":
        """From a mapping with the keys of :attr:`CONFIG_KEYS` (unknown keys raise
        :class:`ConfigError`). ``demo_corpus`` / ``run_dir`` select :meth:`for_demo_corpus`
        (then the backbone keys must be absent); otherwise :meth:`from_checkpoints`."""
        d = check_keys(cfg, cls.CONFIG_KEYS, "predictor")
        demo = bool(d.get("demo_corpus") or d.get("run_dir"))
        bad = sorted(k for k in (cls._VIDEO_ONLY if demo else cls._DEMO_ONLY) if k in d)
        if bad:
            raise ConfigError(f"predictor: {bad} are not used with demo_corpus / run_dir" if demo else
                              "predictor.splits is only used with demo_corpus")
        common = {k: d[k] for k in ("retriever_cfg", "grounder_cfg", "fusion", "refiner", "stage1_top_k") if k in d}
        common.update(retriever_ckpt=d.get("retriever_ckpt"), grounder_ckpt=d.get("grounder_ckpt"),
                      device=d.get("device", "auto"), trusted=bool(d.get("trusted", False)))
        if demo:
            return cls.for_demo_corpus(d.get("run_dir"), d.get("demo_corpus"), splits=d.get("splits"), **common)
        return cls.from_checkpoints(backbone=d.get("backbone", "offline"), backbone_cfg=d.get("backbone_cfg"),
                                    index=d.get("index"), ann=d.get("ann"),
                                    verify_index=bool(d.get("verify_index", True)),
                                    **{k: d[k] for k in ("zero_shot", "clip_length", "frames_per_clip",
                                                         "refine_videos", "decode_backend", "grounder_streams")
                                       if k in d}, **common)

    # ------------------------------------------------------------------ checks and mode
    @property
    def mode(self) -> Dict[str, str]:
        """``{"stage1": "trained" | "zero-shot", "stage2": ..., "stage3": "on" | "off"}``."""
        return {"stage1": "trained" if self.retriever is not None else "zero-shot",
                "stage2": "trained" if self.grounder is not None else "zero-shot",
                "stage3": "on" if (self._refiner is not None or self._refiner_cfg is not None) else "off"}

    def describe_mode(self, stages: Sequence[str] = ("stage1", "stage2", "stage3")) -> str:
        """One line saying what each stage runs (``stages``: which of stage1, stage2, stage3)."""
        name = getattr(self.text_encoder, "name", "encoder")
        if self.retriever is not None:
            s1 = f"trained T-MASS retriever ({self.sources.get('retriever') or 'given model'})"
        else:
            how = "max" if self.zero_shot.video_score == "max" else f"top-{self.zero_shot.video_topk} mean"
            s1 = f"ZERO-SHOT (cosine of the {name} text embedding with each clip, {how} per video)"
        if self.grounder is not None:
            arch = (getattr(self.grounder, "config", {}) or {}).get("arch") or type(self.grounder).__name__
            s2 = f"trained {arch} ({self.sources.get('grounder') or 'given model'})"
            if self.grounder_streams:
                s2 += f" on {'+'.join(self.grounder_streams)} features"
        else:
            s2 = "ZERO-SHOT (smoothed similarity curve, thresholded into windows)"
        s3 = "caption refiner" if self.mode["stage3"] == "on" else "off"
        parts = {"stage1": f"stage 1: {s1}", "stage2": f"stage 2: {s2}", "stage3": f"stage 3: {s3}"}
        return " | ".join(parts[k] for k in stages)

    # ------------------------------------------------------------------ encoders
    def encode_query(self, query: str) -> Query:
        """The engine's :class:`~lavis_c2f.pipeline.engine.Query`: token features (T, Dt) and
        pooled embedding (D,) of a query (cached)."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        q = " ".join(query.split())
        if not q:
            raise ValueError("the query is empty")
        if q not in self._text_cache:
            tf = self.text_encoder.encode_text([q])[0]
            if len(self._text_cache) > 256:
                self._text_cache.clear()
            self._text_cache[q] = Query(q, tokens=np.asarray(tf.tokens, np.float32),
                                        pooled=np.asarray(tf.pooled, np.float32))
        return self._text_cache[q]

    def encode_video(self, path: PathLike, vid: Optional[str] = None, captions: bool = True,
                     progress: Optional[Callable[[int, int], None]] = None) -> EncodedVideo:
        """:func:`lavis_c2f.video.encoded.encode_video` with this predictor's backbone and clip
        sampling (``progress(clips_done, clips_total)`` drives the web demo's progress bar)."""
        if self.backbone is None:
            raise ConfigError("this predictor has no video backbone (its videos are the demo corpus's feature "
                              "files): use predictor.video(vid)")
        return encode_video(self.backbone, path, self.clip_length, self.frames_per_clip, vid=vid, captions=captions,
                            decode_backend=self.decode_backend, progress=progress)

    def video(self, vid: str) -> EncodedVideo:
        """An :class:`EncodedVideo` of the searched corpus."""
        if self.corpus is None:
            raise ConfigError("this predictor has no index: pass index=... (or use encode_video)")
        return self.corpus.encoded(vid)

    # ------------------------------------------------------------------ stage 3
    def _get_refiner(self):
        if self._refiner is None and self._refiner_cfg is not None:
            self._refiner = build_caption_refiner(self._refiner_cfg, where="refiner")
        if self._refiner is None:
            raise ConfigError("stage 3 is not configured: pass refiner=... (a CaptionRefiner or its config)")
        return self._refiner

    def _video_file(self, vid: str, path: Optional[str], captions: Any = None) -> Tuple[str, Any]:
        if not path:
            raise ConfigError(f"stage 3 needs the video file of {vid} (the refiner looks at frames); "
                              f"the {getattr(self.corpus, 'kind', 'video')} has none")
        return path, captions or None

    def _corpus_refiner(self, refine: Optional[bool]) -> Optional[CorpusRefiner]:
        if not (refine or (refine is None and self.mode["stage3"] == "on")):
            return None
        return CorpusRefiner.for_videos(self._get_refiner(), self.refine_videos,
                                        lambda v: self._video_file(v, self.corpus.path(v), self.corpus.captions(v)))

    # ------------------------------------------------------------------ API
    def predict(self, query: str, video: EncodedVideo, top_k: Optional[int] = None,
                refine: Optional[bool] = None) -> Moments:
        """Moments of ``query`` in one ``video`` (from :meth:`encode_video`, same backbone, or
        :meth:`video`): stage 2, then stage 3 when ``refine`` (default: when a refiner is
        configured); ``top_k`` windows (default ``windows`` of ``configs/pipeline/search.yaml``)."""
        top_k = int(SEARCH_DEFAULTS["windows"] if top_k is None else top_k)
        if not isinstance(video, EncodedVideo):
            raise TypeError(f"video must be an EncodedVideo (from encode_video or video()), got {type(video).__name__}")
        if video.weights_id != self.features_id:
            raise ValueError(f"video {video.vid!r} was encoded by {video.backbone or 'another encoder'} "
                             f"({video.weights_id}) but this predictor uses {self.features_id}: encode it with "
                             "this predictor's encode_video")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if video.n_clips == 0:
            raise ValueError(f"video {video.vid!r} has no clips")
        q = self.encode_query(query)
        g = self.stage2.ground_videos(q, [video])[0]
        windows = [list(map(float, w)) for w in g.windows][:top_k]
        refined = bool(refine or (refine is None and self.mode["stage3"] == "on"))
        if refined:
            refiner = CorpusRefiner.for_videos(self._get_refiner(), 1, None)
            path, caps = self._video_file(video.vid, video.path, video.captions)
            windows = refiner.refine_pair(q.text, video.vid, float(video.duration), windows, video_path=path,
                                          captions=caps)[0][:top_k]
        return Moments(query=q.text, vid=video.vid, duration=float(video.duration), clip_length=video.clip_length,
                       windows=windows, saliency=np.asarray(g.saliency, np.float32), mode=self.mode["stage2"],
                       refined=refined)

    def refresh(self) -> bool:
        """Catch up with what other processes wrote to a live index (``index add`` / ``index
        remove`` / ``index videos`` on a Milvus collection: :meth:`Corpus.refresh`, about 1 ms;
        nothing for a FAISS index or the demo corpus). Every search calls it first, so the
        service, the web demo and a script see the same corpus. Whether anything changed."""
        return self.corpus is not None and self.corpus.refresh()

    def _require_engine(self) -> CoarseToFine:
        """The engine, after :meth:`refresh` (``ConfigError`` without an index)."""
        if self.engine is None:
            raise ConfigError("search needs an index: build one with 'lavis-c2f index videos VIDEO_DIR --out INDEX' "
                              "and pass index=INDEX (or use C2FPredictor.for_demo_corpus)")
        self.refresh()
        return self.engine

    def stage1(self, query: str, k: Optional[int] = None) -> List[Tuple[str, float]]:
        """Stage 1 alone: the ``k`` best videos of the index ``[(vid, score), ...]``."""
        return self.stage1_batch([query], k)[0]

    def stage1_batch(self, queries: Sequence[str], k: Optional[int] = None) -> List[List[Tuple[str, float]]]:
        """Stage 1 alone for a batch of queries (one ``rank`` call): per query its ``k`` best
        videos ``[(vid, score), ...]``."""
        engine = self._require_engine()
        k = int(k or self.stage1_top_k)
        return [list(r[:k]) for r in engine.stage1.rank([self.encode_query(q) for q in queries], k)]

    def search(self, query: str, top_k: Optional[int] = None, stage1_top_k: Optional[int] = None,
               refine: Optional[bool] = None) -> SearchResults:
        """The ``top_k`` best moments of ``query`` in the whole index (``list[Moment]`` with
        context), grounding its ``stage1_top_k`` best videos (default :attr:`stage1_top_k`);
        ``refine`` runs stage 3 on the best :attr:`refine_videos` videos (default: when a
        refiner is configured)."""
        return self.search_batch([query], top_k, stage1_top_k, refine)[0]

    def search_batch(self, queries: Sequence[str], top_k: Optional[int] = None, stage1_top_k: Optional[int] = None,
                     refine: Optional[bool] = None) -> List[SearchResults]:
        """:meth:`search` of several queries in one run of the engine (each stage once for the
        batch); the timings are the batch's."""
        top_k = int(SEARCH_DEFAULTS["top_k"] if top_k is None else top_k)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        t0 = time.perf_counter()
        engine = self._require_engine()
        qs = [self.encode_query(q) for q in queries]
        timings = {"encode_query_s": time.perf_counter() - t0}
        res = engine.run(qs, int(stage1_top_k or self.stage1_top_k), refiner=self._corpus_refiner(refine),
                         timings=timings)
        timings["total_s"] = time.perf_counter() - t0
        return [SearchResults.of(r, self.corpus, self.mode, dict(timings), top_k) for r in res]

    def search_many(self, queries: Sequence[str], top_k: Optional[int] = None, stage1_top_k: Optional[int] = None,
                    refine: Optional[bool] = None, batch_size: int = 256) -> List[SearchResults]:
        """:meth:`search` of many queries, one :class:`SearchResults` per query in order, equal to
        searching them one by one: the queries go through the engine ``batch_size`` at a time,
        so stage 1 searches the index with the whole batch (one FAISS call, re-ranking in blocks
        of queries) and stage 2 grounds all (query, video) pairs of the batch in batched calls.
        Each result's ``timings`` are its batch's (``batch_queries`` says how many shared them)."""
        top_k = int(SEARCH_DEFAULTS["top_k"] if top_k is None else top_k)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if isinstance(queries, str):
            raise TypeError("search_many takes a list of query strings (use search for one)")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        engine = self._require_engine()
        refiner = self._corpus_refiner(refine)
        k = int(stage1_top_k or self.stage1_top_k)
        out: List[SearchResults] = []
        for b0 in range(0, len(queries), int(batch_size)):
            t0 = time.perf_counter()
            batch = [self.encode_query(q) for q in queries[b0:b0 + int(batch_size)]]
            timings: Dict[str, float] = {"encode_query_s": time.perf_counter() - t0}
            results = engine.run(batch, k, refiner=refiner, timings=timings)
            timings["total_s"] = time.perf_counter() - t0
            timings["batch_queries"] = float(len(batch))
            out.extend(SearchResults.of(res, self.corpus, self.mode, dict(timings), top_k) for res in results)
        return out

    def ground_truth(self, query: str) -> List[Tuple[str, List[List[float]]]]:
        """Annotated ``[(vid, windows), ...]`` of a query of the corpus (exact text match), if any."""
        return [] if self.corpus is None else self.corpus.ground_truth(query)


__all__ = ["C2FPredictor", "DemoCorpus", "EncodedVideo", "Moment", "Moments", "SearchResults", "VideoIndexCorpus",
           "index_backbone_name", "is_demo_corpus", "load_grounder", "load_retriever", "resolve_device",
           "select_streams"]
