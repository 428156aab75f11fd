"""SlowFast R50 (8x8, Kinetics-400) clip features as in QVHighlights / Moment-DETR.

The QVHighlights ``slowfast_features`` (used by Moment-DETR, QD-DETR, MESM, UniVTG...) come
from the HERO video feature extractor with PySlowFast's ``SLOWFAST_8x8_R50`` (Kinetics-400,
the Caffe2 checkpoint ``SLOWFAST_8x8_R50.pkl``). Its recipe, reproduced here:

* decode at ``target_fps`` = 30 (ffmpeg ``fps=30``, i.e. frame slot ``n`` shows the last frame
  strictly before ``(n + 0.5) / 30`` s), shorter side scaled to 224, centre crop 224x224, RGB;
* clips of ``clip_length`` = 2 s = 60 frame slots (frames past the end repeat the last one);
* per clip, ``num_frames`` = 32 slots ``floor(linspace(0, span - 1, 32))`` clamped to the
  clip, with ``span = num_frames * sampling_rate * floor(source fps) / target_fps`` (HERO passes
  the source's frame rate here: 64 slots for a 30 fps video, 53.3 for 25 fps);
* ``x / 255``, then ``(x - 0.45) / (0.225 + 1e-8)`` per channel;
* fast pathway = the 32 frames, slow pathway = ``index_select(linspace(0, 31, 32 // alpha))``
  (alpha = 4: 8 frames);
* feature = the head's input: each pathway's ``res5`` output averaged over time and space
  (2048 slow + 256 fast = 2304), concatenated slow then fast; stored as float16 values (HERO's
  ``--half_precision 1``).

HERO cuts a video into ``ceil(duration / 2)`` clips; this package keeps its own clip count
(:func:`lavis_c2f.video.probe.num_clips`, the CLIP stream's), which differs only by a final
partial clip shorter than a second; grounders cut the streams to the shorter one anyway.

The network is pytorchvideo's :func:`create_slowfast` (same architecture as PySlowFast's
``SlowFast`` model). :func:`load_slowfast_state_dict` reads a local checkpoint in any of the
three layouts it is distributed in and returns pytorchvideo's parameter names:

* PySlowFast Caffe2 ``.pkl`` (``{"blobs": {name: ndarray}}``; unpickled with numpy types only);
* PySlowFast ``.pyth`` (``{"model_state": {"s1.pathway0_stem.conv.weight": ...}}``);
* pytorchvideo ``.pyth`` / state dict (``blocks.0.multipathway_blocks.0.conv.weight``...).

:class:`HeroSlowFastSampling` is the recipe's frames per clip (what the decoder samples) and
:class:`SlowFastBackbone` the registered ``c2f_feature_slowfast`` encoder built on all of it.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from lavis.common.registry import registry

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.video.backbone_base import (BackboneLoadError, FeatureBackbone, TextFeatures, file_sha256,
                                           frames_to_tensor, resize_center_crop, weights_id_of)

FEATURE_DIM = 2304

# Caffe2 blob name -> PySlowFast parameter name, applied in order (PySlowFast's own convention)
_C2_RULES: Sequence[Tuple[str, str]] = (
    (r"^t_pool1_subsample_bn_(.*)", r"s1_fuse.bn.\1"),
    (r"^t_pool1_subsample_(.*)", r"s1_fuse.conv_f2s.\1"),
    (r"^t_res(\d+)_\d+_branch2c_bn_subsample_bn_(.*)", r"s\1_fuse.bn.\2"),
    (r"^t_res(\d+)_\d+_branch2c_bn_subsample_(.*)", r"s\1_fuse.conv_f2s.\2"),
    (r"^res(\d+)_(\d+)_branch(\d)([a-z])_(.*)", r"s\1.pathway0_res\2.branch\3.\4_\5"),
    (r"^res_conv1_bn_(.*)", r"s1.pathway0_stem.bn.\1"),
    (r"^conv1_(.*)", r"s1.pathway0_stem.conv.\1"),
    (r"^res(\d+)_(\d+)_branch(\d)_(.*)", r"s\1.pathway0_res\2.branch\3_\4"),
    (r"^t_res(\d+)_(\d+)_branch(\d)([a-z])_(.*)", r"s\1.pathway1_res\2.branch\3.\4_\5"),
    (r"^t_res_conv1_bn_(.*)", r"s1.pathway1_stem.bn.\1"),
    (r"^t_conv1_(.*)", r"s1.pathway1_stem.conv.\1"),
    (r"^t_res(\d+)_(\d+)_branch(\d)_(.*)", r"s\1.pathway1_res\2.branch\3_\4"),
    (r"^pred_(.*)", r"head.projection.\1"),
    (r"(.*)bn.b$", r"\1bn.bias"),
    (r"(.*)bn.s$", r"\1bn.weight"),
    (r"(.*)bn.rm$", r"\1bn.running_mean"),
    (r"(.*)bn.riv$", r"\1bn.running_var"),
    (r"(.*)[._]b$", r"\1.bias"),
    (r"(.*)[._]w$", r"\1.weight"),
)
_C2_IGNORED = re.compile(r"(_momentum$|^lr$|^model_iter$|^lr_)")

# PySlowFast parameter name -> pytorchvideo create_slowfast name
_PSF_RULES: Sequence[Tuple[str, str]] = (
    (r"^s1\.pathway(\d)_stem\.conv\.(.*)", r"blocks.0.multipathway_blocks.\1.conv.\2"),
    (r"^s1\.pathway(\d)_stem\.bn\.(.*)", r"blocks.0.multipathway_blocks.\1.norm.\2"),
    (r"^s(\d)_fuse\.conv_f2s\.(.*)", r"blocks.{\1-1}.multipathway_fusion.conv_fast_to_slow.\2"),
    (r"^s(\d)_fuse\.bn\.(.*)", r"blocks.{\1-1}.multipathway_fusion.norm.\2"),
    (r"^s(\d)\.pathway(\d)_res(\d+)\.branch1_bn\.(.*)", r"blocks.{\1-1}.multipathway_blocks.\2.res_blocks.\3.branch1_norm.\4"),
    (r"^s(\d)\.pathway(\d)_res(\d+)\.branch1\.(.*)", r"blocks.{\1-1}.multipathway_blocks.\2.res_blocks.\3.branch1_conv.\4"),
    (r"^s(\d)\.pathway(\d)_res(\d+)\.branch2\.([abc])_bn\.(.*)",
     r"blocks.{\1-1}.multipathway_blocks.\2.res_blocks.\3.branch2.norm_\4.\5"),
    (r"^s(\d)\.pathway(\d)_res(\d+)\.branch2\.([abc])\.(.*)",
     r"blocks.{\1-1}.multipathway_blocks.\2.res_blocks.\3.branch2.conv_\4.\5"),
    (r"^head\.projection\.(.*)", r"blocks.6.proj.\1"),
)
_STAGE = re.compile(r"\{(\d)-1\}")


def caffe2_to_pyslowfast(name: str) -> str:
    """``res4_2_branch2b_bn_riv`` -> ``s4.pathway0_res2.branch2.b_bn.running_var``."""
    for src, dst in _C2_RULES:
        name = re.sub(src, dst, name)
    return name


def pyslowfast_to_pytorchvideo(name: str) -> Optional[str]:
    """``s4.pathway0_res2.branch2.b_bn.running_var`` ->
    ``blocks.3.multipathway_blocks.0.res_blocks.2.branch2.norm_b.running_var`` (None: no rule)."""
    for src, dst in _PSF_RULES:
        m = re.match(src, name)
        if m:
            out = m.expand(dst)
            return _STAGE.sub(lambda s: str(int(s.group(1)) - 1), out)
    return None


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays only (a Caffe2 ``.pkl`` checkpoint), nothing executable."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"), ("builtins", "bytes"),
               ("_codecs", "encode")}  # protocol-2 pickles (Python 2 files) spell bytes this way

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (not a numpy checkpoint)")
        return super().find_class(module, name)


def _read_caffe2(path: str) -> Dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        data = _NumpyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    blobs = data.get("blobs", data) if isinstance(data, dict) else None
    if not isinstance(blobs, dict):
        raise ValueError("not a Caffe2 checkpoint (expected a dict with 'blobs')")
    out = {}
    for k, v in blobs.items():
        if _C2_IGNORED.search(str(k)):
            continue
        out[caffe2_to_pyslowfast(str(k))] = torch.from_numpy(np.ascontiguousarray(v))
    return out


def load_slowfast_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Parameters of a local SlowFast checkpoint in pytorchvideo names (module docstring).
    Raises ``ValueError`` for content that is none of the three layouts, naming what it found."""
    if path.endswith(".pkl"):
        sd = _read_caffe2(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping):
            for key in ("model_state", "state_dict", "model"):
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
        if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
            raise ValueError("expected a state dict (or a dict with 'model_state' / 'state_dict')")
        sd = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}
    if any(k.startswith("blocks.") for k in sd):
        return dict(sd)
    out, unknown = {}, []
    for k, v in sd.items():
        new = pyslowfast_to_pytorchvideo(k)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise ValueError(f"unknown SlowFast parameter names (not PySlowFast / Caffe2 / pytorchvideo): "
                         f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return out


def build_slowfast_r50(num_classes: int = 400) -> torch.nn.Module:
    """pytorchvideo's SlowFast R50 (alpha 4, beta 1/8, fusion kernel 7) in eval mode."""
    try:
        from pytorchvideo.models.slowfast import create_slowfast
    except ImportError:
        raise ImportError("the SlowFast backbone needs the 'pytorchvideo' package (pip install pytorchvideo==0.1.5, "
                          "or pip install 'lavis-c2f[slowfast]')") from None
    return create_slowfast(model_depth=50, model_num_class=int(num_classes)).eval()


def hero_frame_slots(clip_length: float, source_fps: float, target_fps: int = 30, num_frames: int = 32,
                     sampling_rate: int = 2) -> np.ndarray:
    """(num_frames,) int64 frame slots (at ``target_fps``) inside one clip, HERO's sampling:
    ``clamp(floor(linspace(0, span - 1, num_frames)), 0, slots - 1)`` with
    ``span = num_frames * sampling_rate * floor(source_fps) / target_fps`` and
    ``slots = round(clip_length * target_fps)`` (linspace in float32, like torch)."""
    slots = max(1, int(round(float(clip_length) * target_fps)))
    fps = math.floor(source_fps) if source_fps and math.isfinite(source_fps) and source_fps >= 1 else target_fps
    span = num_frames * sampling_rate * fps / target_fps
    idx = torch.linspace(0, span - 1, int(num_frames)).clamp(0, slots - 1).long()
    return idx.numpy().astype(np.int64)


def pack_pathways(x: torch.Tensor, alpha: int) -> List[torch.Tensor]:
    """(B, 3, T, H, W) -> [slow (B, 3, T // alpha, H, W), fast (the input)]; slow frames are
    ``linspace(0, T - 1, T // alpha)`` truncated, as PySlowFast / HERO pack them."""
    t = x.shape[2]
    idx = torch.linspace(0, t - 1, max(1, t // int(alpha))).long().to(x.device)
    return [torch.index_select(x, 2, idx), x]


def slowfast_features(model: torch.nn.Module, pathways: List[torch.Tensor]) -> torch.Tensor:
    """(B, 2304) features: res5 outputs of both pathways, each averaged over (T, H, W), slow
    then fast (for 32 frames at 224 this is exactly the head's ``AvgPool3d`` input to the
    classifier)."""
    x = pathways
    for block in model.blocks[:5]:
        x = block(x)
    return torch.cat([p.mean(dim=(2, 3, 4)) for p in x], dim=1)


# =========================================================================== clip sampling (HERO)


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
        slots = hero_frame_slots(clip_length, fps, self.target_fps, self.num_frames, self.sampling_rate)
        return (slots.astype(np.float64) + 0.5) / self.target_fps

    explicit_offsets = offsets


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
                 alpha: int = 4, mean: Sequence[float] = (0.45, 0.45, 0.45),
                 std: Sequence[float] = (0.225, 0.225, 0.225), half_precision_output: bool = True,
                 batch_size: int = 8, device: str = "cpu"):
        super().__init__(batch_size=batch_size, device=device)
        if int(num_frames) < int(alpha) or int(alpha) < 1 or int(crop_size) < 32:
            raise ConfigError(f"{self.name}: need num_frames >= alpha >= 1 and crop_size >= 32, got num_frames="
                              f"{num_frames}, alpha={alpha}, crop_size={crop_size}")
        if slowfast_checkpoint:
            path = os.path.abspath(os.path.expanduser(str(slowfast_checkpoint)))
            if not os.path.isfile(path):
                raise BackboneLoadError(f"SlowFast checkpoint not found: {path}")
            model = build_slowfast_r50()
            self._load(model, path)
            source = file_sha256(path)
        elif random_init is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(random_init))
                model = build_slowfast_r50()
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
        self.dim, self.text_dim = FEATURE_DIM, 0
        self._weights_id = weights_id_of(self.name, [source, self.crop_size, self._sampling, self.alpha, tuple(mean),
                                                     tuple(std), self.half_precision_output, "hero-v1"])

    def _load(self, model: torch.nn.Module, path: str) -> None:
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


__all__ = ["FEATURE_DIM", "HeroSlowFastSampling", "SlowFastBackbone", "build_slowfast_r50", "caffe2_to_pyslowfast",
           "hero_frame_slots", "load_slowfast_state_dict", "pack_pathways", "pyslowfast_to_pytorchvideo",
           "slowfast_features"]
