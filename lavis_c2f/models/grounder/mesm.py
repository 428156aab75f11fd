"""MESM (Liu et al., AAAI 2024, "Towards Balanced Alignment: Modal-Enhanced Semantic Modeling
for Video Moment Retrieval") on top of :class:`~.model.QDDETR`, computing what the official
code (github.com/lntzm/MESM @ 8501bde) computes: official checkpoints load
(:func:`~.checkpoint.load_mesm_checkpoint`) and reproduce its outputs to 1e-6.

Two parts, each switchable:

* **FW-MESM** (``rec_fw``): an *enhancement encoder* (T2V-style layers, ``num_recfw_layers``)
  rebuilds the projected video clips from the query words before the aligner (the QD-DETR
  T2V layers); in training the same layers (or a second FFN when ``fw_share_ffn=False``)
  reconstruct the query words from the clips of the ground truth (``gt_clip_mask``), with
  ``max(floor(n_tokens / 3), 1)`` tokens masked (drawn by :func:`choose_masked_words` with
  MESM's part-of-speech weights, or inverse frequency, see :mod:`.vocab`) and
  out-of-vocabulary tokens replaced by a learned "unknown" vector; ``output_txt_proj``
  classifies each word into ``num_word_classes`` classes and the loss is a label-smoothed NLL.
  The replacement is done on the word features (as MESM does; with a runtime text tower
  ``fw_mask_level: tokens`` replaces the token embeddings inside the tower instead).
* **SS-MESM** (``rec_ss``): each query's sentence slot among the sentences of its group is
  replaced by a learned mask token and rebuilt by ``ss_reconstructor`` (T2V-style layers, no
  positions) from the group video (``ss_group_video``: the query's own video, or the valid clips
  of every member concatenated as MESM does for QVHighlights); the rebuilt, normalised token is
  prepended to the query's words. The slots do not attend to each other, so only the mask token
  and the group video shape it. In training a supervised contrastive loss aligns the mean
  ground-truth clip feature of sample i with the mean (expanded) word feature of sample j,
  positives being pairs of one group whose merged moments have gIoU >= ``iou_gamma``.

The encoder over [global, video] key-masks the global token (``global_token_masked``), and the
negative pass pairs each video with the text of a random query of another group (in eval mode
too when ``compute_neg``).

Groups are the ``vids`` given to :meth:`MESMQDDETR.forward` (the LAVIS model passes the
batch's ``group``, MESM's YouTube/video id of its grouped items, else ``vid``). MESM's loader
puts all queries of a video in one item (``datasets.*.group_by``); with per-query batches most
groups hold one query, which is still well defined. At inference the registered model and the
predictor make every query its own group (in the corpus setting the other queries of a video
are unknown) unless ``predict_with_groups``.

MESM's ``output_sent_proj`` is kept (frozen; no loss uses it) so that checkpoints load
strictly. The GloVe text encoder is not built: GloVe word features come precomputed.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lavis_c2f.models.grounder.criterion import SetCriterion
from lavis_c2f.models.grounder.model import LinearLayer, QDDETR, negative_text_index
from lavis_c2f.models.grounder.text_encoder import (REPLACE_MASK, REPLACE_UNKNOWN,
                                                    RuntimeTextEncoder)
from lavis_c2f.models.grounder.transformer import T2VEncoderLayer, T2VStack
from lavis_c2f.ops.linear import Linear
from lavis_c2f.ops.spans import generalized_temporal_iou, span_cxw_to_xx


# ---------------------------------------------------------------------- target helpers
def gt_clip_mask(span_labels: Sequence[torch.Tensor], durations: Sequence[float],
                 clip_lengths: Sequence[float], n_valid: Sequence[int], num_clips: int
                 ) -> torch.Tensor:
    """Clips covered by the ground-truth windows.

    Args:
        span_labels: B tensors (N_i, 2) normalised (cx, w) (normalised by ``durations``).
        durations, clip_lengths: seconds per sample; n_valid: valid clips per sample.
        num_clips: Lv (padded length).
    Returns:
        (B, Lv) bool: clip j (< n_valid) is True when [j·cl, (j+1)·cl] overlaps a window by
        more than 1e-6 s; a window overlapping no clip marks the clip holding its centre.
    """
    out = torch.zeros(len(span_labels), num_clips, dtype=torch.bool)
    for i, spans in enumerate(span_labels):
        n, cl, dur = int(n_valid[i]), float(clip_lengths[i]), float(durations[i])
        if spans.numel() == 0 or n == 0:
            continue
        starts = torch.arange(n, dtype=torch.float64) * cl
        ends = starts + cl
        for st, ed in (span_cxw_to_xx(spans.double().cpu()) * dur).tolist():
            overlap = torch.minimum(ends, torch.tensor(ed)) - torch.maximum(starts, torch.tensor(st))
            hit = overlap > 1e-6
            if not hit.any():
                centre = min(max(int(((st + ed) / 2) // cl), 0), n - 1)
                hit[centre] = True
            out[i, :n] |= hit
    return out


def merged_moments(span_labels: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per sample the hull [min start, max end] of its normalised windows.

    Returns ((B, 2) (st, ed), (B,) bool has-windows).
    """
    hull = torch.zeros(len(span_labels), 2)
    valid = torch.zeros(len(span_labels), dtype=torch.bool)
    for i, spans in enumerate(span_labels):
        if spans.numel():
            xx = span_cxw_to_xx(spans.float().cpu())
            hull[i] = torch.stack([xx[:, 0].min(), xx[:, 1].max()])
            valid[i] = True
    return hull, valid


