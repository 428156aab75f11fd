"""Hungarian matching between predicted and ground-truth moments (DETR style).

Cost of assigning prediction q to ground truth g (both normalised (cx, w)):

    C[q, g] = cost_span * |span_q - span_g|_1 - cost_giou * gIoU(q, g) - cost_class * p_fg(q)

with ``p_fg = softmax(logits)[..., 0]`` (index 0 = foreground). The costs of the whole batch
come out of one computation (every prediction against every ground-truth window of the batch,
as the official matcher computes them), then each sample's block is solved with
``scipy.optimize.linear_sum_assignment``; a sample without ground truth gets empty indices.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment

from lavis_c2f.ops.spans import generalized_temporal_iou, span_cxw_to_xx

MatchIndices = List[Tuple[torch.Tensor, torch.Tensor]]


def matching_cost(pred_logits: torch.Tensor, pred_spans: torch.Tensor, gt_spans: torch.Tensor,
                  cost_class: float, cost_span: float, cost_giou: float) -> torch.Tensor:
    """Cost matrix of predictions against ground-truth windows.

    Args:
        pred_logits: (Q, 2); pred_spans: (Q, 2) (cx, w); gt_spans: (N, 2) (cx, w). Q may be
            a whole batch's B·Q predictions and N every window of the batch.
    Returns:
        (Q, N) float tensor.
    """
    prob_fg = pred_logits.softmax(-1)[:, 0]
    c_span = torch.cdist(pred_spans.float(), gt_spans.float(), p=1)
    c_giou = -generalized_temporal_iou(span_cxw_to_xx(pred_spans.float()),
                                       span_cxw_to_xx(gt_spans.float()))
    return cost_span * c_span + cost_giou * c_giou - cost_class * prob_fg[:, None]


class HungarianMatcher(torch.nn.Module):
    """One-to-one assignment of predictions to ground-truth windows.

    Args:
        cost_class: weight of the (negative) foreground probability (official 4).
        cost_span: weight of the L1 distance of (cx, w) (official 10).
        cost_giou: weight of the negative generalised IoU (official 1).
    """

    def __init__(self, cost_class: float = 4.0, cost_span: float = 10.0, cost_giou: float = 1.0):
        super().__init__()
        if cost_class == 0 and cost_span == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_span, self.cost_giou = cost_class, cost_span, cost_giou

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor],
                gt_spans: Sequence[torch.Tensor]) -> MatchIndices:
        """
        Args:
            outputs: ``pred_logits`` (B, Q, 2) and ``pred_spans`` (B, Q, 2).
            gt_spans: B tensors of shape (N_i, 2), normalised (cx, w); N_i may be 0.
        Returns:
            B pairs ``(pred_idx, gt_idx)`` of int64 tensors with ``min(Q, N_i)`` entries,
            ``pred_idx`` sorted ascending.
        """
        logits, spans = outputs["pred_logits"], outputs["pred_spans"]
        bsz, n_queries = logits.shape[:2]
        if len(gt_spans) != bsz:
            raise ValueError(f"{len(gt_spans)} ground-truth entries for a batch of {bsz}")
        sizes = [int(gt.shape[0]) if gt.numel() else 0 for gt in gt_spans]
        empty = torch.zeros(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in sizes]
        targets = torch.cat([gt.reshape(-1, 2).to(spans.device) for gt, n in zip(gt_spans, sizes) if n])
        cost = matching_cost(logits.flatten(0, 1), spans.flatten(0, 1), targets, self.cost_class,
                             self.cost_span, self.cost_giou)
        blocks = cost.view(bsz, n_queries, -1).cpu().split(sizes, dim=-1)
        indices: MatchIndices = []
        for b, n in enumerate(sizes):
            if n == 0:
                indices.append((empty, empty.clone()))
                continue
            rows, cols = linear_sum_assignment(blocks[b][b].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64),
                            torch.as_tensor(cols, dtype=torch.int64)))
        return indices
