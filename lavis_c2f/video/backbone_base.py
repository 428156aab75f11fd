"""The interface of the frame / query encoders (``c2f_feature_*``, :mod:`lavis_c2f.video.backbones`).

* :class:`FeatureBackbone`: ``encode_frames``, ``encode_clips``, ``encode_text``, ``dim``,
  ``text_dim``, ``weights_id``, ``decode_size``, ``sampler``, the feature streams
  (``stream_names`` / ``stream_dims`` / ``text_columns``) and ``describe``;
* the clip samplers the decoder follows (:class:`UniformSampling`, :class:`ConcatSampling`;
  SlowFast's is :class:`lavis_c2f.video.slowfast.HeroSlowFastSampling`);
* what the backbones share: :class:`TextFeatures`, :class:`BackboneLoadError`, the offline
  environment, weights ids (:func:`weights_id_of`), safetensors / transformers folders without
  the network, frame tensors and resizing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from lavis.models.base_model import BaseModel

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.paths import config_path

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


def weights_id_of(name: str, parts: Sequence[Any]) -> str:
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


def hf_weights_file(model_dir: str) -> str:
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
    wfile = hf_weights_file(model_dir)
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


__all__ = ["BackboneLoadError", "ConcatSampling", "FeatureBackbone", "SHORT_NAMES", "STREAM_NAMES", "TextFeatures",
           "UniformSampling", "file_sha256", "frames_to_tensor", "hf_weights_file", "load_hf_model", "read_safetensors",
           "resize_center_crop", "set_offline_env", "weights_id_of"]
