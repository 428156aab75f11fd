"""Hungarian matcher (against brute force) and the QD-DETR losses."""
from __future__ import annotations

import itertools

import pytest
import torch

from lavis_c2f.models.grounder import HungarianMatcher, SetCriterion
from lavis_c2f.models.grounder.matcher import matching_cost
from lavis_c2f.ops.spans import span_cxw_to_xx, span_xx_to_cxw


def _brute_force(cost: torch.Tensor) -> float:
    """Minimum total cost over every injective assignment of the columns to rows."""
    n_rows, n_cols = cost.shape
    best = float("inf")
    for rows in itertools.permutations(range(n_rows), n_cols):
        best = min(best, float(sum(cost[r, c] for c, r in enumerate(rows))))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_matcher_is_optimal_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    bsz, q = 3, 5
    outputs = {"pred_logits": torch.randn(bsz, q, 2, generator=g),
               "pred_spans": torch.rand(bsz, q, 2, generator=g) * 0.5 + 0.05}
    gts = [span_xx_to_cxw(torch.sort(torch.rand(n, 2, generator=g), dim=1)[0]) for n in (1, 3, 5)]
    matcher = HungarianMatcher(cost_class=4, cost_span=10, cost_giou=1)
    indices = matcher(outputs, gts)
    for b, (rows, cols) in enumerate(indices):
        assert len(rows) == len(cols) == len(gts[b])
        assert len(set(rows.tolist())) == len(rows)
        cost = matching_cost(outputs["pred_logits"][b], outputs["pred_spans"][b], gts[b], 4, 10, 1)
        got = float(cost[rows, cols].sum())
        assert got == pytest.approx(_brute_force(cost), abs=1e-5)


def test_matcher_cost_terms():
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    spans = torch.tensor([[0.5, 0.2], [0.5, 0.2]])
    gt = torch.tensor([[0.5, 0.2]])
    cost = matching_cost(logits, spans, gt, cost_class=1, cost_span=0, cost_giou=0)
    assert cost[0, 0] < cost[1, 0]  # more foreground -> cheaper
    exact = matching_cost(logits, spans, gt, cost_class=0, cost_span=1, cost_giou=1)
    assert exact[0, 0] == pytest.approx(-1.0)  # zero L1, gIoU 1


def test_matcher_handles_empty_ground_truth():
    outputs = {"pred_logits": torch.randn(2, 4, 2), "pred_spans": torch.rand(2, 4, 2)}
    indices = HungarianMatcher()(outputs, [torch.zeros(0, 2), torch.tensor([[0.5, 0.1]])])
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert len(indices[1][0]) == 1
    with pytest.raises(ValueError):
        HungarianMatcher()(outputs, [torch.zeros(0, 2)])
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)


def test_span_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    xx = torch.sort(torch.rand(50, 2, generator=g), dim=1)[0]
    torch.testing.assert_close(span_cxw_to_xx(span_xx_to_cxw(xx)), xx)
    cxw = torch.rand(4, 7, 2, generator=g)
    torch.testing.assert_close(span_xx_to_cxw(span_cxw_to_xx(cxw)), cxw)


