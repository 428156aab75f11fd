"""Building blocks: pooling vs a reference-style implementation, masks, radius bins, frame
selection, ISA, Sinkhorn-Knopp and the InfoNCE duplicate masking."""
import math

import pytest
import torch

from lavis_c2f.models.retriever.modules import (
    InteractiveSimilarityAggregation, StochasticText, TextConditionedPooling, duplicate_mask, masked_softmax,
    radius_bin_index, sinkhorn_log_scaling, sinkhorn_normalize, sinkhorn_video_bias, symmetric_infonce)
from lavis_c2f.models.retriever.modules import frame_selection_weights


def _perturbed_pool(d=32, heads=4, seed=0):
    torch.manual_seed(seed)
    pool = TextConditionedPooling(d, num_heads=heads, dropout=0.0)
    with torch.no_grad():
        for p in pool.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return pool


def _naive_pool(pool, t, f, mask):
    """X-Pool/T-MASS block written out as in the reference (per-frame projections)."""
    h, dh, d = pool.num_heads, pool.head_dim, pool.embed_dim
    t1, f1 = pool.layer_norm1(t), pool.layer_norm1(f)
    q = pool.q_proj(t1).view(t.shape[0], h, dh)
    k = pool.k_proj(f1).view(*f.shape[:2], h, dh)
    v = pool.v_proj(f1).view(*f.shape[:2], h, dh)
    logits = torch.einsum("qhe,vfhe->qvhf", q, k) / math.sqrt(dh)
    logits = logits.masked_fill(mask[None, :, None, :] == 0, float("-inf"))
    a = torch.softmax(logits, -1)
    o = torch.einsum("qvhf,vfhe->qvhe", a, v).reshape(t.shape[0], f.shape[0], d)
    o = pool.layer_norm2(pool.out_proj(o))
    return pool.layer_norm3(o + pool.linear_proj(o)).reshape(-1, d)


def test_pooling_equals_reference_style_block_grid_and_pairs():
    pool = _perturbed_pool()
    t = torch.randn(3, 32)
    f = torch.randn(4, 6, 32) * 2 + 0.5
    mask = torch.ones(4, 6)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    g = pool.prepare_text(t)
    mu, isg = pool.frame_stats(f)
    got = pool.pool(g, f, mu, isg, mask)
    want = _naive_pool(pool, t, f, mask)
    assert got.shape == (12, 32)
    assert torch.allclose(got, want, atol=1e-5)
    qi = torch.tensor([2, 0, 1, 2])
    vi = torch.tensor([3, 1, 1, 0])
    pairs = pool.pool(g, f, mu, isg, mask, qi, vi)
    assert torch.allclose(pairs, want.view(3, 4, 32)[qi, vi], atol=1e-5)


def test_pooling_of_empty_video_is_finite_with_finite_gradients():
    pool = _perturbed_pool()
    pool.train()
    t = torch.randn(2, 32, requires_grad=True)
    f = torch.randn(2, 4, 32, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0]])
    g = pool.prepare_text(t)
    mu, isg = pool.frame_stats(f)
    out = pool.pool(g, f, mu, isg, mask, dropout=False)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(t.grad).all() and torch.isfinite(f.grad).all()
    assert f.grad[1].abs().sum() == 0  # padding frames get no gradient


def test_masked_softmax_all_masked_is_zero_not_nan():
    p = masked_softmax(torch.randn(2, 3), torch.tensor([[1.0, 0, 1], [0, 0, 0]]))
    assert torch.allclose(p[0].sum(), torch.tensor(1.0)) and p[0, 1] == 0
    assert torch.equal(p[1], torch.zeros(3))


def test_radius_bins_resample_valid_frames():
    bins = radius_bin_index(torch.tensor([12, 3, 24, 0]), 12)
    assert bins[0].tolist() == list(range(12))
    assert bins[1].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert bins[2].tolist() == [2 * j + 1 for j in range(12)]
    assert bins[3].tolist() == [0] * 12


def test_stochastic_text_identity_init_and_priors():
    st = StochasticText(num_frames=4, embed_dim=6, prior="uniform", radius_bias_init=-1.0)
    s = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert torch.allclose(st.log_radius(s), torch.tensor([[0.1 - 1, 0.2 - 1, 0.3 - 1, 0.4 - 1, -1.0, -1.0]]))
    g = torch.Generator().manual_seed(0)
    u = st.sample_eps((1000, 6), generator=g)
    assert u.min() >= 0 and u.max() < 1
    normal = StochasticText(4, 6, prior="normal", prior_std=3e-3)
    n = normal.sample_eps((20000, 6), generator=torch.Generator().manual_seed(0))
    assert abs(float(n.std()) - 3e-3) < 2e-4 and abs(float(n.mean())) < 1e-4
    with pytest.raises(ValueError, match="prior"):
        StochasticText(4, 6, prior="laplace")


