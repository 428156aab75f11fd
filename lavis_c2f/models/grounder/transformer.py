"""The QD-DETR transformer: text-to-video (T2V) encoder, [global, video] encoder and a
DAB-style anchor decoder. Batch-first throughout.

Module and parameter names mirror the official checkpoints
(``t2v_encoder.layers.N.*``, ``encoder.layers.N.*``, ``decoder.layers.N.*``,
``decoder.{norm,query_scale,ref_point_head,bbox_embed,ref_anchor_head}.*``).

T2V attention mask modes
------------------------
The official T2V layer builds a per-sample mask "query position is padding AND key position
is padding" of shape (B, Lq, Lk) and tiles it head-wise with ``repeat(nhead, 1, 1)``.
PyTorch reads a 3-D mask at index ``b * nhead + h``, so (sample b, head h) receives the
mask of sample ``(b * nhead + h) % B``: one sample's output depends on the other samples
of the batch. ``t2v_mask_mode="official"`` reproduces that exactly (needed to match
official checkpoints' outputs on a padded batch); ``"correct"`` applies only the key
padding mask (what the official mask reduces to with a correct head ordering), which makes
every sample independent of its batch. At batch size 1 both modes are identical.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
from torch import nn

from lavis_c2f.models.grounder.attention import (PackedMultiheadAttention,
                                                 ProjectionFreeMultiheadAttention, attention_bias)
from lavis_c2f.models.grounder.position_encoding import anchor_sine_embedding
from lavis_c2f.models.grounder.prelu import PReLU
from lavis_c2f.ops.dropout import Dropout
from lavis_c2f.ops.linear import (InferenceWeights, Linear, concat_linear, frozen_linear,
                                  inference_weights)
from lavis_c2f.ops.param_cache import CachingModule, frozen, linear_params

T2V_MASK_MODES = ("official", "correct")


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """log(x / (1 - x)) after clamping x to [0, 1] and both terms to >= eps (official eps 1e-3)."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (``layers.N`` parameter names).

    Args:
        input_dim, hidden_dim, output_dim: widths.
        num_layers: number of Linear layers (>= 1).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., input_dim) -> (..., output_dim)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = torch.relu(x)
        return x


def cross_padding_mask(query_pad: torch.Tensor, key_pad: torch.Tensor, num_heads: int,
                       mode: str) -> Optional[torch.Tensor]:
    """Extra attention mask of the T2V layers.

    Args:
        query_pad: (B, Lq) bool, True = padding.
        key_pad: (B, Lk) bool, True = padding.
        num_heads: H.
        mode: ``"official"`` (batch-mixing head ordering of the official code) or
            ``"correct"`` (no extra mask; the key padding mask already covers it).
    Returns:
        (B, H, Lq, Lk) bool (True = blocked) or None.
    """
    if mode == "correct":
        return None
    if mode != "official":
        raise ValueError(f"unknown t2v_mask_mode '{mode}', expected one of {T2V_MASK_MODES}")
    bsz = query_pad.shape[0]
    per_sample = query_pad[:, :, None] & key_pad[:, None, :]  # (B, Lq, Lk)
    # (sample b, head h) reads the mask of sample (b * H + h) mod B
    source = (torch.arange(bsz, device=query_pad.device)[:, None] * num_heads
              + torch.arange(num_heads, device=query_pad.device)[None, :]) % bsz
    return per_sample[source]  # (B, H, Lq, Lk)


