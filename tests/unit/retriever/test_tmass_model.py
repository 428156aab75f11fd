"""c2f_tmass_retriever: config, encoders, stochastic inference, UCoFiA levels, blockwise scoring."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.retriever import C2FTMassRetriever, MeanPoolingBaseline, TextEmbedding, VideoEmbedding
from lavis_c2f.models.retriever.modules import l2norm
from retriever_helpers import TINY, embed, random_batch, tiny_model


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("model_type", ["default", "ucofia", "demo"])
def test_shipped_configs_build_through_lavis(model_type):
    from lavis.common.registry import registry

    path = C2FTMassRetriever.default_config_path(model_type)
    assert path.startswith("/")
    cls = registry.get_model_class("c2f_tmass_retriever")
    assert cls is C2FTMassRetriever
    m = cls.from_config(OmegaConf.load(path).model)
    assert m.levels and m.num_frames == 12


def test_from_config_rejects_unknown_and_bad_values():
    base = {"arch": "c2f_tmass_retriever", "model_type": "default", "load_finetuned": False, **TINY}
    m = C2FTMassRetriever.from_config(OmegaConf.create(base))
    assert m.embed_dim == 16
    with pytest.raises(ConfigError, match="num_framez"):
        C2FTMassRetriever.from_config(OmegaConf.create({**base, "num_framez": 3}))
    with pytest.raises(ConfigError, match="num_frames"):
        C2FTMassRetriever.from_config(OmegaConf.create({**base, "num_frames": "many"}))
    with pytest.raises(ConfigError, match="stochastic_prior"):
        C2FTMassRetriever.from_config(OmegaConf.create({**base, "stochastic_prior": "laplace"}))
    with pytest.raises(ConfigError, match="use_video_sentence"):
        C2FTMassRetriever.from_config(OmegaConf.create({**base, "use_video_sentence": False}))
    with pytest.raises(ConfigError, match="sinkhorn"):
        C2FTMassRetriever.from_config(OmegaConf.create({**base, "sinkhorn": "yes"}))
    with pytest.raises(ConfigError, match="text_proj"):
        C2FTMassRetriever.from_config(OmegaConf.create({**base, "text_proj": "none"}))  # 24 != 16


def test_configure_inference_only_touches_inference_keys():
    m = tiny_model()
    fp = m.fingerprint()
    m.configure_inference(inference_mode="deterministic", num_trials=7, eval_seed=3)
    assert m.inference_mode == "deterministic" and m.num_trials == 7 and m.hparams["eval_seed"] == 3
    assert m.fingerprint() == fp  # stored embeddings stay valid
    with pytest.raises(ConfigError, match="embed_dim"):
        m.configure_inference(embed_dim=8)
    with torch.no_grad():
        m.pool.q_proj.weight.add_(0.1)
    assert m.fingerprint()["weights_hash"] != fp["weights_hash"]


# ---------------------------------------------------------------- encoders

def test_encoders_shapes_masks_and_prefilter():
    m = tiny_model()
    b = random_batch()
    t, v = embed(m, b)
    assert t.sentence.shape == (5, 16) and t.tokens.shape[0] == 5 and t.tokens.shape[1] <= m.max_words
    assert torch.equal(t.token_mask.sum(1), b["src_txt_mask"].sum(1).clamp(max=m.max_words))
    assert v.frames.shape[0] == 5 and v.frames.shape[1] <= m.num_frames
    lens = b["src_vid_mask"].sum(1).clamp(max=m.num_frames)
    assert torch.equal(v.mask.sum(1), lens)
    # valid frames first, padding zeroed
    for i in range(5):
        n = int(lens[i])
        assert v.mask[i, :n].all() and not v.mask[i, n:].any() and v.frames[i, n:].abs().sum() == 0
    pv, pq = m.prefilter_vectors(v), m.prefilter_query(t)
    assert pv.dtype == torch.float32 and torch.allclose(pv.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(pq.norm(dim=1), torch.ones(5), atol=1e-5)
    with pytest.raises(ValueError, match="src_vid"):
        m.encode_video(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="txt_pooled"):
        m.encode_text(None, None, torch.randn(2, 5))


def test_prefilter_segment_vectors():
    m = tiny_model()
    frames = torch.randn(3, 5, 16)
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    v = VideoEmbedding(frames * mask.unsqueeze(-1), mask, torch.zeros(3, 16))
    one, valid1 = m.prefilter_segment_vectors(v, 1)
    pooled = l2norm((l2norm(frames) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1))
    assert torch.allclose(one[:, 0], pooled, atol=1e-6) and valid1.tolist() == [[True], [True], [False]]
    seg, valid = m.prefilter_segment_vectors(v, 3)
    assert seg.shape == (3, 3, 16)
    # 5 frames -> segments [0,1) [1,3) [3,5); 2 frames -> [0,0) [0,1) [1,2): the first is empty
    assert valid.tolist() == [[True, True, True], [False, True, True], [False, False, False]]
    assert torch.allclose(seg[0, 1], l2norm(l2norm(frames[0, 1:3]).mean(0)), atol=1e-6)
    assert seg[1, 0].abs().sum() == 0 and seg[2].abs().sum() == 0


def test_text_without_pooled_uses_token_mean():
    m = tiny_model()
    b = random_batch()
    t = m.encode_text(b["src_txt"], b["src_txt_mask"], None)
    mask = b["src_txt_mask"].unsqueeze(-1)
    mean = (b["src_txt"] * mask).sum(1) / mask.sum(1)
    assert torch.allclose(t.sentence, m.text_projection(mean), atol=1e-5)


# ---------------------------------------------------------------- stochastic inference

def test_trial_noise_is_seeded_shaped_and_prefix_stable():
    m = tiny_model(num_trials=6)
    e1, e2 = m.trial_noise(), tiny_model(seed=5, num_trials=6).trial_noise()
    assert e1.shape == (6, 16) and torch.equal(e1, e2)       # depends on eval_seed only
    assert e1.min() >= 0 and e1.max() < 1                    # uniform prior
    m.configure_inference(num_trials=3)
    assert torch.equal(m.trial_noise(), e1[:3])
    m.configure_inference(eval_seed=1)
    assert not torch.equal(m.trial_noise(), e1[:3])
    m.configure_inference(trial_include_mean=True)
    assert m.trial_noise().shape == (4, 16) and m.trial_noise()[0].abs().sum() == 0


def test_scores_reproducible_and_more_trials_never_worse():
    m = tiny_model(num_trials=3)
    t, v = embed(m, random_batch())
    s3 = m.score(t, v)
    assert torch.equal(s3, m.score(t, v))
    m.configure_inference(num_trials=12)
    s12 = m.score(t, v)
    assert (s12 >= s3 - 1e-6).all() and (s12 > s3 + 1e-6).any()


def test_deterministic_mode_is_cosine_with_pooled_and_trials_with_mean_dominate():
    m = tiny_model(inference_mode="deterministic")
    t, v = embed(m, random_batch())
    det = m.score(t, v)
    pt, pv = m._prepare_text(t), m._prepare_video(v)
    pooled = m.pool.pool(pt.g, pv.frames, pv.mu, pv.inv_sigma, pv.mask, dropout=False).view(5, 5, -1)
    want = torch.cosine_similarity(t.sentence.unsqueeze(1), pooled, dim=-1)
    assert torch.allclose(det, want, atol=1e-5)
    m.configure_inference(inference_mode="trials", trial_include_mean=True, num_trials=5)
    best = m.score(t, v)
    assert (best >= det - 1e-6).all()
    # trial scores are the reference's: max over k of cos(t + eps_k * R, pooled)
    eps = m.trial_noise()
    sims = torch.cosine_similarity(l2norm(t.sentence).unsqueeze(1).unsqueeze(2),
                                   l2norm(v.frames).unsqueeze(0), dim=-1)            # (Q, V, F)
    bins = pv.bins
    s = torch.stack([sims[:, j].gather(1, bins[j].unsqueeze(0).expand(5, -1)) for j in range(5)], 1)
    radius = torch.exp(m.stochastic.log_radius(s))                                  # (Q, V, D)
    ts = t.sentence[:, None, None, :] + eps[None, None] * radius.unsqueeze(2)       # (Q, V, K, D)
    manual = torch.cosine_similarity(ts, pooled.unsqueeze(2), dim=-1).max(-1).values
    assert torch.allclose(best, manual, atol=1e-5)


# ---------------------------------------------------------------- levels, blocks, pairs

@pytest.mark.parametrize("levels", [
    dict(),
    dict(use_frame_sentence=True),
    dict(use_frame_word=True),
    dict(use_video_sentence=False, use_frame_sentence=True),
    dict(use_frame_sentence=True, use_frame_word=True, weight_frame_word=2.0),
])
def test_ucofia_switches_and_weighted_combination(levels):
    m = tiny_model(**levels)
    t, v = embed(m, random_batch())
    out, raw = m.score(t, v, return_levels=True)
    assert set(raw) == set(m.levels)
    w = m.level_weights()
    assert sum(w.values()) == pytest.approx(1.0)
    assert torch.allclose(out, sum(w[k] * raw[k] for k in raw), atol=1e-6)
    assert torch.isfinite(out).all()
    if "frame_sentence" in raw:
        # frame-sentence alone: ISA over the sentence-frame cosines
        sims = torch.cosine_similarity(l2norm(t.sentence)[:, None, None], l2norm(v.frames)[None], dim=-1)
        want = m.isa_frame_sentence(sims.reshape(25, -1), v.mask.repeat(5, 1)).view(5, 5)
        assert torch.allclose(raw["frame_sentence"], want, atol=1e-5)


def test_frame_word_level_needs_tokens():
    m = tiny_model(use_frame_word=True)
    t = TextEmbedding(torch.randn(2, 16))
    _, v = embed(m, random_batch(b=2))
    with pytest.raises(ValueError, match="token"):
        m.score(t, v)


@pytest.mark.parametrize("levels", [dict(), dict(use_frame_sentence=True, use_frame_word=True, sinkhorn=True)])
def test_blockwise_score_equals_one_shot(levels):
    m = tiny_model(**levels)
    t, v = embed(m, random_batch(b=7, seed=3))
    full = m.score(t, v, block_size=10_000)
    for bs in (1, 3, 7, 20):
        assert torch.allclose(m.score(t, v, block_size=bs), full, atol=1e-5), bs


def test_score_pairs_equals_grid_entries():
    m = tiny_model(use_frame_sentence=True, use_frame_word=True)
    t, v = embed(m, random_batch(b=6, seed=2))
    grid = m.score(t, v)
    qi = torch.tensor([0, 5, 3, 3, 1])
    vi = torch.tensor([2, 2, 0, 5, 1])
    assert torch.allclose(m.score_pairs(t, v, qi, vi, block_size=2), grid[qi, vi], atol=1e-5)


def test_sinkhorn_self_normalisation_and_bank_bias():
    m = tiny_model(sinkhorn=True, use_frame_sentence=True, sinkhorn_temperature=0.05)
    t, v = embed(m, random_batch(b=6))
    out, raw = m.score(t, v, return_levels=True)
    from lavis_c2f.models.retriever.modules import sinkhorn_video_bias

    w = m.level_weights()
    want = sum(w[k] * (raw[k] / 0.05 + sinkhorn_video_bias(raw[k], 0.05, 4)) for k in m.levels)
    assert torch.allclose(out, want, atol=1e-4)
    bank = TextEmbedding(torch.randn(9, 16), torch.randn(9, 3, 16), torch.ones(9, 3))
    bias = m.compute_video_bias(bank, v)
    assert bias.shape == (6, 2)
    with_bias = m.score(t, v, video_bias=bias)
    assert torch.allclose(with_bias, sum(w[k] * (raw[k] / 0.05 + bias[:, i]) for i, k in enumerate(m.levels)),
                          atol=1e-4)
    qi, vi = torch.tensor([1, 4]), torch.tensor([3, 0])
    assert torch.allclose(m.score_pairs(t, v, qi, vi, video_bias=bias), with_bias[qi, vi], atol=1e-4)
    with pytest.raises(ValueError, match="video_bias"):
        m.score(t, v, video_bias=torch.zeros(5, 2))


# ---------------------------------------------------------------- training losses

def test_loss_finite_with_all_padding_videos_and_gradients_finite():
    m = tiny_model(use_frame_sentence=True, use_frame_word=True).train()
    b = random_batch()
    b["src_vid_mask"][1] = 0
    b["src_vid_mask"][3] = 0
    out = m(b)
    assert set(out) >= {"loss", "loss_nce", "loss_support"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    for n, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    m.eval()
    t, v = embed(m, b)
    assert torch.isfinite(m.score(t, v)).all()


def test_support_loss_weight_and_duplicate_videos():
    m = tiny_model(support_loss_weight=0.5).train()
    b = random_batch(vids=["a", "b", "a", "c", "d"])
    torch.manual_seed(0)
    out_dup = m(b)
    assert out_dup["loss"].item() == pytest.approx(out_dup["loss_nce"].item() + 0.5 * out_dup["loss_support"].item(),
                                                   rel=1e-5)
    torch.manual_seed(0)
    out_plain = m({**b, "vid": None})
    assert out_dup["loss_nce"] < out_plain["loss_nce"]   # the duplicate is no longer a negative
    m0 = tiny_model(support_loss_weight=0.0).train()
    assert m0(b)["loss_support"].item() == 0.0


def test_logit_scale_is_clamped():
    m = tiny_model(logit_scale_init=math.log(100.0), logit_scale_max=math.log(100.0)).train()
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert m(random_batch())["logit_scale"].item() == pytest.approx(100.0, rel=1e-5)


# ---------------------------------------------------------------- baseline

def test_mean_pooling_baseline_is_cosine_of_means():
    base = MeanPoolingBaseline()
    src_vid = torch.randn(3, 4, 8)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    v = base.encode_video(src_vid, mask)
    t = base.encode_text(txt_pooled=torch.randn(2, 8))
    s = base.score(t, v, block_size=2)
    mean1 = l2norm(src_vid[1, :2]).mean(0)
    assert s[0, 1].item() == pytest.approx(torch.cosine_similarity(t.sentence[0], mean1, dim=0).item(), abs=1e-5)
    assert torch.equal(s[:, 2], torch.zeros(2))
    with pytest.raises(ValueError, match="width"):
        base.score(TextEmbedding(torch.randn(1, 5)), v)


def test_embedding_containers():
    v = VideoEmbedding(torch.randn(3, 2, 4), torch.ones(3, 2), torch.randn(3, 4))
    w = VideoEmbedding(torch.randn(2, 5, 4), torch.ones(2, 5), torch.randn(2, 4))
    c = VideoEmbedding.cat([v, w])
    assert c.frames.shape == (5, 5, 4) and c.mask[:3, 2:].sum() == 0 and len(c[1:3]) == 2 and len(c[[0, 4]]) == 2
    with pytest.raises(ValueError):
        VideoEmbedding(torch.randn(3, 2, 4), torch.ones(3, 3), torch.randn(3, 4))
    with pytest.raises(ValueError):
        TextEmbedding(torch.randn(2, 4), torch.randn(2, 3, 4), None)


def test_video_embedding_pools_on_first_access_when_not_given():
    frames, mask = torch.randn(3, 4, 6), torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    frames = frames * mask.unsqueeze(-1)
    lazy = VideoEmbedding(frames, mask)
    assert lazy[1:]._pooled is None and lazy.detach()._pooled is None      # slicing does not pool
    unit = frames / frames.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    mean = (unit * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    want = mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    assert torch.allclose(lazy.pooled, want, atol=1e-6) and torch.equal(lazy.pooled[2], torch.zeros(6))
    assert torch.equal(lazy[1:].pooled, lazy.pooled[1:])
    with pytest.raises(ValueError, match="pooled"):
        VideoEmbedding(frames, mask, torch.zeros(3, 5))
