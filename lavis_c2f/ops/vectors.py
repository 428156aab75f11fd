"""Feature-vector conventions, written once: L2 normalisation (one rule, one epsilon per code base) and TEF columns.

* ``l2_normalize(x) = x / (||x||_2 + eps)`` along the last axis, ``eps = 1e-5`` (the epsilon of
  Moment-DETR / QD-DETR's ``l2_normalize_np_array``, so official checkpoints get the inputs
  they were trained on). Features, queries and zero-shot cosines all use it.
  With ``clamp`` it is ``x / max(||x||_2, eps)`` (``torch.nn.functional.normalize``), the rule of
  MESM's feature path; :func:`norm_params` gives the ``(eps, clamp)`` of each ``norm_style``:
  ``qd_detr`` = (1e-5, no clamp) for video and text; ``mesm`` = (1e-12, clamp) for video
  (``F.normalize`` in MESM's ``get_video_feat``) and (1e-5, clamp) for text.
* ``tef_columns(L)`` (L, 2): the temporal endpoint features ``[t / L, t / L + 1 / L]`` of clip
  ``t`` that Moment-DETR / QD-DETR append to the video features.
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch

L2_EPS = 1e-5
NORM_STYLES = ("qd_detr", "mesm")
_NORM = {"qd_detr": {"video": (L2_EPS, False), "text": (L2_EPS, False)},
         "mesm": {"video": (1e-12, True), "text": (1e-5, True)}}

Array = Union[np.ndarray, torch.Tensor]


def l2_normalize(x: Array, eps: float = L2_EPS, clamp: bool = False) -> Array:
    """``x / (||x||_2 + eps)`` along the last axis, or ``x / max(||x||_2, eps)`` with ``clamp``:
    a new float32 numpy array for array-likes, a tensor of ``x``'s dtype for a torch tensor."""
    if torch.is_tensor(x):
        norm = x.norm(dim=-1, keepdim=True)
        return x / (norm.clamp_min(eps) if clamp else norm + eps)
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    denom = np.maximum(norm, np.float32(eps)) if clamp else norm + eps
    return (x / denom).astype(np.float32, copy=False)


def norm_params(style: str, kind: str) -> Tuple[float, bool]:
    """``(eps, clamp)`` of :func:`l2_normalize` for a :data:`NORM_STYLES` style and ``kind``
    "video" or "text"."""
    if style not in _NORM:
        raise ValueError(f"unknown norm_style {style!r}, expected one of {NORM_STYLES}")
    return _NORM[style][kind]


def tef_columns(length: int) -> np.ndarray:
    """(L, 2) temporal endpoint features ``[arange(L) / L, arange(L) / L + 1 / L]`` (float32)."""
    if length <= 0:
        return np.zeros((0, 2), dtype=np.float32)
    st = np.arange(length, dtype=np.float32) / np.float32(length)
    ed = st + np.float32(1.0) / np.float32(length)
    return np.stack([st, ed], axis=1).astype(np.float32)


__all__ = ["L2_EPS", "NORM_STYLES", "l2_normalize", "norm_params", "tef_columns"]