def t2v_bias(query_pad: torch.Tensor, key_pad: torch.Tensor, num_heads: int, mode: str,
             dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """Additive attention bias of a T2V layer stack: the key padding mask plus
    :func:`cross_padding_mask` (see :func:`~.attention.attention_bias`); shapes as there."""
    return attention_bias(key_pad, cross_padding_mask(query_pad, key_pad, num_heads, mode), dtype)


class T2VEncoderLayer(nn.Module):
    """Cross-modal layer: queries (video clips) attend to keys (text tokens), post-norm.

    ``a = q + attn(q + pos_q, k + pos_k, k)``; ``out = norm2(a + FFN(norm1(a)))`` with
    ``FFN = linear2(dropout(PReLU(linear1(.))))``. Keys pass through unchanged (callers keep them).

    Args:
        d_model, nhead, dim_feedforward, dropout: sizes and dropout.
        alt_ffn: also build a second FFN (``linear1_1``, ``linear2_1``, ``norm1_1``,
            ``norm2_1``; the PReLU ``activation`` is shared, as in MESM's
            ``T2V_TransformerEncoderLayer_TwoMLP``) selectable per call (MESM's unshared-MLP
            variant, ``share_MLP: false``).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 alt_ffn: bool = False):
        super().__init__()
        self.nhead = nhead
        self.self_attn = PackedMultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = PReLU()
        self.has_alt_ffn = alt_ffn
        if alt_ffn:
            self.linear1_1 = Linear(d_model, dim_feedforward)
            self.linear2_1 = Linear(dim_feedforward, d_model)
            self.norm1_1 = nn.LayerNorm(d_model)
            self.norm2_1 = nn.LayerNorm(d_model)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor,
                query_pos: Optional[torch.Tensor], key_pos: Optional[torch.Tensor],
                query_pad: torch.Tensor, key_pad: torch.Tensor, mask_mode: str = "correct",
                use_alt_ffn: bool = False, bias: Optional[torch.Tensor] = None,
                projected_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """
        Args:
            queries: (B, Lq, D); keys: (B, Lk, D) (also the values).
            query_pos / key_pos: (B, Lq, D) / (B, Lk, D) or None (zeros).
            query_pad / key_pad: (B, Lq) / (B, Lk) bool, True = padding.
            mask_mode: see :func:`cross_padding_mask`.
            use_alt_ffn: use the second FFN (requires ``alt_ffn=True``).
            bias: the stack's :func:`t2v_bias` when the caller computed it once for all
                layers (then the pads and ``mask_mode`` are not read again; pads None with
                bias None: nothing is blocked).
            projected_kv: the keys' and values' input projections ((B, Lk, D) each) when the
                caller computed them (:class:`T2VStack` at inference).
        Returns:
            (B, Lq, D) updated queries.
        """
        q = queries if query_pos is None else queries + query_pos
        if bias is None and key_pad is not None:
            bias = t2v_bias(query_pad, key_pad, self.nhead, mask_mode, q.dtype)
        if projected_kv is None:
            k = keys if key_pos is None else keys + key_pos
            attn = self.self_attn(q, k, keys, bias)
        else:
            attn = self.self_attn(q, None, None, bias, projected_kv)
        a = queries + self.dropout1(attn)
        if use_alt_ffn:
            if not self.has_alt_ffn:
                raise RuntimeError("this layer was built without the alternative FFN")
            h = self.linear2_1(self.dropout(self.activation(self.linear1_1(self.norm1_1(a)))))
            return self.norm2_1(a + self.dropout2(h))
        h = self.linear2(self.dropout(self.activation(self.linear1(self.norm1(a)))))
        return self.norm2(a + self.dropout2(h))


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer over [global, video] (q = k = x + pos, v = x), PReLU FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = PackedMultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = PReLU()

    def forward(self, x: torch.Tensor, pos: torch.Tensor, bias: Optional[torch.Tensor]
                ) -> torch.Tensor:
        """x, pos (B, L, D); bias: the key padding's :func:`~.attention.attention_bias` (or
        None) -> (B, L, D)."""
        qk = x + pos
        x = self.norm1(x + self.dropout1(self.self_attn(qk, qk, x, bias)))
        h = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm2(x + self.dropout2(h))


class DecoderLayer(CachingModule):
    """Conditional/DAB-DETR decoder layer (post-norm).

    Self-attention: q/k = content + position projections of (tgt, query_pos), v = sa_v_proj(tgt).
    Cross-attention per head: q = [content ‖ ca_qpos_sine_proj(sine)], k = [content ‖
    ca_kpos_proj(pos)] (2·D wide), values = ca_v_proj(memory). Only the first layer adds
    ``ca_qpos_proj(query_pos)`` / ``ca_kpos_proj(pos)`` to the content parts (and only it owns
    ``ca_qpos_proj``).

    Args:
        d_model, nhead, dim_feedforward, dropout: sizes.
        is_first: whether this is decoder layer 0.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 is_first: bool):
        super().__init__()
        self.nhead = nhead
        self.is_first = is_first
        self.sa_qcontent_proj = Linear(d_model, d_model)
        self.sa_qpos_proj = Linear(d_model, d_model)
        self.sa_kcontent_proj = Linear(d_model, d_model)
        self.sa_kpos_proj = Linear(d_model, d_model)
        self.sa_v_proj = Linear(d_model, d_model)
        self.self_attn = ProjectionFreeMultiheadAttention(d_model, nhead, d_model, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)

        self.ca_qcontent_proj = Linear(d_model, d_model)
        if is_first:
            self.ca_qpos_proj = Linear(d_model, d_model)
        self.ca_kcontent_proj = Linear(d_model, d_model)
        self.ca_kpos_proj = Linear(d_model, d_model)
        self.ca_v_proj = Linear(d_model, d_model)
        self.ca_qpos_sine_proj = Linear(d_model, d_model)
        self.cross_attn = ProjectionFreeMultiheadAttention(2 * d_model, nhead, d_model, dropout)

        self.linear1 = Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.activation = PReLU()

    def _per_head_concat(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B, L, D), (B, L, D) -> (B, L, 2D) with each head's halves side by side."""
        bsz, length, dim = a.shape
        h = self.nhead
        return torch.cat([a.reshape(bsz, length, h, dim // h), b.reshape(bsz, length, h, dim // h)],
                         dim=-1).reshape(bsz, length, 2 * dim)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_bias: Optional[torch.Tensor],
                k_pos: torch.Tensor, query_pos: torch.Tensor,
                query_sine: torch.Tensor) -> torch.Tensor:
        """
        Args:
            tgt: (B or 1, Q, D) decoder state (one row shared by the batch when it does not
                depend on the sample); memory: (B, Lv, D) video memory.
            memory_bias: the memory padding's :func:`~.attention.attention_bias` (or None);
            k_pos: (B, Lv, D) ``ca_kpos_proj`` of the video positions (:meth:`key_positions`).
            query_pos: (B or 1, Q, D) ``ref_point_head`` output; query_sine: (B or 1, Q, D)
                modulated anchor sine code.
        Returns:
            (B, Q, D).
        """
        tgt, q_content, q_sine = self.query_side(tgt, query_pos, query_sine)
        k_content, v = self.memory_side(memory, k_pos)
        return self.cross(tgt, q_content, q_sine, k_content, v, k_pos, memory_bias)

    def query_side(self, tgt: torch.Tensor, query_pos: torch.Tensor, query_sine: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention and the cross-attention query projections (shapes as
        :meth:`forward`) -> updated ``tgt``, ``q_content``, ``q_sine`` (each (B or 1, Q, D)).

        At inference (:func:`~lavis_c2f.ops.param_cache.frozen`) the products of one input run
        as one: ``tgt`` through [sa_qcontent; sa_kcontent; sa_v], ``query_pos`` through
        [sa_qpos; sa_kpos (; ca_qpos)], weights concatenated once per weight version."""
        d = tgt.shape[-1]
        if frozen(self):
            kernel = self.sa_v_proj.linear_kernel
            weights = self._cache.get("sa_content", linear_params(self._sa_content),
                                      lambda: concat_linear(self._sa_content))
            q, k, v = frozen_linear(tgt, weights, kernel).split(d, dim=-1)
            weights = self._cache.get("query_pos", linear_params(self._query_pos),
                                      lambda: concat_linear(self._query_pos))
            pos = frozen_linear(query_pos, weights, kernel).split(d, dim=-1)
            q, k = q + pos[0], k + pos[1]
            ca_qpos = pos[2] if self.is_first else None
        else:
            q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
            k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
            v = self.sa_v_proj(tgt)
            ca_qpos = self.ca_qpos_proj(query_pos) if self.is_first else None
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, v)))
        q_content = self.ca_qcontent_proj(tgt)
        if ca_qpos is not None:
            q_content = q_content + ca_qpos
        return tgt, q_content, self.ca_qpos_sine_proj(query_sine)

    def memory_side(self, memory: torch.Tensor, k_pos: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention key contents (``+ k_pos`` in the first layer) and values of the
        memory (B, Lv, D) -> (B, Lv, D) each (:meth:`AnchorDecoder.memory_products` computes
        those of all layers in one product at inference)."""
        k_content = self.ca_kcontent_proj(memory)
        if self.is_first:
            k_content = k_content + k_pos
        return k_content, self.ca_v_proj(memory)

    def cross(self, tgt: torch.Tensor, q_content: torch.Tensor, q_sine: torch.Tensor,
              k_content: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor,
              memory_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Cross-attention and FFN: the outputs of :meth:`query_side` ((B or 1, Q, D)) and of
        :meth:`memory_side` ((B, Lv, D)), ``k_pos`` (B, Lv, D) -> (B, Q, D)."""
        bsz = k_content.shape[0]
        if tgt.shape[0] != bsz:  # a shared query side meets the batch here
            tgt, q_content, q_sine = (t.expand(bsz, -1, -1) for t in (tgt, q_content, q_sine))
        q = self._per_head_concat(q_content, q_sine)
        k = self._per_head_concat(k_content, k_pos)
        tgt = self.norm2(tgt + self.dropout2(self.cross_attn(q, k, v, memory_bias)))
        h = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(h))

    @property
    def _sa_content(self) -> List[nn.Linear]:
        return [self.sa_qcontent_proj, self.sa_kcontent_proj, self.sa_v_proj]

    @property
    def _query_pos(self) -> List[nn.Linear]:
        first = [self.ca_qpos_proj] if self.is_first else []
        return [self.sa_qpos_proj, self.sa_kpos_proj] + first

    def key_positions(self, pos: torch.Tensor, inverse: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
        """``ca_kpos_proj`` of the video positions: ``pos`` (B, Lv, D), or (U, Lv, D) distinct
        rows with ``inverse`` (B,) the row of each sample -> (B, Lv, D)."""
        k_pos = self.ca_kpos_proj(pos)
        return k_pos if inverse is None else k_pos[inverse]


class LayerStack(nn.Module):
    """A named list of layers (``layers.N``), the container used for the encoders."""

    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def __len__(self) -> int:
        return len(self.layers)


class T2VStack(CachingModule, LayerStack):
    """Stacked :class:`T2VEncoderLayer`\ s: the queries pass layer by layer, every layer
    attends to the same keys (they pass through unchanged).

    The bias (:func:`t2v_bias`) is built once per call. At inference
    (:func:`~lavis_c2f.ops.param_cache.frozen`) the keys' and values' input projections of
    all layers run as products over the stacked weights (concatenated once per weight
    version): ``(keys + key_pos) [Wk_0; Wk_1; ...]^T`` and ``keys [Wv_0; Wv_1; ...]^T``, or
    one product ``keys [Wk_0; Wv_0; Wk_1; ...]^T`` when ``key_pos`` is None.
    """

    def forward(self, queries: torch.Tensor, keys: torch.Tensor,
                query_pos: Optional[torch.Tensor], key_pos: Optional[torch.Tensor],
                query_pad: torch.Tensor, key_pad: torch.Tensor, mask_mode: str,
                use_alt_ffn: bool = False) -> torch.Tensor:
        """queries (B, Lq, D) attend to keys (B, Lk, D) in every layer; the other arguments
        as :meth:`T2VEncoderLayer.forward` -> (B, Lq, D)."""
        bias = t2v_bias(query_pad, key_pad, self.layers[0].nhead, mask_mode, queries.dtype)
        kvs: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(self.layers)
        if frozen(self):
            kvs = self.key_values(keys, key_pos)
        for layer, kv in zip(self.layers, kvs):
            queries = layer(queries, keys, query_pos, key_pos, None, None, mask_mode,
                            use_alt_ffn=use_alt_ffn, bias=bias, projected_kv=kv)
        return queries

    def key_values(self, keys: torch.Tensor, key_pos: Optional[torch.Tensor]
                   ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's (k, v) input projections of ``keys`` (+ ``key_pos`` for k), (B, Lk, D)
        each, from one or two products over the stacked weights."""
        attns = [layer.self_attn for layer in self.layers]
        d, n, kernel = attns[0].embed_dim, len(attns), attns[0].linear_kernel
        params = [p for a in attns for p in (a.in_proj_weight, a.in_proj_bias)]

        def stacked(parts: Tuple[slice, ...]) -> InferenceWeights:
            return inference_weights(
                torch.cat([a.in_proj_weight.detach()[s] for a in attns for s in parts]),
                torch.cat([a.in_proj_bias.detach()[s] for a in attns for s in parts]))

        k_rows, v_rows = slice(d, 2 * d), slice(2 * d, 3 * d)
        if key_pos is None:
            weights = self._cache.get("kv", params, lambda: stacked((slice(d, 3 * d),)))
            kv = frozen_linear(keys, weights, kernel).split(d, dim=-1)
            return [(kv[2 * i], kv[2 * i + 1]) for i in range(n)]
        weights = self._cache.get("k", params, lambda: stacked((k_rows,)))
        k = frozen_linear(keys + key_pos, weights, kernel).split(d, dim=-1)
        weights = self._cache.get("v", params, lambda: stacked((v_rows,)))
        v = frozen_linear(keys, weights, kernel).split(d, dim=-1)
        return list(zip(k, v))


class AnchorDecoder(CachingModule):
    """DAB-style decoder refining (centre, width) anchors layer by layer.

    Args:
        d_model, nhead, dim_feedforward, dropout: sizes.
        num_layers: number of decoder layers.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"dec_layers must be >= 1, got {num_layers}")
        self.d_model = d_model
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, nhead, dim_feedforward, dropout, is_first=(i == 0))
            for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, d_model, 2)
        self.bbox_embed = MLP(d_model, d_model, 2, 3)
        self.ref_anchor_head = MLP(d_model, d_model, 1, 2)

    def forward(self, memory: torch.Tensor, memory_pad: torch.Tensor, pos: torch.Tensor,
                anchors_unsigmoid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            memory: (B, Lv, D); memory_pad: (B, Lv) bool True = padding; pos: (B, Lv, D) the
                video positions, a function of the padding row (the masked sine code), so
                samples with the same padding share their key-position projections.
            anchors_unsigmoid: (Q, 2) learned anchors before the sigmoid.
        Returns:
            hs: (n_layers, B, Q, D), each layer's output after the shared ``norm``;
            references: (n_layers, B, Q, 2), the anchor each layer started from (the first
            is ``sigmoid(anchors)``, later ones carry gradients through ``bbox_embed``).
        """
        bsz, n_queries = memory.shape[0], anchors_unsigmoid.shape[0]
        # the first layer's queries depend on no sample (zero state, learned anchors): without
        # dropout (outside training) they are computed once and shared by the batch
        q_bsz = bsz if self.training else 1
        ref = anchors_unsigmoid.sigmoid()[None].expand(q_bsz, -1, -1)
        tgt = memory.new_zeros(q_bsz, n_queries, self.d_model)
        references: List[torch.Tensor] = [ref.expand(bsz, -1, -1)]
        outputs: List[torch.Tensor] = []
        last = len(self.layers) - 1
        memory_bias = attention_bias(memory_pad, None, memory.dtype)
        # the positions are a function of the padding row: their projections are computed once
        # per distinct padding row (any sample with that row stands for it)
        pos_rows, inverse = pos, None
        if bsz > 1:
            rows, inverse = torch.unique(memory_pad, dim=0, return_inverse=True)
            if rows.shape[0] < bsz:
                sample_of = torch.empty(rows.shape[0], dtype=torch.long, device=pos.device)
                pos_rows = pos[sample_of.scatter_(0, inverse, torch.arange(bsz, device=pos.device))]
            else:
                inverse = None
        infer = frozen(self)
        if infer:
            memory_kv, key_pos = self.memory_products(memory, pos_rows, inverse)
        for i, layer in enumerate(self.layers):
            if infer and i == 0:
                tgt, q_content, q_sine = self._cache.get(
                    "first_queries", self._first_query_params(anchors_unsigmoid),
                    lambda: layer.query_side(tgt, *self.query_codes(0, ref, tgt)))
                k_pos = key_pos[0]
                k_content, v = memory_kv[0] + k_pos, memory_kv[1]
            elif infer:
                tgt, q_content, q_sine = layer.query_side(tgt, *self.query_codes(i, ref, tgt))
                k_pos, k_content, v = key_pos[i], memory_kv[2 * i], memory_kv[2 * i + 1]
            else:
                tgt, q_content, q_sine = layer.query_side(tgt, *self.query_codes(i, ref, tgt))
                k_pos = layer.key_positions(pos_rows, inverse)
                k_content, v = layer.memory_side(memory, k_pos)
            tgt = layer.cross(tgt, q_content, q_sine, k_content, v, k_pos, memory_bias)
            if i < last:
                new_ref = (self.bbox_embed(tgt) + inverse_sigmoid(ref)).sigmoid()
                references.append(new_ref)
                ref = new_ref.detach()
            outputs.append(self.norm(tgt))
        return torch.stack(outputs), torch.stack(references)


    def query_codes(self, i: int, ref: torch.Tensor, tgt: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s query positions and modulated sine code from the anchors ``ref``
        (B or 1, Q, 2) and the state ``tgt`` (B or 1, Q, D) -> (B or 1, Q, D) each:
        ``query_pos = ref_point_head(sine(ref))``, ``sine(ref) * query_scale(tgt)`` (layers
        after the first) ``* sigmoid(ref_anchor_head(tgt)) / w_ref``."""
        sine = anchor_sine_embedding(ref, self.d_model)
        query_pos = self.ref_point_head(sine)
        if i > 0:
            sine = sine * self.query_scale(tgt)
        width_mod = self.ref_anchor_head(tgt).sigmoid()[..., 0] / ref[..., 1]
        return query_pos, sine * width_mod[..., None]

    def memory_products(self, memory: torch.Tensor, pos: torch.Tensor,
                        inverse: Optional[torch.Tensor]) -> Tuple[List[torch.Tensor],
                                                                  List[torch.Tensor]]:
        """Every layer's cross-attention key contents and values of ``memory`` (B, Lv, D) in one
        product, and every layer's ``ca_kpos_proj`` of ``pos`` (rows as
        :meth:`DecoderLayer.key_positions`) in another (inference: weights concatenated once
        per weight version) -> [k_content_0, v_0, k_content_1, ...] and [k_pos_0, ...], each
        (B, Lv, D)."""
        kv_layers = [m for layer in self.layers for m in (layer.ca_kcontent_proj, layer.ca_v_proj)]
        pos_layers = [layer.ca_kpos_proj for layer in self.layers]
        kernel = self.layers[0].ca_v_proj.linear_kernel
        weights = self._cache.get("memory", linear_params(kv_layers),
                                  lambda: concat_linear(kv_layers))
        memory_kv = list(frozen_linear(memory, weights, kernel).split(self.d_model, dim=-1))
        weights = self._cache.get("key_pos", linear_params(pos_layers),
                                  lambda: concat_linear(pos_layers))
        key_pos = frozen_linear(pos, weights, kernel)
        if inverse is not None:
            key_pos = key_pos[inverse]
        return memory_kv, list(key_pos.split(self.d_model, dim=-1))

    def _first_query_params(self, anchors_unsigmoid: torch.Tensor) -> List[torch.Tensor]:
        """What the first layer's query side depends on: the anchors, the query-code heads and
        the first layer's self-attention and query projections."""
        first = self.layers[0]
        modules = [self.ref_point_head, self.ref_anchor_head, first.self_attn, first.norm1,
                   first.ca_qcontent_proj, first.ca_qpos_sine_proj] + first._sa_content \
            + first._query_pos
        return [anchors_unsigmoid] + [p for m in modules for p in m.parameters()]

class QDTransformer(nn.Module):
    """T2V encoder + [global, video] encoder + anchor decoder.

    Args:
        d_model: D. nhead: H. dim_feedforward, dropout: layer sizes.
        t2v_layers, enc_layers, dec_layers: layer counts (official: t2v_layers == enc_layers).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 1024,
                 dropout: float = 0.1, t2v_layers: int = 2, enc_layers: int = 2,
                 dec_layers: int = 2):
        super().__init__()
        self.d_model, self.nhead = d_model, nhead
        self.t2v_encoder = T2VStack(
            T2VEncoderLayer(d_model, nhead, dim_feedforward, dropout), t2v_layers)
        self.encoder = LayerStack(EncoderLayer(d_model, nhead, dim_feedforward, dropout),
                                  enc_layers)
        self.decoder = AnchorDecoder(d_model, nhead, dim_feedforward, dropout, dec_layers)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Xavier-uniform for every matrix (as the official code, after which the last
        ``bbox_embed`` layer keeps a zero bias)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.decoder.bbox_embed.layers[-1].bias)

    def text_to_video(self, vid: torch.Tensor, txt: torch.Tensor, pos_vid: torch.Tensor,
                      pos_txt: Optional[torch.Tensor], vid_pad: torch.Tensor,
                      txt_pad: torch.Tensor, mask_mode: str) -> torch.Tensor:
        """Run the T2V layers: vid (B, Lv, D) attends to txt (B, Lt, D) -> (B, Lv, D)."""
        return self.t2v_encoder(vid, txt, pos_vid, pos_txt, vid_pad, txt_pad, mask_mode)

    def encode(self, vid: torch.Tensor, pos_vid: torch.Tensor, vid_pad: torch.Tensor,
               global_token: torch.Tensor, global_pos: torch.Tensor,
               global_masked: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encoder over [global, video].

        Args:
            vid: (B, Lv, D) T2V output; pos_vid: (B, Lv, D); vid_pad: (B, Lv) bool.
            global_token, global_pos: (D,) learned global token and its position.
            global_masked: key-mask the global token (MESM: no clip attends to it, while its
                own row still attends to the valid clips); QD-DETR keeps it valid.
        Returns:
            video memory (B, Lv, D), global memory (B, D).
        """
        bsz = vid.shape[0]
        x = torch.cat([global_token.expand(bsz, 1, -1), vid], dim=1)
        pos = torch.cat([global_pos.expand(bsz, 1, -1), pos_vid], dim=1)
        first = (vid_pad.new_ones if global_masked else vid_pad.new_zeros)(bsz, 1)
        bias = attention_bias(torch.cat([first, vid_pad], dim=1), None, x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, pos, bias)
        return x[:, 1:], x[:, 0]

    def encode_decode(self, vid: torch.Tensor, pos_vid: torch.Tensor, vid_pad: torch.Tensor,
                      global_token: torch.Tensor, global_pos: torch.Tensor,
                      anchors_unsigmoid: torch.Tensor, global_masked: bool = False
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder over [global, video] (:meth:`encode`) then the decoder.

        Args:
            anchors_unsigmoid: (Q, 2); the others as :meth:`encode` (``pos_vid`` must be the
                position code of ``vid_pad``, see :meth:`AnchorDecoder.forward`).
        Returns:
            hs (n_dec, B, Q, D), references (n_dec, B, Q, 2), video memory (B, Lv, D),
            global memory (B, D).
        """
        vid_mem, global_mem = self.encode(vid, pos_vid, vid_pad, global_token, global_pos,
                                          global_masked)
        hs, refs = self.decoder(vid_mem, vid_pad, pos_vid, anchors_unsigmoid)
        return hs, refs, vid_mem, global_mem
