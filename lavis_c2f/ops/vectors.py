"""Feature-vector conventions, written once: L2 normalisation (one epsilon) and TEF columns.

* ``l2_normalize(x) = x / (||x||_2 + eps)`` along the last axis, ``eps = 1e-5`` (the epsilon of
  Moment-DETR / QD-DETR's ``l2_normalize_np_array``, so official checkpoints get the inputs
  they were trained on). Features, queries and zero-shot cosines all use it.
* ``tef_columns(L)`` (L, 2): the temporal endpoint features ``[t / L, t / L + 1 / L]`` of clip
  ``t`` that Moment-DETR / QD-DETR append to the video features.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

L2_EPS = 1e-5

Array = Union[np.ndarray, torch.Tensor]


def l2_normalize(x: Array, eps: float = L2_EPS) -> Array:
    """``x / (||x||_2 + eps)`` along the last axis: a new float32 numpy array for array-likes,
    a tensor of ``x``'s dtype for a torch tensor."""
    if torch.is_tensor(x):
        return x / (x.norm(dim=-1, keepdim=True) + eps)
    x = np.asarray(x, dtype=np.float32)
    return (x / (np.linalg.norm(x, axis=-1, keepdims=True) + eps)).astype(np.float32, copy=False)


def tef_columns(length: int) -> np.ndarray:
    """(L, 2) temporal endpoint features ``[arange(L) / L, arange(L) / L + 1 / L]`` (float32)."""
    if length <= 0:
        return np.zeros((0, 2), dtype=np.float32)
    st = np.arange(length, dtype=np.float32) / np.float32(length)
    ed = st + np.float32(1.0) / np.float32(length)
    return np.stack([st, ed], axis=1).astype(np.float32)


__all__ = ["L2_EPS", "l2_normalize", "tef_columns"]
