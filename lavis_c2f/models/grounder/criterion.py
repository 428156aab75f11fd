"""Training losses of QD-DETR (and the shared part of MESM), as the official ``SetCriterion``.

Losses (unweighted values are returned; :meth:`SetCriterion.weighted_total` applies weights):

* ``loss_span``: L1 between matched predicted and GT (cx, w), mean over matched elements.
* ``loss_giou``: mean of ``1 - gIoU`` over matched pairs.
* ``loss_label``: cross-entropy over every query, foreground (index 0) for matched queries,
  background otherwise; the background class is weighted by ``eos_coef`` and the weighted
  per-query values are averaged over all B·Q queries (the official reduction).
* ``loss_saliency`` = margin ranking + rank-contrastive + negative-pair terms:
    - margin: ``sum(clamp(margin + s[neg] - s[pos], 0)) / (B·P) * 2`` over the
      (hard + easy) positive/negative clip indices;
    - rank-contrastive: for each score level r = 1..11, a supervised-contrastive term over
      the clips of [true pair ‖ negative pair] whose summed saliency is >= r
      (temperature 0.5, padded clips at -1e3), summed over r and divided by 12
      (``rank_divisor``); the clip softmax is computed once and every level at once;
    - negative pair: ``sum_t softplus(s_neg[t]) * mask[t]`` (= -log(1 - sigmoid)), mean over B.
* aux losses ``loss_span_i`` / ``loss_giou_i`` / ``loss_label_i`` for decoder layer i (re-matched).

Deviations (documented, only where the official code would produce NaN or a wrong signal):
an empty match set gives 0 instead of NaN span losses; samples flagged by ``has_labels=False``
are left out of the margin term; negative pairs flagged invalid (a batch of 1, where the
"negative" is the sample's own text) are left out of the negative-pair and rank-contrastive
terms. With valid labels and B > 1 every value equals the official one.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lavis_c2f.models.grounder.matcher import HungarianMatcher, MatchIndices
from lavis_c2f.ops.spans import generalized_temporal_iou, span_cxw_to_xx

FOREGROUND, BACKGROUND = 0, 1


def _permutation_index(indices: MatchIndices):
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


class SetCriterion(nn.Module):
    """QD-DETR set-prediction and saliency losses.

    Args:
        matcher: a :class:`HungarianMatcher`.
        span_loss_coef, giou_loss_coef, label_loss_coef: weights (official 10, 1, 4).
        saliency_loss_coef: weight of ``loss_saliency`` (official ``lw_saliency`` 1).
        eos_coef: background class weight (0.1).
        saliency_margin: margin of the ranking term (0.2).
        use_margin_loss: include the margin term (QD-DETR: always; MESM: ``use_triplet``).
        use_rank_contrastive: include the rank-contrastive term.
        use_neg_pair_loss: include the negative-pair term.
        rank_divisor: divisor of the summed rank-contrastive term (12; MESM ``rank_coef``).
        rank_tau: its temperature (0.5).
        rank_levels: score levels r = 1..rank_levels (11).
        aux_loss: add the losses of every earlier decoder layer.
        aux_layers: number of auxiliary layers (dec_layers - 1), for :attr:`weight_dict`.
    """

    def __init__(self, *, matcher: HungarianMatcher, span_loss_coef: float = 10.0,
                 giou_loss_coef: float = 1.0, label_loss_coef: float = 4.0,
                 saliency_loss_coef: float = 1.0, eos_coef: float = 0.1,
                 saliency_margin: float = 0.2, use_margin_loss: bool = True,
                 use_rank_contrastive: bool = True, use_neg_pair_loss: bool = True,
                 rank_divisor: float = 12.0, rank_tau: float = 0.5, rank_levels: int = 11,
                 aux_loss: bool = True, aux_layers: int = 1):
        super().__init__()
        if rank_divisor <= 0 or rank_tau <= 0:
            raise ValueError("rank_divisor and rank_tau must be positive")
        self.matcher = matcher
        self.saliency_margin = saliency_margin
        self.use_margin_loss = use_margin_loss
        self.use_rank_contrastive = use_rank_contrastive
        self.use_neg_pair_loss = use_neg_pair_loss
        self.rank_divisor, self.rank_tau, self.rank_levels = rank_divisor, rank_tau, rank_levels
        self.aux_loss = aux_loss
        self.eos_coef = eos_coef
        self.register_buffer("empty_weight", torch.tensor([1.0, eos_coef]), persistent=False)
        base = {"loss_span": span_loss_coef, "loss_giou": giou_loss_coef,
                "loss_label": label_loss_coef}
        self.weight_dict: Dict[str, float] = dict(base)
        self.weight_dict["loss_saliency"] = saliency_loss_coef
        if aux_loss:
            for i in range(aux_layers):
                self.weight_dict.update({f"{k}_{i}": v for k, v in base.items()})

    # ------------------------------------------------------------------ set losses
    def loss_spans(self, outputs: Dict[str, Any], gt_spans: Sequence[torch.Tensor],
                   indices: MatchIndices) -> Dict[str, torch.Tensor]:
        """L1 and gIoU losses of the matched spans."""
        pred = outputs["pred_spans"]
        batch_idx, src_idx = _permutation_index(indices)
        if batch_idx.numel() == 0:
            zero = pred.sum() * 0.0
            return {"loss_span": zero, "loss_giou": zero.clone()}
        src = pred[batch_idx.to(pred.device), src_idx.to(pred.device)]
        tgt = torch.cat([gt.to(pred.device)[j] for gt, (_, j) in zip(gt_spans, indices)], dim=0)
        loss_span = F.l1_loss(src, tgt.to(src.dtype), reduction="none").mean()
        giou = torch.diag(generalized_temporal_iou(span_cxw_to_xx(src), span_cxw_to_xx(tgt.to(src.dtype))))
        return {"loss_span": loss_span, "loss_giou": (1.0 - giou).mean()}

    def loss_labels(self, outputs: Dict[str, Any], indices: MatchIndices) -> Dict[str, torch.Tensor]:
        """Foreground/background cross-entropy and the (logged) class error of matches."""
        logits = outputs["pred_logits"]
        batch_idx, src_idx = _permutation_index(indices)
        batch_idx, src_idx = batch_idx.to(logits.device), src_idx.to(logits.device)
        target = torch.full(logits.shape[:2], BACKGROUND, dtype=torch.int64, device=logits.device)
        target[batch_idx, src_idx] = FOREGROUND
        ce = F.cross_entropy(logits.transpose(1, 2), target,
                             self.empty_weight.to(logits.dtype), reduction="none")
        with torch.no_grad():
            matched = logits[batch_idx, src_idx]
            if matched.numel() == 0:
                class_error = logits.new_tensor(100.0)
            else:
                correct = (matched.argmax(-1) == FOREGROUND).float().mean() * 100.0
                class_error = 100.0 - correct
        return {"loss_label": ce.mean(), "class_error": class_error}

    # ------------------------------------------------------------------ saliency
    def loss_saliency(self, outputs: Dict[str, Any],
                      targets: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Margin + rank-contrastive + negative-pair saliency losses (see module doc)."""
        scores = outputs["saliency_scores"]
        mask = outputs["video_mask"].to(scores.dtype)
        bsz = scores.shape[0]
        total = scores.sum() * 0.0
        parts: Dict[str, torch.Tensor] = {}
        neg = outputs.get("saliency_scores_neg")
        neg_valid = outputs.get("saliency_neg_valid")
        if neg_valid is None:
            neg_valid = torch.full((bsz,), bsz > 1, dtype=torch.bool, device=scores.device)
        neg_valid = neg_valid.to(scores.device).to(scores.dtype)

        if neg is not None and self.use_neg_pair_loss:
            per_sample = (F.softplus(neg) * mask).sum(1)
            parts["loss_saliency_neg_pair"] = (per_sample * neg_valid).sum() / bsz
            total = total + parts["loss_saliency_neg_pair"]

        labels = targets.get("saliency_all_labels")
        if labels is not None and self.use_rank_contrastive:
            labels = labels.to(scores.device).to(scores.dtype)
            if labels.shape != scores.shape:
                raise ValueError(f"saliency_all_labels shape {tuple(labels.shape)} != saliency "
                                 f"scores {tuple(scores.shape)}")
            parts["loss_saliency_rank"] = self._rank_contrastive(scores, neg, labels, mask,
                                                                 neg_valid)
            total = total + parts["loss_saliency_rank"]

        pos_idx, neg_idx = targets.get("saliency_pos_labels"), targets.get("saliency_neg_labels")
        if pos_idx is not None and neg_idx is not None and self.use_margin_loss:
            has = targets.get("has_labels")
            keep = (torch.ones(bsz, dtype=torch.bool) if has is None
                    else torch.as_tensor(has, dtype=torch.bool).cpu())
            if keep.any():
                rows = torch.nonzero(keep).flatten().to(scores.device)
                pos_idx = pos_idx.to(scores.device)[rows].long()
                neg_idx = neg_idx.to(scores.device)[rows].long()
                s = scores[rows]
                pos_s = torch.gather(s, 1, pos_idx)
                neg_s = torch.gather(s, 1, neg_idx)
                n_pairs = pos_idx.shape[1]
                margin = torch.clamp(self.saliency_margin + neg_s - pos_s, min=0).sum()
                parts["loss_saliency_margin"] = margin / (len(rows) * n_pairs) * 2
                total = total + parts["loss_saliency_margin"]
        out = {"loss_saliency": total}
        out.update({k: v.detach() for k, v in parts.items()})
        return out

    def _rank_contrastive(self, scores: torch.Tensor, neg: Optional[torch.Tensor],
                          labels: torch.Tensor, mask: torch.Tensor,
                          neg_valid: torch.Tensor) -> torch.Tensor:
        if neg is not None:
            scores = torch.cat([scores, neg], dim=1)
            labels = torch.cat([labels, torch.zeros_like(labels)], dim=1)
            mask = torch.cat([mask, mask * neg_valid[:, None]], dim=1)
        scores = mask * scores + (1.0 - mask) * -1e3
        # the softmax over clips does not depend on the level: computed once, then every level
        # r = 1..R at once (the official loop recomputes it per level)
        logits = scores / self.rank_tau
        logits = logits - logits.max(dim=1, keepdim=True)[0]
        log_prob = logits - torch.log(torch.exp(logits).sum(1, keepdim=True) + 1e-6)
        levels = torch.arange(1, self.rank_levels + 1, device=scores.device, dtype=labels.dtype)
        pos = (labels[None] >= levels[:, None, None]).to(scores.dtype)  # (R, B, L)
        counts = pos.sum(2)  # (R, B)
        mean_pos = (pos * (log_prob * mask)[None]).sum(2) / (counts + 1e-6)
        per_level = (-mean_pos * (counts > 0).to(scores.dtype)).mean(1)  # (R,)
        # a level with no positive clip in the batch is skipped (contributes 0)
        present = (counts.sum(1) > 0).to(scores.dtype)
        return (per_level * present).sum() / self.rank_divisor

    # ------------------------------------------------------------------ forward
    def forward(self, outputs: Dict[str, Any], targets: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: the model's outputs (``pred_logits``, ``pred_spans``, ``saliency_scores``,
                ``video_mask``, optional ``saliency_scores_neg``, ``saliency_neg_valid``,
                ``aux_outputs``).
            targets: ``span_labels`` (list of B (N_i, 2) normalised (cx, w)), optional
                ``saliency_pos_labels`` / ``saliency_neg_labels`` (B, P) long,
                ``saliency_all_labels`` (B, Lv), ``has_labels`` (B,) bool.
        Returns:
            unweighted losses (see module doc) plus logging values (``class_error``,
            saliency parts).
        """
        gt_spans: List[torch.Tensor] = list(targets["span_labels"])
        indices = self.matcher(outputs, gt_spans)
        losses: Dict[str, torch.Tensor] = {}
        losses.update(self.loss_spans(outputs, gt_spans, indices))
        losses.update(self.loss_labels(outputs, indices))
        losses.update(self.loss_saliency(outputs, targets))
        if self.aux_loss:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux_indices = self.matcher(aux, gt_spans)
                part = dict(self.loss_spans(aux, gt_spans, aux_indices))
                part.update(self.loss_labels(aux, aux_indices))
                losses.update({f"{k}_{i}": v for k, v in part.items()})
        return losses

    def weighted_total(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of ``losses[k] * weight_dict[k]`` over weighted keys present in ``losses``."""
        terms = [losses[k] * w for k, w in self.weight_dict.items() if k in losses]
        if not terms:
            raise ValueError("no weighted loss present")
        return torch.stack([t if t.dim() == 0 else t.squeeze() for t in terms]).sum()
