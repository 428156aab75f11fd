"""QD-DETR (Moon et al., CVPR 2023): query-dependent DETR for moment retrieval and
highlight detection, written batch-first with typed keyword arguments.

State-dict keys and shapes are those of the official implementation
(github.com/wjun0830/QD-DETR @ 56c63b2), so official checkpoints load strictly; see
:mod:`lavis_c2f.models.grounder.checkpoint`.

Forward computation (inputs are the padded "Moment-retrieval batch", masks 1 = valid):

1. ``input_vid_proj`` / ``input_txt_proj``: ``n_input_proj`` x (LayerNorm -> Dropout -> Linear
   -> ReLU), no ReLU after the last layer.
2. Video positions: masked sine code; text positions: zeros (or the learned embedding when
   ``use_txt_pos``).
3. T2V layers (video attends to text), then encoder over [global token, video], decoder with
   ``num_queries`` anchors.
4. Heads: ``pred_logits`` (index 0 = foreground), ``pred_spans`` = sigmoid(span MLP +
   inverse_sigmoid(reference)) as normalised (cx, w), saliency =
   <saliency_proj1(video memory), saliency_proj2(global memory)> / sqrt(D).
5. Negative pairs (text rolled by one in the batch): a second T2V + encoder pass giving
   ``saliency_scores_neg``. It runs in training mode only, unless ``compute_neg=True``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lavis_c2f.models.grounder.position_encoding import (LearnedTextPositionEmbedding,
                                                         MaskedSinePositionEmbedding)
from lavis_c2f.models.grounder.transformer import (MLP, T2V_MASK_MODES, QDTransformer,
                                                   inverse_sigmoid)
from lavis_c2f.ops.dropout import Dropout
from lavis_c2f.ops.linear import Linear

NEG_SAMPLING_MODES = ("roll", "other_video")
ANCHOR_INITS = ("official", "spread")


def spread_anchor_logits(num_queries: int) -> torch.Tensor:
    """Seed-free anchor logits (Q, 2) with the official init's law, evenly spread.

    The official ``nn.Embedding(Q, 2)`` draws each anchor's (cx, w) logits from N(0, 1), so
    which reference windows a run starts from (and, since an anchor moves only when its query
    is matched, often ends with) depends on the seed. Here anchor i (1-based) takes
    ``Phi^-1(h_i)``, ``h_i`` the i-th point of the 2-D Halton sequence (bases 2 and 3, the
    unscrambled sequence without its first point, 0): the same N(0, 1) marginals, spread over
    the (cx, w) square instead of clumped, and the same for every seed.
    """
    from scipy.stats import norm, qmc

    h = qmc.Halton(d=2, scramble=False).random(num_queries + 1)[1:]
    return torch.from_numpy(norm.ppf(h)).float()


class LinearLayer(nn.Module):
    """LayerNorm(in) -> Dropout -> Linear -> optional ReLU; parameter names
    ``LayerNorm.*`` and ``net.1.*`` as in the official checkpoints.

    Args:
        in_dim, out_dim: widths. dropout: dropout before the Linear. relu: apply ReLU.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1, relu: bool = True):
        super().__init__()
        self.relu = relu
        self.LayerNorm = nn.LayerNorm(in_dim)
        self.net = nn.Sequential(Dropout(dropout), Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        x = self.net(self.LayerNorm(x))
        return torch.relu(x) if self.relu else x


def input_projection(in_dim: int, hidden_dim: int, n_layers: int, dropout: float) -> nn.Sequential:
    """``n_layers`` (1..3) :class:`LinearLayer` s, ReLU on all but the last one."""
    if not 1 <= n_layers <= 3:
        raise ValueError(f"n_input_proj must be 1, 2 or 3, got {n_layers}")
    dims = [in_dim] + [hidden_dim] * n_layers
    return nn.Sequential(*[LinearLayer(dims[i], dims[i + 1], dropout, relu=(i < n_layers - 1))
                           for i in range(n_layers)])


def negative_text_index(batch_size: int, mode: str = "roll", vids: Optional[List[Any]] = None,
                        generator: Optional[torch.Generator] = None):
    """Which sample's text is paired with each video for the negative pass.

    Args:
        batch_size: B.
        mode: ``"roll"`` (official QD-DETR: sample i gets text (i + 1) mod B) or
            ``"other_video"`` (MESM's ``sample_outclass_neg``: for each sample in order, the
            first of a ``torch.randperm`` of the texts whose ``vid`` differs, so the draw
            consumes the global torch generator as the official code does).
        vids: (B,) video ids for ``"other_video"`` (None: all samples from different videos).
    Returns:
        (index LongTensor (B,), valid BoolTensor (B,)); ``valid[i]`` is False when no proper
        negative exists for sample i (B = 1, or all samples share one video for
        ``"other_video"``); such pairs still get an index (i + 1) mod B.
    """
    roll = (torch.arange(batch_size) + 1) % batch_size
    if mode == "roll":
        # as in the official code, a rolled text from the same video still counts as a
        # negative; only B = 1 (a sample paired with its own text) is flagged invalid
        return roll, roll != torch.arange(batch_size)
    if mode != "other_video":
        raise ValueError(f"unknown neg_sampling '{mode}', expected one of {NEG_SAMPLING_MODES}")
    if vids is None:  # no ids: every sample is taken to come from its own video
        vids = list(range(batch_size))
    index = roll.clone()
    valid = torch.zeros(batch_size, dtype=torch.bool)
    for i in range(batch_size):
        candidates = [j for j in range(batch_size) if vids[j] != vids[i]]
        if candidates:
            pick = int(torch.randperm(len(candidates), generator=generator)[0])
            index[i] = candidates[pick]
            valid[i] = True
    return index, valid


class QDDETR(nn.Module):
    """QD-DETR grounder.

    Args:
        txt_dim: query token feature width Dt.
        vid_dim: clip feature width Dv **including** the 2 TEF columns when used.
        aud_dim: optional audio feature width, concatenated to the video features
            (official ``a_feat_dim``); 0 = none.
        hidden_dim: transformer width D (official 256).
        nheads: attention heads (8).
        enc_layers: [global, video] encoder layers (2).
        t2v_layers: T2V layers; None = ``enc_layers`` (the official code ties them).
        dec_layers: decoder layers (2).
        dim_feedforward: FFN width (1024).
        num_queries: moment queries Q (10).
        dropout: transformer dropout (0.1).
        input_dropout: dropout inside the input projections (0.5).
        n_input_proj: input projection depth (2).
        use_txt_pos: add the learned text position embedding (False).
        max_q_l: learned text positions (32).
        max_v_l: maximum clips (75; kept for reference/config, not a hard limit).
        aux_loss: also return every decoder layer's predictions (True).
        span_loss_type: only ``"l1"`` ((cx, w) regression) is supported; the official ``"ce"``
            branch cannot run (its head output does not broadcast with the anchors).
        contrastive_align_loss: build the official contrastive-alignment projections (only
            so that checkpoints trained with it load; see :mod:`.criterion`).
        contrastive_hdim: their width (64).
        t2v_mask_mode: ``"official"`` or ``"correct"`` (see :mod:`.transformer`); our own
            training uses ``"correct"`` so that a sample's outputs do not depend on its batch.
        neg_sampling: ``"roll"`` (official) or ``"other_video"`` (MESM) for the negative pass.
        global_token_masked: key-mask the global token in the [global, video] encoder (MESM's
            ``Transformer`` does; QD-DETR does not), see :meth:`QDTransformer.encode`.
        anchor_init: ``"official"`` (the anchors' (cx, w) logits drawn from N(0, 1) with the
            seed) or ``"spread"`` (:func:`spread_anchor_logits`: the same law on fixed, evenly
            spread points; the rest of the init, and its random draws, unchanged).
    """

    def __init__(self, *, txt_dim: int, vid_dim: int, aud_dim: int = 0, hidden_dim: int = 256,
                 nheads: int = 8, enc_layers: int = 2, t2v_layers: Optional[int] = None,
                 dec_layers: int = 2, dim_feedforward: int = 1024, num_queries: int = 10,
                 dropout: float = 0.1, input_dropout: float = 0.5, n_input_proj: int = 2,
                 use_txt_pos: bool = False, max_q_l: int = 32, max_v_l: int = 75,
                 aux_loss: bool = True, span_loss_type: str = "l1",
                 contrastive_align_loss: bool = False, contrastive_hdim: int = 64,
                 t2v_mask_mode: str = "correct", neg_sampling: str = "roll",
                 global_token_masked: bool = False, anchor_init: str = "official"):
        super().__init__()
        if span_loss_type != "l1":
            raise ValueError(f"span_loss_type '{span_loss_type}' is not supported: only 'l1' "
                             "works (the official 'ce' head cannot be combined with the anchors)")
        if t2v_mask_mode not in T2V_MASK_MODES:
            raise ValueError(f"unknown t2v_mask_mode '{t2v_mask_mode}', expected one of "
                             f"{T2V_MASK_MODES}")
        if anchor_init not in ANCHOR_INITS:
            raise ValueError(f"unknown anchor_init '{anchor_init}', expected one of {ANCHOR_INITS}")
        if neg_sampling not in NEG_SAMPLING_MODES:
            raise ValueError(f"unknown neg_sampling '{neg_sampling}', expected one of "
                             f"{NEG_SAMPLING_MODES}")
        for name, value in (("txt_dim", txt_dim), ("vid_dim", vid_dim), ("hidden_dim", hidden_dim),
                            ("num_queries", num_queries), ("enc_layers", enc_layers),
                            ("dec_layers", dec_layers)):
            if int(value) <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if hidden_dim % nheads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by nheads {nheads}")
        self.txt_dim, self.vid_dim, self.aud_dim = int(txt_dim), int(vid_dim), int(aud_dim)
        self.hidden_dim, self.num_queries = hidden_dim, num_queries
        self.span_loss_type, self.max_v_l, self.max_q_l = span_loss_type, max_v_l, max_q_l
        self.use_txt_pos, self.aux_loss = use_txt_pos, aux_loss
        self.n_input_proj = n_input_proj
        self.dim_feedforward, self.dropout_p, self.input_dropout_p = dim_feedforward, dropout, input_dropout
        self.t2v_mask_mode, self.neg_sampling = t2v_mask_mode, neg_sampling
        self.global_token_masked = bool(global_token_masked)
        self.contrastive_align_loss = contrastive_align_loss

        self.transformer = QDTransformer(
            d_model=hidden_dim, nhead=nheads, dim_feedforward=dim_feedforward, dropout=dropout,
            t2v_layers=enc_layers if t2v_layers is None else t2v_layers,
            enc_layers=enc_layers, dec_layers=dec_layers)
        self.position_embed = MaskedSinePositionEmbedding(hidden_dim)
        self.txt_position_embed = LearnedTextPositionEmbedding(max_q_l, hidden_dim, input_dropout)
        if not use_txt_pos:
            # unused but kept so official checkpoints load strictly; frozen so that DDP does
            # not wait for their gradients
            self.txt_position_embed.requires_grad_(False)
        self.span_embed = MLP(hidden_dim, hidden_dim, 2, 3)
        self.class_embed = Linear(hidden_dim, 2)
        self.query_embed = nn.Embedding(num_queries, 2)
        if anchor_init == "spread":
            with torch.no_grad():
                self.query_embed.weight.copy_(spread_anchor_logits(num_queries))
        self.input_txt_proj = input_projection(txt_dim, hidden_dim, n_input_proj, input_dropout)
        self.input_vid_proj = input_projection(vid_dim + aud_dim, hidden_dim, n_input_proj,
                                               input_dropout)
        if contrastive_align_loss:
            self.contrastive_align_projection_query = Linear(hidden_dim, contrastive_hdim)
            self.contrastive_align_projection_txt = Linear(hidden_dim, contrastive_hdim)
            self.contrastive_align_projection_vid = Linear(hidden_dim, contrastive_hdim)
        self.saliency_proj1 = Linear(hidden_dim, hidden_dim)
        self.saliency_proj2 = Linear(hidden_dim, hidden_dim)
        self.global_rep_token = nn.Parameter(torch.randn(hidden_dim))
        self.global_rep_pos = nn.Parameter(torch.randn(hidden_dim))

    # ------------------------------------------------------------------ pieces
    def check_inputs(self, src_txt: torch.Tensor, src_txt_mask: torch.Tensor,
                     src_vid: torch.Tensor, src_vid_mask: torch.Tensor) -> None:
        """Shape checks with clear messages (the official code calls ``exit(-1)`` on an
        empty text instead)."""
        if src_txt.dim() != 3 or src_vid.dim() != 3:
            raise ValueError(f"src_txt and src_vid must be (B, L, D), got {tuple(src_txt.shape)} "
                             f"and {tuple(src_vid.shape)}")
        if src_txt.shape[1] == 0:
            raise ValueError("src_txt has no tokens (padded text length 0): every query needs "
                             "at least one token")
        if src_vid.shape[1] == 0:
            raise ValueError("src_vid has no clips (padded video length 0)")
        if src_txt.shape[0] != src_vid.shape[0]:
            raise ValueError(f"batch sizes differ: src_txt {src_txt.shape[0]}, "
                             f"src_vid {src_vid.shape[0]}")
        if src_txt.shape[2] != self.txt_dim:
            raise ValueError(f"src_txt width {src_txt.shape[2]} != model txt_dim {self.txt_dim}")
        if src_vid.shape[2] != self.vid_dim + self.aud_dim:
            raise ValueError(f"src_vid width {src_vid.shape[2]} != model vid_dim "
                             f"{self.vid_dim + self.aud_dim} (TEF columns included)")
        if tuple(src_txt_mask.shape) != tuple(src_txt.shape[:2]):
            raise ValueError(f"src_txt_mask shape {tuple(src_txt_mask.shape)} != "
                             f"{tuple(src_txt.shape[:2])}")
        if tuple(src_vid_mask.shape) != tuple(src_vid.shape[:2]):
            raise ValueError(f"src_vid_mask shape {tuple(src_vid_mask.shape)} != "
                             f"{tuple(src_vid.shape[:2])}")

    def text_positions(self, txt: torch.Tensor) -> torch.Tensor:
        """(B, Lt, D) projected text -> (B, Lt, D) positions (zeros unless ``use_txt_pos``)."""
        return self.txt_position_embed(txt) if self.use_txt_pos else torch.zeros_like(txt)

    def encode_pair(self, vid: torch.Tensor, txt: torch.Tensor, pos_vid: torch.Tensor,
                    pos_txt: torch.Tensor, vid_pad: torch.Tensor, txt_pad: torch.Tensor,
                    mask_mode: str, decode: bool = True) -> Dict[str, torch.Tensor]:
        """T2V + encoder (+ decoder) for projected inputs.

        Args:
            vid: (B, Lv, D), txt: (B, Lt, D) projected features; pos_*: their positions;
            vid_pad / txt_pad: (B, Lv) / (B, Lt) bool True = padding.
            decode: also run the decoder (False for the negative pass).
        Returns:
            dict with ``vid_mem`` (B, Lv, D), ``global_mem`` (B, D), ``saliency`` (B, Lv) and,
            when decoding, ``hs`` (n_dec, B, Q, D) and ``references`` (n_dec, B, Q, 2).
        """
        fused = self.transformer.text_to_video(vid, txt, pos_vid, pos_txt, vid_pad, txt_pad,
                                               mask_mode)
        if decode:
            hs, refs, vid_mem, global_mem = self.transformer.encode_decode(
                fused, pos_vid, vid_pad, self.global_rep_token, self.global_rep_pos,
                self.query_embed.weight, self.global_token_masked)
        else:
            hs = refs = None
            vid_mem, global_mem = self.transformer.encode(
                fused, pos_vid, vid_pad, self.global_rep_token, self.global_rep_pos,
                self.global_token_masked)
        out = {"vid_mem": vid_mem, "global_mem": global_mem,
               "saliency": self.saliency(vid_mem, global_mem)}
        if decode:
            out["hs"], out["references"] = hs, refs
        return out

    def saliency(self, vid_mem: torch.Tensor, global_mem: torch.Tensor) -> torch.Tensor:
        """(B, Lv, D), (B, D) -> (B, Lv) clip saliency scores."""
        prod = self.saliency_proj1(vid_mem) * self.saliency_proj2(global_mem)[:, None]
        return prod.sum(-1) / math.sqrt(self.hidden_dim)

    def heads(self, hs: torch.Tensor, references: torch.Tensor) -> Dict[str, Any]:
        """Class and span heads for every decoder layer.

        Returns ``pred_logits`` (B, Q, 2), ``pred_spans`` (B, Q, 2) of the last layer and,
        with ``aux_loss``, ``aux_outputs`` (one dict per earlier layer).
        """
        logits = self.class_embed(hs)
        spans = (self.span_embed(hs) + inverse_sigmoid(references)).sigmoid()
        out: Dict[str, Any] = {"pred_logits": logits[-1], "pred_spans": spans[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_spans": b}
                                  for a, b in zip(logits[:-1], spans[:-1])]
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, src_txt: torch.Tensor, src_txt_mask: torch.Tensor, src_vid: torch.Tensor,
                src_vid_mask: torch.Tensor, src_aud: Optional[torch.Tensor] = None,
                compute_neg: Optional[bool] = None, t2v_mask_mode: Optional[str] = None,
                neg_index: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        """
        Args:
            src_txt: (B, Lt, Dt) query token features; src_txt_mask: (B, Lt) 1 = valid.
            src_vid: (B, Lv, Dv) clip features incl. TEF; src_vid_mask: (B, Lv) 1 = valid.
            src_aud: optional (B, Lv, Da) audio features (models built with ``aud_dim``).
            compute_neg: run the negative-pair pass; default = ``self.training``.
            t2v_mask_mode: override of ``self.t2v_mask_mode`` for this call.
            neg_index: (B,) which text each video is paired with in the negative pass
                (default: the official roll by one).
        Returns:
            ``pred_logits`` (B, Q, 2) (index 0 = foreground), ``pred_spans`` (B, Q, 2)
            normalised (cx, w), ``saliency_scores`` (B, Lv), ``video_mask`` (B, Lv),
            ``aux_outputs`` (list) when ``aux_loss``, ``saliency_scores_neg`` (B, Lv) when the
            negative pass runs, and the contrastive projections when built with them.
        """
        if src_aud is not None:
            if self.aud_dim == 0:
                raise ValueError("src_aud given but the model was built with aud_dim=0")
            src_vid = torch.cat([src_vid, src_aud], dim=2)
        self.check_inputs(src_txt, src_txt_mask, src_vid, src_vid_mask)
        mask_mode = self.t2v_mask_mode if t2v_mask_mode is None else t2v_mask_mode
        if compute_neg is None:
            compute_neg = self.training

        vid = self.input_vid_proj(src_vid)
        txt = self.input_txt_proj(src_txt)
        pos_vid = self.position_embed(src_vid_mask)
        pos_txt = self.text_positions(txt)
        vid_pad, txt_pad = ~src_vid_mask.bool(), ~src_txt_mask.bool()

        enc = self.encode_pair(vid, txt, pos_vid, pos_txt, vid_pad, txt_pad, mask_mode)
        out = self.heads(enc["hs"], enc["references"])
        out["saliency_scores"] = enc["saliency"]
        out["video_mask"] = src_vid_mask
        if self.contrastive_align_loss:
            out["proj_queries"] = F.normalize(
                self.contrastive_align_projection_query(enc["hs"][-1]), p=2, dim=-1)
            out["proj_vid_mem"] = F.normalize(
                self.contrastive_align_projection_vid(enc["vid_mem"]), p=2, dim=-1)
        if compute_neg:
            if neg_index is None:
                neg_index = negative_text_index(src_txt.shape[0], "roll")[0]
            neg_index = neg_index.to(src_txt.device)
            # the official negative pass reuses the positive pair's text positions
            neg = self.encode_pair(vid, txt[neg_index], pos_vid, pos_txt, vid_pad,
                                   txt_pad[neg_index], mask_mode, decode=False)
            out["saliency_scores_neg"] = neg["saliency"]
        return out