def _outputs(bsz, q, lv, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    def head():
        return {"pred_logits": torch.randn(bsz, q, 2, generator=g).requires_grad_(requires_grad),
                "pred_spans": (torch.rand(bsz, q, 2, generator=g) * 0.8 + 0.1).requires_grad_(requires_grad)}
    out = head()
    out["aux_outputs"] = [head()]
    out["saliency_scores"] = torch.randn(bsz, lv, generator=g).requires_grad_(requires_grad)
    out["saliency_scores_neg"] = torch.randn(bsz, lv, generator=g).requires_grad_(requires_grad)
    return out


def test_losses_finite_with_all_padding_masks_and_empty_gt():
    bsz, q, lv = 3, 4, 6
    out = _outputs(bsz, q, lv)
    out["video_mask"] = torch.tensor([[1.0] * 6, [0.0] * 6, [1, 1, 1, 0, 0, 0]])
    targets = {"span_labels": [torch.zeros(0, 2)] * bsz,
               "saliency_pos_labels": torch.zeros(bsz, 2, dtype=torch.long),
               "saliency_neg_labels": torch.zeros(bsz, 2, dtype=torch.long),
               "saliency_all_labels": torch.zeros(bsz, lv),
               "has_labels": torch.zeros(bsz, dtype=torch.bool)}
    crit = SetCriterion(matcher=HungarianMatcher())
    losses = crit(out, targets)
    for k, v in losses.items():
        assert torch.isfinite(torch.as_tensor(v)).all(), k
    assert losses["loss_span"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    total = crit.weighted_total(losses)
    total.backward()
    assert torch.isfinite(out["pred_logits"].grad).all()
    assert torch.isfinite(out["saliency_scores_neg"].grad).all()


def test_losses_finite_with_all_padding_video_and_labels():
    out = _outputs(2, 3, 5, seed=1)
    out["video_mask"] = torch.zeros(2, 5)
    targets = {"span_labels": [torch.tensor([[0.5, 0.2]]), torch.zeros(0, 2)],
               "saliency_all_labels": torch.zeros(2, 5)}
    losses = SetCriterion(matcher=HungarianMatcher())(out, targets)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in losses.values())
    assert losses["loss_saliency_neg_pair"].item() == 0.0  # no valid clip


def test_weights_and_saliency_parts():
    crit = SetCriterion(matcher=HungarianMatcher(), span_loss_coef=10, giou_loss_coef=1,
                        label_loss_coef=4, saliency_loss_coef=1, aux_layers=2)
    assert crit.weight_dict["loss_span_1"] == 10 and "loss_saliency_0" not in crit.weight_dict
    out = _outputs(3, 4, 8, seed=3)
    out["video_mask"] = torch.ones(3, 8)
    labels = torch.zeros(3, 8)
    labels[:, 2:5] = torch.tensor([4.0, 12.0, 8.0])
    targets = {"span_labels": [torch.tensor([[0.4, 0.3]])] * 3,
               "saliency_pos_labels": torch.tensor([[3, 2]] * 3),
               "saliency_neg_labels": torch.tensor([[0, 7]] * 3), "saliency_all_labels": labels}
    losses = crit(out, targets)
    parts = sum(losses[k].item() for k in ("loss_saliency_neg_pair", "loss_saliency_rank",
                                           "loss_saliency_margin"))
    assert losses["loss_saliency"].item() == pytest.approx(parts, rel=1e-5)
    expected = sum(losses[k].item() * w for k, w in crit.weight_dict.items() if k in losses)
    assert crit.weighted_total(losses).item() == pytest.approx(expected, rel=1e-5)
    # margin term by hand
    s = out["saliency_scores"].detach()
    manual = sum(max(0.0, 0.2 + float(s[b, n]) - float(s[b, p]))
                 for b in range(3) for p, n in ((3, 0), (2, 7))) / 6 * 2
    assert losses["loss_saliency_margin"].item() == pytest.approx(manual, rel=1e-5)


def test_invalid_negative_pairs_are_ignored():
    out = _outputs(1, 3, 4, seed=5)
    out["video_mask"] = torch.ones(1, 4)
    crit = SetCriterion(matcher=HungarianMatcher())
    losses = crit(out, {"span_labels": [torch.tensor([[0.5, 0.5]])]})
    assert losses["loss_saliency_neg_pair"].item() == 0.0  # batch of 1: own text, not a negative
    out["saliency_neg_valid"] = torch.tensor([True])
    losses = crit(out, {"span_labels": [torch.tensor([[0.5, 0.5]])]})
    assert losses["loss_saliency_neg_pair"].item() > 0.0


def test_label_loss_weights_background_by_eos_coef():
    logits = torch.zeros(1, 2, 2)
    out = {"pred_logits": logits, "pred_spans": torch.tensor([[[0.5, 0.2], [0.1, 0.05]]]),
           "saliency_scores": torch.zeros(1, 3), "video_mask": torch.ones(1, 3)}
    crit = SetCriterion(matcher=HungarianMatcher(), eos_coef=0.1, aux_loss=False)
    losses = crit(out, {"span_labels": [torch.tensor([[0.5, 0.2]])]})
    # one foreground query (weight 1) + one background query (weight 0.1), CE = log 2 each
    assert losses["loss_label"].item() == pytest.approx((1.0 + 0.1) * torch.log(torch.tensor(2.0)).item() / 2)


# --------------------------------------------------------------------------- reference path
def _reference_matches(out, gts, costs=(4.0, 10.0, 1.0)):
    """One sample at a time, as the criterion matched before the batched cost matrix."""
    from scipy.optimize import linear_sum_assignment

    res = []
    for b, gt in enumerate(gts):
        if gt.numel() == 0:
            res.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
            continue
        cost = matching_cost(out["pred_logits"][b].detach(), out["pred_spans"][b].detach(), gt, *costs)
        rows, cols = linear_sum_assignment(cost.numpy())
        res.append((torch.as_tensor(rows), torch.as_tensor(cols)))
    return res


def _reference_rank(scores, neg, labels, mask, tau=0.5, levels=11, divisor=12.0):
    """The official level loop: for r = 1..11 a supervised-contrastive term over the clips of
    [true pair || negative pair] whose label is >= r, levels without positives skipped."""
    scores = torch.cat([scores, neg], 1)
    labels = torch.cat([labels, torch.zeros_like(labels)], 1)
    mask = mask.repeat(1, 2)
    scores = mask * scores + (1.0 - mask) * -1e3
    total = 0.0
    for r in range(1, levels + 1):
        pos = labels >= r
        if pos.sum() == 0:
            continue
        logits = scores / tau
        logits = logits - logits.max(dim=1, keepdim=True)[0]
        log_prob = logits - torch.log(torch.exp(logits).sum(1, keepdim=True) + 1e-6)
        mean_pos = (pos * log_prob * mask).sum(1) / (pos.sum(1) + 1e-6)
        total = total + (-mean_pos * (pos.sum(1) > 0)).mean()
    return total / divisor


def _reference_losses(out, targets):
    """QD-DETR's losses written the straightforward way (per-sample matching, level loop)."""
    import torch.nn.functional as F

    from lavis_c2f.ops.spans import generalized_temporal_iou

    def set_losses(head, gts):
        idx = _reference_matches(head, gts)
        b_idx = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(idx)])
        s_idx = torch.cat([s for s, _ in idx])
        src = head["pred_spans"][b_idx, s_idx]
        tgt = torch.cat([g[j] for g, (_, j) in zip(gts, idx)])
        giou = torch.diag(generalized_temporal_iou(span_cxw_to_xx(src), span_cxw_to_xx(tgt)))
        classes = torch.ones(head["pred_logits"].shape[:2], dtype=torch.long)
        classes[b_idx, s_idx] = 0
        ce = F.cross_entropy(head["pred_logits"].transpose(1, 2), classes,
                             torch.tensor([1.0, 0.1]), reduction="none")
        return {"loss_span": F.l1_loss(src, tgt, reduction="none").mean(),
                "loss_giou": (1 - giou).mean(), "loss_label": ce.mean()}

    gts = targets["span_labels"]
    losses = set_losses(out, gts)
    for i, aux in enumerate(out["aux_outputs"]):
        losses.update({f"{k}_{i}": v for k, v in set_losses(aux, gts).items()})
    s, neg, mask = out["saliency_scores"], out["saliency_scores_neg"], out["video_mask"]
    neg_pair = (-torch.log(1.0 - torch.sigmoid(neg)) * mask).sum(1).mean()
    rank = _reference_rank(s, neg, targets["saliency_all_labels"], mask)
    pos_i, neg_i = targets["saliency_pos_labels"], targets["saliency_neg_labels"]
    rows = torch.arange(len(s))
    pos_s = torch.stack([s[rows, pos_i[:, c]] for c in range(pos_i.shape[1])], 1)
    neg_s = torch.stack([s[rows, neg_i[:, c]] for c in range(neg_i.shape[1])], 1)
    margin = torch.clamp(0.2 + neg_s - pos_s, min=0).sum() / (len(s) * pos_i.shape[1]) * 2
    losses["loss_saliency"] = margin + rank + neg_pair
    return losses