def video_groups(vids: Optional[Sequence[Any]], batch_size: int) -> List[List[int]]:
    """For each sample, the batch indices of the samples sharing its video (batch order)."""
    if vids is None:
        return [[i] for i in range(batch_size)]
    if len(vids) != batch_size:
        raise ValueError(f"{len(vids)} vids for a batch of {batch_size}")
    members: Dict[Any, List[int]] = {}
    for i, v in enumerate(vids):
        members.setdefault(v, []).append(i)
    return [members[v] for v in vids]


# ---------------------------------------------------------------------- model
SS_GROUP_VIDEOS = ("own", "concat")
FW_MASK_LEVELS = ("features", "tokens")


def choose_masked_words(weights: torch.Tensor, words_mask: torch.Tensor, ratio: float = 1.0 / 3.0
                        ) -> torch.Tensor:
    """Positions to mask for FW-MESM, drawn as MESM's ``_mask_words`` draws them.

    For a query of ``l`` valid tokens (start/end included; ``l <= 1`` masks nothing),
    ``k = max(floor(l * ratio), 1)`` positions among ``0 .. l-1`` are drawn without
    replacement by ``numpy.random.choice`` (numpy's global legacy generator, like the official
    code, so ``np.random.seed`` reproduces its picks) with
    ``p = weights[:l] / sum(weights)`` (L1-normalised in float32); ``k`` is capped at the
    number of non-zero weights (where the official code raises).

    Args:
        weights: (B, Lt) non-negative masking weights (0 = never masked).
        words_mask: (B, Lt) 1 = valid token.
    Returns:
        (B, Lt) bool.
    """
    chosen = torch.zeros(words_mask.shape, dtype=torch.bool)
    p_all = F.normalize(weights.detach().float().cpu().clamp(min=0), dim=1, p=1)
    lengths = words_mask.detach().cpu().bool().sum(1).tolist()
    for i, length in enumerate(lengths):
        if length <= 1:
            continue
        p = p_all[i, :length].numpy()
        k = min(max(int(length * ratio + 1e-9), 1), int((p > 0).sum()))
        if k > 0:
            chosen[i, np.random.choice(np.arange(length), k, replace=False, p=p)] = True
    return chosen.to(words_mask.device)


