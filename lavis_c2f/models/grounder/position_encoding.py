"""Position encodings of the QD-DETR grounder.

Three encodings are used:

* :class:`MaskedSinePositionEmbedding` for video clips: a fixed sine/cosine code of the
  normalised cumulative clip index (padding-aware), as in DETR's 1-D variant.
* :class:`LearnedTextPositionEmbedding` for query tokens (only used when ``use_txt_pos``).
  Its parameter names (``position_embeddings``, ``LayerNorm``) match the official
  checkpoints, which always carry them even when they are unused.
* :func:`anchor_sine_embedding` for the decoder's (centre, width) anchors.

All tensors are batch-first.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
from torch import nn

from lavis_c2f.ops.dropout import Dropout
from lavis_c2f.ops.param_cache import frozen


@functools.lru_cache(maxsize=16)
def _frequencies(num_feats: int, temperature: float, device: torch.device) -> torch.Tensor:
    """(num_feats,) divisors ``temperature ** (2 * (i // 2) / num_feats)`` for i = 0..num_feats-1
    (a constant, built once per arguments, outside inference mode so that autograd may save
    it; callers never write to it)."""
    with torch.inference_mode(False), torch.no_grad():
        idx = torch.arange(num_feats, dtype=torch.float32, device=device)
        return temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / num_feats)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """(..., F) angles -> (..., F): sin of even channels and cos of odd channels, interleaved.

    Output channel 2k is ``sin(angles[..., 2k])`` and channel 2k+1 is ``cos(angles[..., 2k+1])``.
    """
    sin = angles[..., 0::2].sin()
    cos = angles[..., 1::2].cos()
    return torch.stack((sin, cos), dim=-1).flatten(-2)


class MaskedSinePositionEmbedding(nn.Module):
    """Sine position code of video clips, computed from the validity mask.

    The position of clip ``t`` is ``cumsum(mask)[t] / (cumsum(mask)[-1] + 1e-6) * scale``;
    the first valid clip therefore sits at ``scale / L`` (not 0) and padded clips at ``scale``.

    Args:
        num_feats: output width D (the transformer width).
        temperature: frequency base.
        scale: multiplier of the normalised position (2π).
    """

    def __init__(self, num_feats: int = 256, temperature: float = 10000.0,
                 scale: float = 2 * math.pi):
        super().__init__()
        if num_feats % 2:
            raise ValueError(f"num_feats must be even, got {num_feats}")
        self.num_feats = num_feats
        self.temperature = temperature
        self.scale = scale
        self._last: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (B, L) with 1 = valid -> (B, L, D) float32 position codes. Outside training
        without gradient, the codes of the last mask are kept and returned again for an equal
        mask (a ranked list's videos mostly share one)."""
        reuse = frozen(self)
        if reuse and self._last is not None and self._last[0].shape == mask.shape \
                and self._last[0].dtype == mask.dtype and self._last[0].device == mask.device \
                and torch.equal(self._last[0], mask):
            return self._last[1]
        pos = mask.cumsum(1, dtype=torch.float32)
        pos = pos / (pos[:, -1:] + 1e-6) * self.scale
        freqs = _frequencies(self.num_feats, self.temperature, mask.device)
        codes = _interleave_sin_cos(pos[:, :, None] / freqs)
        self._last = (mask.clone(), codes) if reuse else None
        return codes


class LearnedTextPositionEmbedding(nn.Module):
    """Learned absolute token positions: ``dropout(LayerNorm(x + P[t]))``.

    Note that, as in the official implementation, the output contains the token
    content ``x`` itself; the official model adds it to the text keys as a "position".

    Args:
        max_len: number of positions (``max_q_l``).
        hidden_dim: width D.
        dropout: dropout after the LayerNorm.
    """

    def __init__(self, max_len: int, hidden_dim: int, dropout: float = 0.1):
        super().__init__()
        self.position_embeddings = nn.Embedding(max_len, hidden_dim)
        self.LayerNorm = nn.LayerNorm(hidden_dim)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Lt, D) -> (B, Lt, D). Raises ``ValueError`` when Lt exceeds ``max_len``."""
        length = x.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"text length {length} exceeds the learned positions "
                             f"({self.position_embeddings.num_embeddings}, max_q_l)")
        ids = torch.arange(length, device=x.device)
        return self.dropout(self.LayerNorm(x + self.position_embeddings(ids)[None]))


def anchor_sine_embedding(anchors: torch.Tensor, dim: int = 256,
                          temperature: float = 10000.0) -> torch.Tensor:
    """Sine code of decoder anchors.

    Args:
        anchors: (..., 2) normalised (centre, width).
        dim: output width; the first ``dim // 2`` channels encode the centre, the rest
            the width, each with scale 2π and interleaved sin/cos.
    Returns:
        (..., dim) float32.
    """
    half = dim // 2
    freqs = _frequencies(half, temperature, anchors.device)
    centre = _interleave_sin_cos(anchors[..., 0:1] * (2 * math.pi) / freqs)
    width = _interleave_sin_cos(anchors[..., 1:2] * (2 * math.pi) / freqs)
    return torch.cat((centre, width), dim=-1)