def test_frame_selection_uniform_segment_mean_and_short_videos():
    mask = torch.zeros(3, 10)
    mask[0] = 1                    # 10 clips -> 4 frames
    mask[1, :3] = 1                # 3 clips -> kept as they are
    mask[2, [1, 4, 5, 8, 9]] = 1   # holes: 5 valid clips
    w, fm = frame_selection_weights(mask, 4, "uniform")
    assert w.shape == (3, 4, 10)
    assert fm.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]
    # 10 clips: centres floor((j + .5) * 10 / 4) = 1, 3, 6, 8
    assert w[0].argmax(-1).tolist() == [1, 3, 6, 8]
    assert w[1, :3].argmax(-1).tolist() == [0, 1, 2] and w[1, 3].sum() == 0
    # 5 valid clips at positions 1,4,5,8,9 -> compacted centres 0, 1, 3, 4 -> positions 1, 4, 8, 9
    assert w[2].argmax(-1).tolist() == [1, 4, 8, 9]
    ws, _ = frame_selection_weights(mask, 4, "segment_mean")
    # segments of 10 clips: [0,2) [2,5) [5,7) [7,10)
    assert torch.allclose(ws[0, 1, 2:5], torch.full((3,), 1 / 3)) and ws[0, 1].sum().item() == pytest.approx(1)
    assert torch.allclose(ws.sum(-1), fm)


def test_isa_identity_weights_and_masking():
    isa = InteractiveSimilarityAggregation(5, temperature=0.01).requires_grad_(False)
    s = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2]])
    m = torch.tensor([[1.0, 1, 1, 0, 1]])
    # identity W and a small temperature: the weight concentrates on the largest valid item
    assert float(isa(s, m)) == pytest.approx(0.5, abs=1e-3)
    assert float(isa(s, torch.zeros(1, 5))) == 0.0
    short = isa(s[:, :3], m[:, :3])  # shorter vectors use W[:3, :3]
    assert float(short) == pytest.approx(0.5, abs=1e-3)
    # a learned W changes the weighting (interaction between items)
    with torch.no_grad():
        isa.weight.copy_(torch.eye(5).roll(1, dims=1))
    assert float(isa(s, m)) != pytest.approx(0.5, abs=1e-3)
    x = s.clone().requires_grad_(True)
    isa(x, m).backward()
    assert torch.isfinite(x.grad).all()


def test_sinkhorn_rows_and_columns_sum_to_one():
    torch.manual_seed(0)
    s = torch.randn(6, 6) * 0.1
    p = sinkhorn_normalize(s, temperature=0.05, iters=50)
    assert torch.allclose(p.sum(0), torch.ones(6), atol=1e-4)
    assert torch.allclose(p.sum(1), torch.ones(6), atol=1e-4)
    # rectangular: rows sum to 1, columns to Q / V; with few iterations columns are exact
    r = torch.randn(4, 10) * 0.1
    p4 = sinkhorn_normalize(r, temperature=0.05, iters=4)
    assert torch.allclose(p4.sum(0), torch.full((10,), 0.4), atol=1e-5)
    p50 = sinkhorn_normalize(r, temperature=0.05, iters=200)
    assert torch.allclose(p50.sum(1), torch.ones(4), atol=1e-3)


def test_sinkhorn_video_bias_ranks_like_normalised_probabilities():
    torch.manual_seed(1)
    s = torch.randn(7, 9) * 0.1
    bias = sinkhorn_video_bias(s, 0.02, 4)
    assert bias.shape == (9,)
    assert float(torch.logsumexp(bias, 0)) == pytest.approx(0.0, abs=1e-5)
    p = sinkhorn_normalize(s, 0.02, 4)
    ranked_bias = torch.argsort(s / 0.02 + bias, dim=1, descending=True)
    ranked_p = torch.argsort(p, dim=1, descending=True)
    assert torch.equal(ranked_bias, ranked_p)
    log_r, log_c = sinkhorn_log_scaling(s, 0.02, 4)
    assert log_r.shape == (7,) and log_c.shape == (9,)


def test_infonce_duplicate_masking():
    assert duplicate_mask(["a", "b", "c"]) is None
    dm = duplicate_mask(["a", "b", "a"])
    assert dm.tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    torch.manual_seed(0)
    logits = torch.randn(3, 3) * 3
    masked = symmetric_infonce(logits, dm)
    plain = symmetric_infonce(logits)
    assert masked < plain  # the duplicate no longer competes as a negative
    manual = logits.clone()
    manual[0, 2] = manual[2, 0] = -1e9
    t = torch.arange(3)
    want = (torch.nn.functional.cross_entropy(manual, t) + torch.nn.functional.cross_entropy(manual.t(), t)) / 2
    assert torch.allclose(masked, want)


def test_folded_layernorm_is_accurate_for_offset_features():
    pool = _perturbed_pool()
    f = torch.randn(2, 5, 32) * 0.01 + 3.0          # |mean| >> std: the one-pass variance would cancel
    mu, isg = pool.frame_stats(f)
    ref = torch.nn.functional.layer_norm(f, (32,), eps=pool.layer_norm1.eps)
    assert torch.allclose((f - mu.unsqueeze(-1)) * isg.unsqueeze(-1), ref, atol=2e-3)
    t = torch.randn(3, 32)
    got = pool.pool(pool.prepare_text(t), f, mu, isg, torch.ones(2, 5))
    assert torch.allclose(got, _naive_pool(pool, t, f, torch.ones(2, 5)), atol=2e-3)