class MESMQDDETR(QDDETR):
    """QD-DETR with MESM's frame-word and segment-sentence enhancement.

    Args (in addition to :class:`QDDETR`'s; ``neg_sampling`` defaults to ``other_video``
    and ``global_token_masked`` to True, as in MESM):
        rec_fw: enable FW-MESM (enhancement encoder + word reconstruction).
        rec_ss: enable SS-MESM (sentence reconstruction token + contrastive loss).
        num_recfw_layers: enhancement encoder depth (MESM 2).
        num_recss_layers: sentence reconstructor depth (MESM 4).
        fw_share_ffn: the word-reconstruction pass reuses the enhancement FFNs (MESM
            ``share_MLP``, True in its QVHighlights config).
        vocab_size: V.
        num_word_classes: classes of the word classifier (MESM: V + 3 with the CLIP
            tokenizer (unknown, start, end), V + 1 with GloVe (unknown)); default V + 3.
        fw_mask_ratio: fraction of a query's tokens to mask (MESM 1/3, at least one).
        ss_group_video: the video a group's sentences are rebuilt from: ``"own"`` (the
            query's video; MESM's Charades-STA/TACoS path, whose groups share one video) or
            ``"concat"`` (the valid clips of every group member concatenated in batch order;
            MESM's QVHighlights path, whose group members are segments of one YouTube video).
        fw_mask_level: with a runtime text encoder, where masked/unknown words are replaced:
            ``"features"`` (MESM: the projected tower outputs at those token positions) or
            ``"tokens"`` (the token embeddings inside the frozen tower, so the other words'
            features do not see the masked word; a documented variant).
        mesm_input_dropout: draw input dropout where MESM draws it: FW's mask/unknown tokens
            are projected once per batch ((1, 1, Dt): one mask shared by every word each
            replaces) and replace rows of the grounding pass's projected words, and SS projects
            its group video again from the input features and each group's sentences after
            expanding them (masks of their own). False: FW replaces feature rows and projects
            them again (a mask per row), SS takes the grounding pass's projected video and
            projects each sentence once. Equal without dropout; needs ``fw_mask_level``
            ``"features"``.
        text_encoder: optional frozen :class:`RuntimeTextEncoder`; then ``txt_dim`` must be
            its hidden size and the text comes as token ids instead of features.
    """

    def __init__(self, *, rec_fw: bool = True, rec_ss: bool = True, num_recfw_layers: int = 2,
                 num_recss_layers: int = 4, fw_share_ffn: bool = True, vocab_size: int = 5000,
                 num_word_classes: Optional[int] = None, fw_mask_ratio: float = 1.0 / 3.0,
                 ss_group_video: str = "own", fw_mask_level: str = "features",
                 mesm_input_dropout: bool = False,
                 text_encoder: Optional[RuntimeTextEncoder] = None, **kwargs: Any):
        kwargs.setdefault("neg_sampling", "other_video")
        kwargs.setdefault("global_token_masked", True)
        super().__init__(**kwargs)
        if text_encoder is not None and text_encoder.hidden_size != self.txt_dim:
            raise ValueError(f"txt_dim {self.txt_dim} != the text encoder's hidden size "
                             f"{text_encoder.hidden_size}")
        if not 0.0 < fw_mask_ratio <= 1.0:
            raise ValueError(f"fw_mask_ratio must be in (0, 1], got {fw_mask_ratio}")
        if ss_group_video not in SS_GROUP_VIDEOS:
            raise ValueError(f"ss_group_video must be one of {SS_GROUP_VIDEOS}, got "
                             f"'{ss_group_video}'")
        if fw_mask_level not in FW_MASK_LEVELS:
            raise ValueError(f"fw_mask_level must be one of {FW_MASK_LEVELS}, got "
                             f"'{fw_mask_level}'")
        if mesm_input_dropout and fw_mask_level != "features":
            raise ValueError("mesm_input_dropout needs fw_mask_level 'features'")
        num_word_classes = vocab_size + 3 if num_word_classes is None else int(num_word_classes)
        if num_word_classes <= vocab_size:
            raise ValueError(f"num_word_classes {num_word_classes} must exceed vocab_size "
                             f"{vocab_size} (the unknown class is V)")
        d, h = self.hidden_dim, self.transformer.nhead
        ff, dropout, input_dropout = self.dim_feedforward, self.dropout_p, self.input_dropout_p
        self.rec_fw, self.rec_ss = rec_fw, rec_ss
        self.fw_share_ffn, self.fw_mask_ratio = fw_share_ffn, fw_mask_ratio
        self.vocab_size, self.num_word_classes = vocab_size, num_word_classes
        self.ss_group_video, self.fw_mask_level = ss_group_video, fw_mask_level
        self.mesm_input_dropout = mesm_input_dropout
        self.text_encoder = text_encoder
        if rec_fw:
            self.enhance_encoder = T2VStack(
                T2VEncoderLayer(d, h, ff, dropout, alt_ffn=not fw_share_ffn), num_recfw_layers)
            self.fw_mask_token = nn.Parameter(torch.zeros(self.txt_dim))
            self.fw_unknown_token = nn.Parameter(torch.zeros(self.txt_dim))
            self.output_txt_proj = nn.Sequential(
                LinearLayer(d, d, input_dropout, relu=True), Linear(d, num_word_classes))
            for p in self.enhance_encoder.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        if rec_ss:
            self.ss_reconstructor = T2VStack(T2VEncoderLayer(d, h, ff, dropout),
                                               num_recss_layers)
            self.ss_mask_token = nn.Parameter(torch.zeros(d))
            # MESM computes this projection of the rebuilt sentence but no loss uses it; it is
            # kept (frozen, reported as ``projed_recon_feat``) so that official checkpoints load
            # strictly
            self.ss_output_sent_proj = nn.Sequential(LinearLayer(d, d, input_dropout, relu=True),
                                                     LinearLayer(d, d, input_dropout, relu=False))
            self.ss_output_sent_proj.requires_grad_(False)
            # no Xavier reset here: MESM builds its reconstructor's layers directly (no
            # _reset_parameters), so they keep PyTorch's default initialisation (attention
            # in-projection Xavier, the linear layers U(+-1/sqrt(fan_in))), unlike the
            # enhancement encoder and the QD-DETR transformer

    # ------------------------------------------------------------------ pieces
    def _enhance(self, vid, txt, pos_vid, pos_txt, vid_pad, txt_pad, mask_mode):
        return self.enhance_encoder(vid, txt, pos_vid, pos_txt, vid_pad, txt_pad, mask_mode)

    def _group_video(self, vid: torch.Tensor, vid_pad: torch.Tensor, groups: List[List[int]]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, Lg, D) video each sample's sentence is rebuilt from and its (B, Lg) padding
        (``ss_group_video``, see the class doc)."""
        if self.ss_group_video == "own" or all(len(g) == 1 for g in groups):
            return vid, vid_pad
        valid = (~vid_pad).sum(1).tolist()
        width = max(sum(int(valid[j]) for j in g) for g in groups)
        out = vid.new_zeros(vid.shape[0], width, vid.shape[2])
        pad = torch.ones(vid.shape[0], width, dtype=torch.bool, device=vid.device)
        for i, group in enumerate(groups):
            rows = torch.cat([vid[j, :int(valid[j])] for j in group], dim=0)
            out[i, :rows.shape[0]] = rows
            pad[i, :rows.shape[0]] = False
        return out, pad

    def _sentence_token(self, words: torch.Tensor, words_mask: torch.Tensor, vid: torch.Tensor,
                        src_vid: torch.Tensor, vid_pad: torch.Tensor, groups: List[List[int]],
                        mask_mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rebuilt sentence of each sample: ((B, D) L2-normalised token, (B, D) its
        ``ss_output_sent_proj``).

        Sample i's query sequence is its group's projected sentences (batch order, padded to
        the largest group) with its own slot replaced by ``ss_mask_token``; the T2V-style
        layers (no positions) let it attend to the group video.
        """
        if self.mesm_input_dropout:  # MESM projects the raw group video again
            gvid, gpad = self._group_video(src_vid, vid_pad, groups)
            gvid = self.input_vid_proj(gvid)
        else:
            gvid, gpad = self._group_video(vid, vid_pad, groups)
        m = words_mask.to(words.dtype)
        sent = (words * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
        sent = F.normalize(sent, dim=-1, p=2, eps=1e-5)
        if not self.mesm_input_dropout:
            sent = self.input_txt_proj(sent)  # (B, D)
        bsz, width = sent.shape[0], max(len(g) for g in groups)
        seq = sent.new_zeros(bsz, width, sent.shape[1])
        seq_pad = torch.ones(bsz, width, dtype=torch.bool, device=sent.device)
        own = torch.zeros(bsz, dtype=torch.long)
        for i, group in enumerate(groups):
            seq[i, :len(group)] = sent[group]
            seq_pad[i, :len(group)] = False
            own[i] = group.index(i)
        if self.mesm_input_dropout:  # MESM projects every slot of the expanded groups
            seq = self.input_txt_proj(seq)  # (B, width, D)
        rows = torch.arange(bsz, device=sent.device)
        own = own.to(sent.device)
        is_own = torch.zeros(bsz, width, dtype=torch.bool, device=sent.device)
        is_own[rows, own] = True
        seq = torch.where(is_own[..., None], self.ss_mask_token.expand_as(seq), seq)
        seq = self.ss_reconstructor(seq, gvid, None, None, seq_pad, gpad, mask_mode)
        recon = F.normalize(seq[rows, own], dim=-1)
        return recon, self.ss_output_sent_proj(recon)

    def _word_reconstruction(self, words, txt, words_mask, vid, pos_vid, pos_txt, clip_mask,
                             fw_weights, fw_unknown, fw_masked, txt_ids, mask_mode
                             ) -> Dict[str, torch.Tensor]:
        if fw_masked is not None:
            masked = fw_masked.to(words.device).bool() & words_mask.bool()
        else:
            masked = choose_masked_words(fw_weights, words_mask, self.fw_mask_ratio)
        codes = torch.zeros_like(masked, dtype=torch.long)
        if fw_unknown is not None:
            codes[fw_unknown.to(words.device).bool()] = REPLACE_UNKNOWN
        codes[masked] = REPLACE_MASK  # a masked unknown word gets the mask token (as MESM)
        if self.mesm_input_dropout:
            # MESM: rows of the projected words (txt) replaced by the projected (1, 1, Dt) tokens
            query = txt
            for code, token in ((REPLACE_UNKNOWN, self.fw_unknown_token),
                                (REPLACE_MASK, self.fw_mask_token)):
                query = torch.where((codes == code)[..., None],
                                    self.input_txt_proj(token[None, None]), query)
        else:
            if self.text_encoder is not None and self.fw_mask_level == "tokens":
                feats = self.text_encoder.encode(txt_ids, words_mask, codes, self.fw_mask_token,
                                                 self.fw_unknown_token)
            else:
                # row-wise projection: replacing a feature row equals MESM's replacing the
                # projected row by the projected token (up to the input-dropout masks)
                feats = torch.where((codes == REPLACE_UNKNOWN)[..., None],
                                    self.fw_unknown_token.expand_as(words), words)
                feats = torch.where((codes == REPLACE_MASK)[..., None],
                                    self.fw_mask_token.expand_as(words), feats)
            query = self.input_txt_proj(feats)
        counts = clip_mask.sum(1)
        width = max(int(counts.max().item()), 1)
        clips = vid.new_zeros(vid.shape[0], width, vid.shape[2])
        clip_pos = vid.new_zeros(vid.shape[0], width, vid.shape[2])
        clip_pad = torch.ones(vid.shape[0], width, dtype=torch.bool, device=vid.device)
        for i in range(vid.shape[0]):
            idx = torch.nonzero(clip_mask[i]).flatten()
            clips[i, :len(idx)] = vid[i, idx]
            clip_pos[i, :len(idx)] = pos_vid[i, idx]
            clip_pad[i, :len(idx)] = False
        txt_pad = ~words_mask.bool()
        query = self.enhance_encoder(query, clips, pos_txt, clip_pos, txt_pad, clip_pad,
                                     mask_mode, use_alt_ffn=not self.fw_share_ffn)
        return {"fw_logits": self.output_txt_proj(query), "fw_masked": masked,
                "fw_has_clips": counts > 0}

    # ------------------------------------------------------------------ forward
    def forward(self, src_txt: Optional[torch.Tensor], src_txt_mask: Optional[torch.Tensor],
                src_vid: torch.Tensor, src_vid_mask: torch.Tensor, *,
                txt_ids: Optional[torch.Tensor] = None, vids: Optional[Sequence[Any]] = None,
                gt_clip_mask: Optional[torch.Tensor] = None,
                fw_weights: Optional[torch.Tensor] = None,
                fw_unknown: Optional[torch.Tensor] = None,
                fw_masked: Optional[torch.Tensor] = None,
                src_aud: Optional[torch.Tensor] = None, compute_neg: Optional[bool] = None,
                compute_rec: Optional[bool] = None, t2v_mask_mode: Optional[str] = None,
                neg_index: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        """
        Args:
            src_txt / src_txt_mask: (B, Lt, Dt) / (B, Lt) word features (features variant);
                with a runtime text encoder pass ``txt_ids`` (B, Lt) and ``src_txt_mask`` and
                leave ``src_txt`` None.
            src_vid / src_vid_mask: (B, Lv, Dv) incl. TEF / (B, Lv).
            vids: (B,) grouping ids (MESM: the YouTube id; SS groups and ``other_video``
                negatives); None = every sample is its own group.
            gt_clip_mask: (B, Lv) bool clips of the ground truth (MESM ``clip_mask``; needed
                for the reconstruction outputs; samples without any are flagged in
                ``fw_valid``/``ss_valid``).
            fw_weights: (B, Lt) masking weights (0 = never masked); fw_unknown: (B, Lt) bool;
            fw_masked: (B, Lt) bool positions to mask instead of drawing them.
            compute_neg / compute_rec: run the negative pass / the training-only
                reconstruction outputs; default ``self.training``.
            neg_index: (B,) the text paired with each video in the negative pass (default:
                drawn like MESM's ``sample_outclass_neg``).
        Returns:
            :class:`QDDETR` outputs plus ``recon_feat`` / ``projed_recon_feat`` (B, D)
            (SS), ``saliency_neg_valid`` (with the negative pass), ``fw_logits``
            (B, Lt, classes), ``fw_masked``, ``fw_valid`` (FW, when reconstructing),
            ``ss_clip_feat`` / ``ss_words_feat`` (B, D), ``ss_valid`` (SS, when reconstructing).
        """
        if src_aud is not None:
            if self.aud_dim == 0:
                raise ValueError("src_aud given but the model was built with aud_dim=0")
            src_vid = torch.cat([src_vid, src_aud], dim=2)
        if self.text_encoder is not None:
            if txt_ids is None or src_txt_mask is None:
                raise ValueError("a model with a runtime text encoder needs txt_ids and "
                                 "src_txt_mask")
            words = self.text_encoder.encode(txt_ids, src_txt_mask)
        else:
            if src_txt is None or src_txt_mask is None:
                raise ValueError("src_txt and src_txt_mask are required")
            words = src_txt
        words_mask = src_txt_mask.to(words.device)
        self.check_inputs(words, words_mask, src_vid, src_vid_mask)
        mask_mode = self.t2v_mask_mode if t2v_mask_mode is None else t2v_mask_mode
        compute_neg = self.training if compute_neg is None else compute_neg
        compute_rec = self.training if compute_rec is None else compute_rec
        bsz = src_vid.shape[0]
        groups = video_groups(vids, bsz)

        vid = self.input_vid_proj(src_vid)
        txt = self.input_txt_proj(words)
        pos_vid = self.position_embed(src_vid_mask)
        pos_txt = self.text_positions(txt)
        vid_pad, txt_pad = ~src_vid_mask.bool(), ~words_mask.bool()

        enh = self._enhance(vid, txt, pos_vid, pos_txt, vid_pad, txt_pad, mask_mode) \
            if self.rec_fw else vid
        recon = None
        if self.rec_ss:
            recon, recon_proj = self._sentence_token(words, words_mask, vid, src_vid, vid_pad,
                                                     groups, mask_mode)
            exp_txt = torch.cat([recon[:, None], txt], dim=1)
            exp_pad = torch.cat([txt_pad.new_zeros(bsz, 1), txt_pad], dim=1)
            exp_pos = self.text_positions(exp_txt)
        else:
            exp_txt, exp_pad, exp_pos = txt, txt_pad, pos_txt

        enc = self.encode_pair(enh, exp_txt, pos_vid, exp_pos, vid_pad, exp_pad, mask_mode)
        out = self.heads(enc["hs"], enc["references"])
        out["saliency_scores"] = enc["saliency"]
        out["video_mask"] = src_vid_mask
        if recon is not None:
            out["recon_feat"], out["projed_recon_feat"] = recon, recon_proj

        if compute_neg:
            if neg_index is None:
                neg_index, neg_valid = negative_text_index(
                    bsz, self.neg_sampling, None if vids is None else list(vids))
            else:
                neg_index = torch.as_tensor(neg_index, dtype=torch.long)
                neg_valid = torch.tensor([groups[i] != groups[int(j)]
                                          for i, j in enumerate(neg_index.tolist())])
            neg_index = neg_index.to(vid.device)
            # the negative words keep the positions they have in the expanded text
            neg_pos_txt = exp_pos[neg_index][:, 1:] if self.rec_ss else pos_txt[neg_index]
            neg_enh = (self._enhance(vid, txt[neg_index], pos_vid, neg_pos_txt, vid_pad,
                                     txt_pad[neg_index], mask_mode) if self.rec_fw else vid)
            neg = self.encode_pair(neg_enh, exp_txt[neg_index], pos_vid, exp_pos[neg_index],
                                   vid_pad, exp_pad[neg_index], mask_mode, decode=False)
            out["saliency_scores_neg"] = neg["saliency"]
            out["saliency_neg_valid"] = neg_valid.to(vid.device)

        if compute_rec and gt_clip_mask is not None:
            clip_mask = gt_clip_mask.to(vid.device).bool() & ~vid_pad
            has_gt = clip_mask.any(1)
            if self.rec_fw and (fw_weights is not None or fw_masked is not None):
                fw = self._word_reconstruction(words, txt, words_mask, vid, pos_vid, pos_txt,
                                               clip_mask, fw_weights, fw_unknown, fw_masked,
                                               txt_ids, mask_mode)
                out["fw_logits"], out["fw_masked"] = fw["fw_logits"], fw["fw_masked"]
                out["fw_valid"] = fw["fw_has_clips"]
            if self.rec_ss:
                cm = clip_mask.to(vid.dtype)
                out["ss_clip_feat"] = (vid * cm[..., None]).sum(1) / cm.sum(1, keepdim=True).clamp(min=1.0)
                em = (~exp_pad).to(vid.dtype)
                out["ss_words_feat"] = (exp_txt * em[..., None]).sum(1) / em.sum(1, keepdim=True)
                out["ss_valid"] = has_gt
        return out


# ---------------------------------------------------------------------- losses
class MESMCriterion(SetCriterion):
    """:class:`SetCriterion` plus MESM's reconstruction losses.

    Args (in addition to :class:`SetCriterion`'s):
        recfw_coef: weight of ``loss_rec_fw`` (MESM QVHighlights 0.5).
        recss_coef: weight of ``loss_rec_ss`` (0.1).
        iou_gamma: gIoU threshold of SS positives (0.9).
        recss_tau: SS temperature (0.5).
        fw_label_smoothing: label smoothing of the word NLL (0.1).
        fw_loss_positions: ``"all"`` valid tokens (MESM) or only the ``"masked"`` ones.
    """

    def __init__(self, *, recfw_coef: float = 0.5, recss_coef: float = 0.1,
                 iou_gamma: float = 0.9, recss_tau: float = 0.5, fw_label_smoothing: float = 0.1,
                 fw_loss_positions: str = "all", **kwargs: Any):
        super().__init__(**kwargs)
        if fw_loss_positions not in ("all", "masked"):
            raise ValueError(f"fw_loss_positions must be 'all' or 'masked', got "
                             f"'{fw_loss_positions}'")
        if recss_tau <= 0:
            raise ValueError("recss_tau must be positive")
        self.iou_gamma, self.recss_tau = iou_gamma, recss_tau
        self.fw_label_smoothing, self.fw_loss_positions = fw_label_smoothing, fw_loss_positions
        self.weight_dict["loss_rec_fw"] = recfw_coef
        self.weight_dict["loss_rec_ss"] = recss_coef

    def loss_rec_fw(self, outputs: Dict[str, Any], labels: torch.Tensor,
                    words_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Label-smoothed NLL of the reconstructed words (labels -100 = no label)."""
        logits = outputs["fw_logits"]
        labels = labels.to(logits.device)
        positions = (labels >= 0) & words_mask.to(logits.device).bool()
        if self.fw_loss_positions == "masked":
            positions &= outputs["fw_masked"].to(logits.device)
        logp = logits.log_softmax(-1)
        safe = labels.clamp(min=0)
        nll = -logp.gather(-1, safe[..., None])[..., 0]
        smooth = -logp.sum(-1)
        eps = self.fw_label_smoothing
        per_token = (1 - eps) * nll + eps / logits.shape[-1] * smooth
        pm = positions.to(logits.dtype)
        counts = pm.sum(1)
        rows = outputs["fw_valid"].to(logits.device) & (counts > 0)
        if not rows.any():
            zero = logits.sum() * 0.0
            return {"loss_rec_fw": zero, "rec_fw_acc": zero.detach()}
        per_sample = (per_token * pm).sum(1) / counts.clamp(min=1.0)
        with torch.no_grad():
            hits = ((logits.argmax(-1) == labels) & positions)[rows].sum()
            acc = hits.float() / pm[rows].sum()
        return {"loss_rec_fw": per_sample[rows].mean(), "rec_fw_acc": acc}

    def loss_rec_ss(self, outputs: Dict[str, Any], moments: torch.Tensor,
                    vids: Optional[Sequence[Any]]) -> Dict[str, torch.Tensor]:
        """Supervised contrastive loss between GT-clip and word features (see module doc)."""
        clip_feat, words_feat = outputs["ss_clip_feat"], outputs["ss_words_feat"]
        rows = torch.nonzero(outputs["ss_valid"].cpu()).flatten()
        if len(rows) == 0:
            return {"loss_rec_ss": clip_feat.sum() * 0.0}
        dev = clip_feat.device
        a = F.normalize(clip_feat[rows.to(dev)], dim=-1, p=2)
        b = F.normalize(words_feat[rows.to(dev)], dim=-1, p=2)
        sim = a @ b.t() / self.recss_tau
        m = moments[rows].float()
        giou = generalized_temporal_iou(m, m)
        groups = video_groups(None if vids is None else [vids[int(r)] for r in rows], len(rows))
        same = torch.zeros(len(rows), len(rows), dtype=torch.bool)
        for i, g in enumerate(groups):
            same[i, g] = True
        pos = (same & (giou >= self.iou_gamma)).to(sim.dtype).to(dev)
        logits = sim - sim.max(dim=1, keepdim=True)[0]
        log_prob = logits - torch.log(torch.exp(logits).sum(1, keepdim=True) + 1e-6)
        mean_pos = (pos * log_prob).sum(1) / (pos.sum(1) + 1e-6)
        return {"loss_rec_ss": (-mean_pos).mean()}

    def forward(self, outputs: Dict[str, Any], targets: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Base losses plus, when the model produced them, ``loss_rec_fw`` (needs targets
        ``fw_labels`` (B, Lt) and ``words_mask``) and ``loss_rec_ss`` (needs
        ``ss_moments`` (B, 2) normalised (st, ed) and ``vids``)."""
        losses = super().forward(outputs, targets)
        if "fw_logits" in outputs and targets.get("fw_labels") is not None:
            losses.update(self.loss_rec_fw(outputs, targets["fw_labels"], targets["words_mask"]))
        if "ss_clip_feat" in outputs and targets.get("ss_moments") is not None:
            losses.update(self.loss_rec_ss(outputs, targets["ss_moments"], targets.get("vids")))
        return losses
