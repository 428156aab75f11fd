"""MESM (Liu et al., AAAI 2024, "Towards Balanced Alignment: Modal-Enhanced Semantic Modeling
for Video Moment Retrieval") on top of :class:`~.model.QDDETR`.

Two parts, each switchable:

* **FW-MESM** (``rec_fw``): an *enhancement encoder* (T2V-style layers, ``num_recfw_layers``)
  rebuilds the projected video clips from the query words before the QD-DETR T2V layers
  (``enhance_encoder``); in training the same layers (or a second FFN when
  ``fw_share_ffn=False``) reconstruct the query words from the clips of the ground-truth
  moment, with some words masked (``fw_mask_ratio`` of the tokens, at least one, drawn
  with the vocabulary's inverse-frequency weights, see :mod:`.vocab`) and out-of-vocabulary
  tokens replaced by a learned "unknown" vector; ``output_txt_proj`` classifies each word
  into ``vocab_size + 3`` classes and the loss is a label-smoothed NLL.
  Masking happens at the **feature** level with learned mask/unknown vectors in the input
  text space when the model consumes precomputed token features (numerically what MESM's
  code does), and at the **token-embedding** level inside the frozen CLIP tower when the
  runtime text encoder is used (:mod:`.text_encoder`).
* **SS-MESM** (``rec_ss``): the sentence (mean of its word features, L2-normalised and
  projected) of each query is masked among the sentences of the other queries of the same
  video in the batch and rebuilt from the video by ``ss_reconstructor`` (T2V-style layers,
  ``num_recss_layers``, no positions); the rebuilt, normalised sentence is prepended to the
  query's words as an extra token. In training a supervised contrastive loss aligns the mean
  ground-truth clip feature of sample i with the mean (expanded) word feature of sample j,
  positives being pairs of the same video whose merged moments have gIoU >= ``iou_gamma``.

Groups are formed from the batch's ``vid`` values. MESM's data loader gathers all queries
of a video into one batch item, which makes groups larger than one; with ordinary shuffled
batches most groups hold a single query (the SS token is then rebuilt from the video alone
and the contrastive positives are the diagonal), which is still well defined. At inference
the registered model and the predictor make every query its own group (in the corpus
setting the other queries of a video are unknown), so predictions do not depend on the
batch.

MESM's dead code is left out: ``output_sent_proj`` (computed but unused by its loss) and the
GloVe text encoder.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lavis_c2f.models.grounder.criterion import SetCriterion
from lavis_c2f.models.grounder.model import LinearLayer, QDDETR, negative_text_index
from lavis_c2f.models.grounder.text_encoder import (REPLACE_MASK, REPLACE_UNKNOWN,
                                                    RuntimeTextEncoder)
from lavis_c2f.models.grounder.transformer import LayerStack, T2VEncoderLayer
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
class MESMQDDETR(QDDETR):
    """QD-DETR with MESM's frame-word and segment-sentence enhancement.

    Args (in addition to :class:`QDDETR`'s):
        rec_fw: enable FW-MESM (enhancement encoder + word reconstruction).
        rec_ss: enable SS-MESM (sentence reconstruction token + contrastive loss).
        num_recfw_layers: enhancement encoder depth (MESM 2).
        num_recss_layers: sentence reconstructor depth (MESM 4).
        fw_share_ffn: the word-reconstruction pass reuses the enhancement FFNs (MESM
            ``share_MLP``, True in its QVHighlights config).
        vocab_size: V; the word classifier has V + 3 classes.
        fw_mask_ratio: fraction of a query's tokens to mask (MESM 1/3, at least one).
        text_encoder: optional frozen :class:`RuntimeTextEncoder`; then ``txt_dim`` must be
            its hidden size and the text comes as token ids instead of features.
    """

    def __init__(self, *, rec_fw: bool = True, rec_ss: bool = True, num_recfw_layers: int = 2,
                 num_recss_layers: int = 4, fw_share_ffn: bool = True, vocab_size: int = 5000,
                 fw_mask_ratio: float = 1.0 / 3.0,
                 text_encoder: Optional[RuntimeTextEncoder] = None, **kwargs: Any):
        kwargs.setdefault("neg_sampling", "other_video")
        super().__init__(**kwargs)
        if text_encoder is not None and text_encoder.hidden_size != self.txt_dim:
            raise ValueError(f"txt_dim {self.txt_dim} != the text encoder's hidden size "
                             f"{text_encoder.hidden_size}")
        if not 0.0 < fw_mask_ratio <= 1.0:
            raise ValueError(f"fw_mask_ratio must be in (0, 1], got {fw_mask_ratio}")
        d, h = self.hidden_dim, self.transformer.nhead
        ff, dropout, input_dropout = self.dim_feedforward, self.dropout_p, self.input_dropout_p
        self.rec_fw, self.rec_ss = rec_fw, rec_ss
        self.fw_share_ffn, self.fw_mask_ratio = fw_share_ffn, fw_mask_ratio
        self.vocab_size = vocab_size
        self.text_encoder = text_encoder
        if rec_fw:
            self.enhance_encoder = LayerStack(
                T2VEncoderLayer(d, h, ff, dropout, alt_ffn=not fw_share_ffn), num_recfw_layers)
            self.fw_mask_token = nn.Parameter(torch.zeros(self.txt_dim))
            self.fw_unknown_token = nn.Parameter(torch.zeros(self.txt_dim))
            self.output_txt_proj = nn.Sequential(
                LinearLayer(d, d, input_dropout, relu=True), nn.Linear(d, vocab_size + 3))
            for p in self.enhance_encoder.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        if rec_ss:
            self.ss_reconstructor = LayerStack(T2VEncoderLayer(d, h, ff, dropout),
                                               num_recss_layers)
            self.ss_mask_token = nn.Parameter(torch.zeros(d))
            for p in self.ss_reconstructor.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    # ------------------------------------------------------------------ pieces
    def _enhance(self, vid, txt, pos_vid, pos_txt, vid_pad, txt_pad, mask_mode):
        for layer in self.enhance_encoder.layers:
            vid = layer(vid, txt, pos_vid, pos_txt, vid_pad, txt_pad, mask_mode)
        return vid

    def _sentence_token(self, words: torch.Tensor, words_mask: torch.Tensor, vid: torch.Tensor,
                        vid_pad: torch.Tensor, groups: List[List[int]], mask_mode: str
                        ) -> torch.Tensor:
        """(B, D) normalised rebuilt sentence of each sample (see module doc)."""
        m = words_mask.to(words.dtype)
        sent = (words * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
        sent = self.input_txt_proj(F.normalize(sent, dim=-1, p=2, eps=1e-5))  # (B, D)
        bsz, width = sent.shape[0], max(len(g) for g in groups)
        seq = sent.new_zeros(bsz, width, sent.shape[1])
        seq_pad = torch.ones(bsz, width, dtype=torch.bool, device=sent.device)
        own = torch.zeros(bsz, dtype=torch.long)
        for i, group in enumerate(groups):
            seq[i, :len(group)] = sent[group]
            seq_pad[i, :len(group)] = False
            own[i] = group.index(i)
        rows = torch.arange(bsz, device=sent.device)
        own = own.to(sent.device)
        is_own = torch.zeros(bsz, width, dtype=torch.bool, device=sent.device)
        is_own[rows, own] = True
        seq = torch.where(is_own[..., None], self.ss_mask_token.expand_as(seq), seq)
        for layer in self.ss_reconstructor.layers:
            seq = layer(seq, vid, None, None, seq_pad, vid_pad, mask_mode)
        return F.normalize(seq[rows, own], dim=-1)

    def _choose_masked(self, weights: torch.Tensor, words_mask: torch.Tensor) -> torch.Tensor:
        """(B, Lt) bool positions to mask, drawn without replacement with ``weights``."""
        chosen = torch.zeros_like(words_mask, dtype=torch.bool)
        for i in range(weights.shape[0]):
            n_tokens = int(words_mask[i].sum().item())
            if n_tokens <= 1:
                continue
            w = weights[i].float().clamp(min=0) * words_mask[i].float()
            k = min(max(int(n_tokens * self.fw_mask_ratio + 1e-9), 1), int((w > 0).sum().item()))
            if k > 0:
                chosen[i, torch.multinomial(w, k, replacement=False)] = True
        return chosen

    def _word_reconstruction(self, words, words_mask, vid, pos_vid, pos_txt, clip_mask,
                             fw_weights, fw_unknown, txt_ids, mask_mode) -> Dict[str, torch.Tensor]:
        masked = self._choose_masked(fw_weights.to(words.device), words_mask)
        codes = torch.zeros_like(masked, dtype=torch.long)
        if fw_unknown is not None:
            codes[fw_unknown.to(words.device).bool()] = REPLACE_UNKNOWN
        codes[masked] = REPLACE_MASK
        if self.text_encoder is not None:
            feats = self.text_encoder.encode(txt_ids, words_mask, codes, self.fw_mask_token,
                                             self.fw_unknown_token)
        else:
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
        for layer in self.enhance_encoder.layers:
            query = layer(query, clips, pos_txt, clip_pos, txt_pad, clip_pad, mask_mode,
                          use_alt_ffn=not self.fw_share_ffn)
        return {"fw_logits": self.output_txt_proj(query), "fw_masked": masked,
                "fw_has_clips": counts > 0}

    # ------------------------------------------------------------------ forward
    def forward(self, src_txt: Optional[torch.Tensor], src_txt_mask: Optional[torch.Tensor],
                src_vid: torch.Tensor, src_vid_mask: torch.Tensor, *,
                txt_ids: Optional[torch.Tensor] = None, vids: Optional[Sequence[Any]] = None,
                gt_clip_mask: Optional[torch.Tensor] = None,
                fw_weights: Optional[torch.Tensor] = None,
                fw_unknown: Optional[torch.Tensor] = None,
                src_aud: Optional[torch.Tensor] = None, compute_neg: Optional[bool] = None,
                compute_rec: Optional[bool] = None, t2v_mask_mode: Optional[str] = None,
                neg_index: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        """
        Args:
            src_txt / src_txt_mask: (B, Lt, Dt) / (B, Lt) word features (features variant);
                with a runtime text encoder pass ``txt_ids`` (B, Lt) and ``src_txt_mask`` and
                leave ``src_txt`` None.
            src_vid / src_vid_mask: (B, Lv, Dv) incl. TEF / (B, Lv).
            vids: (B,) video ids (SS groups, ``other_video`` negatives).
            gt_clip_mask: (B, Lv) bool ground-truth clips (needed for the reconstruction
                outputs; samples without any are flagged in ``fw_valid``/``ss_valid``).
            fw_weights: (B, Lt) masking weights (0 = never masked); fw_unknown: (B, Lt) bool.
            compute_neg / compute_rec: run the negative pass / the training-only
                reconstruction outputs; default ``self.training``.
        Returns:
            :class:`QDDETR` outputs plus ``saliency_neg_valid`` (with the negative pass),
            ``fw_logits`` (B, Lt, V+3), ``fw_masked``, ``fw_valid`` (FW, when reconstructing),
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

        vid = self.input_vid_proj(src_vid)
        txt = self.input_txt_proj(words)
        pos_vid = self.position_embed(src_vid_mask)
        pos_txt = self.text_positions(txt)
        vid_pad, txt_pad = ~src_vid_mask.bool(), ~words_mask.bool()

        enh = self._enhance(vid, txt, pos_vid, pos_txt, vid_pad, txt_pad, mask_mode) \
            if self.rec_fw else vid
        if self.rec_ss:
            groups = video_groups(vids, bsz)
            recon = self._sentence_token(words, words_mask, vid, vid_pad, groups, mask_mode)
            exp_txt = torch.cat([recon[:, None], txt], dim=1)
            exp_pad = torch.cat([txt_pad.new_zeros(bsz, 1), txt_pad], dim=1)
        else:
            exp_txt, exp_pad = txt, txt_pad
        exp_pos = self.text_positions(exp_txt) if self.rec_ss else pos_txt

        enc = self.encode_pair(enh, exp_txt, pos_vid, exp_pos, vid_pad, exp_pad, mask_mode)
        out = self.heads(enc["hs"], enc["references"])
        out["saliency_scores"] = enc["saliency"]
        out["video_mask"] = src_vid_mask

        if compute_neg:
            if neg_index is None:
                neg_index, neg_valid = negative_text_index(bsz, self.neg_sampling, vids)
            else:
                neg_valid = neg_index.cpu() != torch.arange(bsz)
            neg_index = neg_index.to(vid.device)
            neg_enh = (self._enhance(vid, txt[neg_index], pos_vid, pos_txt[neg_index], vid_pad,
                                     txt_pad[neg_index], mask_mode) if self.rec_fw else vid)
            neg = self.encode_pair(neg_enh, exp_txt[neg_index], pos_vid, exp_pos[neg_index],
                                   vid_pad, exp_pad[neg_index], mask_mode, decode=False)
            out["saliency_scores_neg"] = neg["saliency"]
            out["saliency_neg_valid"] = neg_valid.to(vid.device)

        if compute_rec and gt_clip_mask is not None:
            clip_mask = gt_clip_mask.to(vid.device).bool() & ~vid_pad
            has_gt = clip_mask.any(1)
            if self.rec_fw and fw_weights is not None:
                fw = self._word_reconstruction(words, words_mask, vid, pos_vid, pos_txt,
                                               clip_mask, fw_weights, fw_unknown, txt_ids,
                                               mask_mode)
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
