"""Multi-head attention modules of the grounder (batch-first).

Two flavours, both with parameter names that match the official QD-DETR checkpoints:

* :class:`PackedMultiheadAttention` holds packed input projections (``in_proj_weight``,
  ``in_proj_bias``) and ``out_proj``, like ``torch.nn.MultiheadAttention``; used by the
  text-to-video and encoder layers. When the query and key are the same tensor (the encoder's
  ``q = k = x + pos``) both come out of one matrix product.
* :class:`ProjectionFreeMultiheadAttention` holds **only** ``out_proj``: the caller
  projects queries, keys and values itself (DAB/conditional-DETR decoder). Queries and
  keys may be wider than values (the cross-attention concatenates content and position
  halves per head, so q·k runs over ``qk_dim`` while values have ``v_dim``).

Every flavour computes, per head, ``softmax(q k^T / sqrt(d_qk) + bias) v``. Masks become one
additive ``bias`` (:func:`attention_bias`, built once per layer stack): 0 where a key is
attended, the most negative finite value where it is blocked. A partially blocked row is
bit-for-bit the softmax of its open keys; a row whose keys are all blocked gives a uniform
(finite) distribution instead of NaN.

Kernels (:func:`attend`): with attention dropout active (training) the explicit path (scores,
softmax, dropout on the weights: the official dropout site, so that with ``dropout_kernel``
"torch" (``F.dropout``) a recorded official mask can be replayed), else torch's fused
``scaled_dot_product_attention`` when the score tensor would hold at least
:data:`FUSED_MIN_SCORES` values (it never materialises them; at 100 videos of 75 clips the
encoder attention runs about 2x faster), else the explicit path (fewer launches for small
tensors). The two agree to float32 rounding (about 1e-6). The input and output products run on
:func:`lavis_c2f.ops.linear.linear` (kernel ``linear_kernel``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lavis_c2f.ops.dropout import dropout as drop
from lavis_c2f.ops.linear import Linear, frozen_linear, inference_weights, linear
from lavis_c2f.ops.param_cache import CachingModule, frozen

#: score-tensor size (B * H * Lq * Lk) from which the fused kernel is used without dropout
FUSED_MIN_SCORES = 1 << 20


def attention_bias(key_padding_mask: Optional[torch.Tensor] = None,
                   attn_mask: Optional[torch.Tensor] = None,
                   dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """Additive attention bias of boolean masks (True = blocked).

    Args:
        key_padding_mask: (B, Lk) bool, True = ignore this key.
        attn_mask: (B, H, Lq, Lk) or (B, 1, Lq, Lk) bool, True = blocked.
        dtype: dtype of the bias (that of the scores).
    Returns:
        (B, 1 | H, 1 | Lq, Lk) tensor holding 0 (attend) or ``finfo(dtype).min`` (blocked), or
        None when no mask is given or (on CPU, where the check is free of a device sync)
        nothing is blocked.
    """
    blocked = None
    if key_padding_mask is not None:
        blocked = key_padding_mask.bool()[:, None, None, :]
    if attn_mask is not None:
        blocked = attn_mask.bool() if blocked is None else (blocked | attn_mask.bool())
    if blocked is None or (blocked.device.type == "cpu" and not bool(blocked.any())):
        return None
    bias = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)
    return bias.masked_fill_(blocked, torch.finfo(dtype).min)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
           bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
           training: bool = False, dropout_kernel: str = "torch") -> torch.Tensor:
    """Scaled dot-product attention over already projected inputs.

    Args:
        q: (B, Lq, Dqk) queries.
        k: (B, Lk, Dqk) keys.
        v: (B, Lk, Dv) values.
        num_heads: H; Dqk and Dv must be divisible by H. Scaling is ``(Dqk / H) ** -0.5``.
        bias: additive bias broadcastable to (B, H, Lq, Lk) (:func:`attention_bias`).
        dropout_p: dropout on the attention weights (only when ``training``), drawn with
            ``dropout_kernel`` (:mod:`lavis_c2f.ops.dropout`).
    Returns:
        (B, Lq, Dv).
    """
    bsz, len_q, dim_qk = q.shape
    len_k, dim_v = k.shape[1], v.shape[2]
    head_qk, head_v = dim_qk // num_heads, dim_v // num_heads
    scale = float(head_qk) ** -0.5
    qh = q.reshape(bsz, len_q, num_heads, head_qk).transpose(1, 2)
    kh = k.reshape(bsz, len_k, num_heads, head_qk).transpose(1, 2)
    vh = v.reshape(bsz, len_k, num_heads, head_v).transpose(1, 2)
    dropout = dropout_p > 0 and training
    if not dropout and bsz * num_heads * len_q * len_k >= FUSED_MIN_SCORES:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=scale)
    else:
        scores = torch.matmul(qh * scale, kh.transpose(-2, -1))  # (B, H, Lq, Lk)
        if bias is not None:
            scores = scores + bias
        weights = torch.softmax(scores, dim=-1)
        if dropout:
            weights = drop(weights, dropout_p, True, dropout_kernel)
        out = torch.matmul(weights, vh)  # (B, H, Lq, head_v)
    return out.transpose(1, 2).reshape(bsz, len_q, dim_v)


class PackedMultiheadAttention(CachingModule):
    """Attention with packed q/k/v input projections (state-dict compatible with
    ``torch.nn.MultiheadAttention``: ``in_proj_weight`` (3D, D), ``in_proj_bias`` (3D,),
    ``out_proj.weight`` (D, D), ``out_proj.bias`` (D,)).

    Args:
        embed_dim: D.
        num_heads: H (D divisible by H).
        dropout: dropout on attention weights.

    The input products run on the kernel named by ``linear_kernel``
    (:func:`lavis_c2f.ops.linear.set_linear_kernel`), the weight dropout on ``dropout_kernel``
    (:func:`lavis_c2f.ops.dropout.set_dropout_kernel`).
    """

    linear_kernel = "torch"
    dropout_kernel = "torch"

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        d = embed_dim
        self._rows = {"q": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d),
                      "qk": slice(0, 2 * d)}
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor],
                value: Optional[torch.Tensor], bias: Optional[torch.Tensor] = None,
                projected_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                ) -> torch.Tensor:
        """query (B, Lq, D), key/value (B, Lk, D); ``bias`` as in :func:`attend`;
        ``projected_kv``: the keys' and values' input projections when the caller computed
        them (then ``key``/``value`` are not read) -> (B, Lq, D)."""
        d = self.embed_dim
        if projected_kv is not None:
            q = self._project(query, "q")
            k, v = projected_kv
        elif query is key:  # self-attention with q = k: one product for both
            q, k = self._project(query, "qk").split(d, dim=-1)
            v = self._project(value, "v")
        else:
            q, k, v = self._project(query, "q"), self._project(key, "k"), self._project(value, "v")
        out = attend(q, k, v, self.num_heads, bias, self.dropout, self.training,
                     self.dropout_kernel)
        return self.out_proj(out)

    def _project(self, x: torch.Tensor, rows: str) -> torch.Tensor:
        """``x`` (..., D) through the in-projection rows ``rows`` (``q``, ``k``, ``v`` or
        ``qk``) -> (..., D or 2D); at inference with kernel ``onednn`` on the packed weights
        (:func:`~lavis_c2f.ops.linear.pack_weight`, once per weight version)."""
        w, b, kernel = self.in_proj_weight, self.in_proj_bias, self.linear_kernel
        part = self._rows[rows]
        if kernel == "onednn" and frozen(self):
            packed = self._cache.get("in_proj", (w, b), lambda: {
                name: inference_weights(w[s], b[s]) for name, s in self._rows.items()})
            return frozen_linear(x, packed[rows], kernel)
        return linear(x, w[part], b[part], kernel)


class ProjectionFreeMultiheadAttention(nn.Module):
    """Attention without input projections; only ``out_proj`` (Linear(v_dim, v_dim)).

    Args:
        qk_dim: width of queries and keys (e.g. 2·D in the decoder cross-attention).
        num_heads: H.
        v_dim: width of values and of the output.
        dropout: dropout on attention weights (drawn with ``dropout_kernel``).
    """

    dropout_kernel = "torch"

    def __init__(self, qk_dim: int, num_heads: int, v_dim: Optional[int] = None,
                 dropout: float = 0.0):
        super().__init__()
        v_dim = qk_dim if v_dim is None else v_dim
        if qk_dim % num_heads or v_dim % num_heads:
            raise ValueError(f"qk_dim {qk_dim} and v_dim {v_dim} must be divisible by "
                             f"num_heads {num_heads}")
        self.qk_dim, self.v_dim, self.num_heads, self.dropout = qk_dim, v_dim, num_heads, dropout
        self.out_proj = Linear(v_dim, v_dim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query (B, Lq, qk_dim), key (B, Lk, qk_dim), value (B, Lk, v_dim) -> (B, Lq, v_dim)."""
        out = attend(query, key, value, self.num_heads, bias, self.dropout, self.training,
                     self.dropout_kernel)
        return self.out_proj(out)