@pytest.mark.parametrize("seed", range(3))
def test_criterion_equals_reference_path_losses_and_gradients(seed):
    """The batched matcher and the all-levels-at-once rank-contrastive term give the losses and
    gradients of the per-sample / per-level reference path (training curves unchanged)."""
    g = torch.Generator().manual_seed(100 + seed)
    bsz, q, lv = 8, 10, 75
    out = _outputs(bsz, q, lv, seed=seed)
    mask = torch.ones(bsz, lv)
    mask[1, 60:] = 0
    mask[5, 30:] = 0
    out["video_mask"] = mask
    gts, labels = [], torch.zeros(bsz, lv)
    for b in range(bsz):
        n = int(torch.randint(1, 4, (1,), generator=g))
        xx = torch.sort(torch.rand(n, 2, generator=g) * 0.5, dim=1)[0] + torch.tensor([0.0, 0.05])
        gts.append(span_xx_to_cxw(xx))
        a = int(torch.randint(0, 25, (1,), generator=g))
        labels[b, a:a + 6] = torch.randint(0, 13, (6,), generator=g).float()
    targets = {"span_labels": gts, "saliency_all_labels": labels,
               "saliency_pos_labels": torch.randint(0, 25, (bsz, 2), generator=g),
               "saliency_neg_labels": torch.randint(0, 25, (bsz, 2), generator=g)}
    leaves = [out["pred_logits"], out["pred_spans"], out["aux_outputs"][0]["pred_logits"],
              out["aux_outputs"][0]["pred_spans"], out["saliency_scores"], out["saliency_scores_neg"]]
    crit = SetCriterion(matcher=HungarianMatcher(), aux_layers=1)
    ours = crit(out, targets)
    grads = torch.autograd.grad(crit.weighted_total(ours), leaves)
    ref = _reference_losses(out, targets)
    ref_total = sum(ref[k] * w for k, w in crit.weight_dict.items())
    ref_grads = torch.autograd.grad(ref_total, leaves)
    for k in crit.weight_dict:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the matches themselves are those of the per-sample reference
    for (r0, c0), (r1, c1) in zip(crit.matcher(out, gts), _reference_matches(out, gts)):
        assert r0.tolist() == r1.tolist() and c0.tolist() == c1.tolist()
