"""LAVIS processors for pre-extracted features: ``c2f_video_features`` and ``c2f_text_features``.

They are thin, registered wrappers around the array functions of
:mod:`lavis_c2f.data.features`, so the datasets (and anything else holding raw arrays) apply
exactly QD-DETR's normalise / truncate / TEF steps.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor

from lavis_c2f.data.cfg import check_keys
from lavis_c2f.data.features import combine_video_streams, norm_params, prepare_text

ArrayLike = Union[np.ndarray, torch.Tensor]


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


@registry.register_processor("c2f_video_features")
class VideoFeatureProcessor(BaseProcessor):
    """Per-stream clip features -> one (L, sum D_i [+ 2]) float32 tensor.

    ``processor(streams)`` takes one (L, D) array or a list of per-stream (L_i, D_i) arrays:
    each stream is L2-normalised per clip when ``normalize`` (``norm_style`` ``qd_detr``:
    ``x / (||x|| + 1e-5)``; ``mesm``: ``x / max(||x||, 1e-12)``), streams are cut to the
    shortest and concatenated, truncated to ``max_len`` clips, then the two TEF columns are
    appended when ``use_tef`` (``arange(L) / L`` and that + ``1 / L``).
    """

    def __init__(self, normalize: bool = True, max_len: Optional[int] = None, use_tef: bool = True,
                 norm_style: str = "qd_detr"):
        super().__init__()
        self.eps, self.clamp = norm_params(norm_style, "video")
        self.norm_style = norm_style
        self.normalize = bool(normalize)
        self.max_len = None if max_len is None else int(max_len)
        self.use_tef = bool(use_tef)
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len must be >= 1 or None, got {max_len}")

    def __call__(self, streams: Union[ArrayLike, Sequence[ArrayLike]]) -> torch.Tensor:
        if isinstance(streams, (np.ndarray, torch.Tensor)):
            streams = [streams]
        out = combine_video_streams([_np(s) for s in streams], normalize=self.normalize,
                                    max_len=self.max_len, use_tef=self.use_tef, eps=self.eps,
                                    clamp=self.clamp)
        return torch.from_numpy(out)

    @classmethod
    def from_config(cls, cfg: Any = None) -> "VideoFeatureProcessor":
        d = check_keys(cfg, {"name", "normalize", "max_len", "use_tef", "norm_style"},
                       "c2f_video_features processor")
        d.pop("name", None)
        return cls(**d)

    def __repr__(self) -> str:
        return (f"VideoFeatureProcessor(normalize={self.normalize}, max_len={self.max_len}, "
                f"use_tef={self.use_tef})")


@registry.register_processor("c2f_text_features")
class TextFeatureProcessor(BaseProcessor):
    """Token features (T, D) -> truncated to ``max_len`` and L2-normalised float32 tensor;
    a pooled (D,) vector is only normalised (``norm_style`` ``qd_detr``: ``x / (||x|| + 1e-5)``,
    ``mesm``: ``x / max(||x||, 1e-5)``)."""

    def __init__(self, normalize: bool = True, max_len: Optional[int] = None,
                 norm_style: str = "qd_detr"):
        super().__init__()
        self.eps, self.clamp = norm_params(norm_style, "text")
        self.norm_style = norm_style
        self.normalize = bool(normalize)
        self.max_len = None if max_len is None else int(max_len)
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len must be >= 1 or None, got {max_len}")

    def __call__(self, x: ArrayLike) -> torch.Tensor:
        return torch.from_numpy(prepare_text(_np(x), normalize=self.normalize, max_len=self.max_len,
                                             eps=self.eps, clamp=self.clamp))

    @classmethod
    def from_config(cls, cfg: Any = None) -> "TextFeatureProcessor":
        d = check_keys(cfg, {"name", "normalize", "max_len", "norm_style"},
                       "c2f_text_features processor")
        d.pop("name", None)
        return cls(**d)

    def __repr__(self) -> str:
        return f"TextFeatureProcessor(normalize={self.normalize}, max_len={self.max_len})"
