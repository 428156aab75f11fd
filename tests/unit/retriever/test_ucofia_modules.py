"""UCoFiA building blocks on small random inputs, against their formulas (README points 2, 4, 6)."""
import math

import pytest
import torch

from lavis_c2f.models.retriever.modules import (InteractiveSimilarityAggregation, sinkhorn_video_bias,
                                                two_way_isa)
from lavis_c2f.models.retriever.patch_tokens import patch_shift, perturbed_topk


def test_perturbed_topk_forward_and_gradient_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 9, generator=g, dtype=torch.float64).requires_grad_(True)
    noise = torch.randn(5, 40, 9, generator=g, dtype=torch.float64)
    ind = perturbed_topk(scores, 3, noise, 0.05)
    idx = torch.sort(torch.topk(scores.detach().unsqueeze(1) + 0.05 * noise, 3, dim=-1).indices, -1).values
    onehot = torch.nn.functional.one_hot(idx, 9).double()                        # (N, S, k, D)
    assert torch.allclose(ind, onehot.mean(1))
    assert torch.allclose(ind.sum(-1), torch.ones(5, 3, dtype=torch.float64))
    up = torch.randn(5, 3, 9, generator=g, dtype=torch.float64)
    (ind * up).sum().backward()
    expected = torch.einsum("nskd,nsd->nkd", onehot, noise) / 40 / 0.05
    assert torch.allclose(scores.grad, (up * expected).sum(1))
    with pytest.raises(ValueError, match="noise"):
        perturbed_topk(scores, 3, noise[:, :, :5], 0.05)


def test_patch_shift_moves_the_documented_tokens():
    v, f, t, w = 2, 3, 15, 4                               # fold = 15 // 7 = 2
    x = torch.arange(v * f * t * w, dtype=torch.float32).view(v * f, t, w)
    y = patch_shift(x, f).view(v, f, t, w)
    x4 = x.view(v, f, t, w)
    left, right = list(range(1, t, 2)), list(range(4, t, 2))
    for tok in range(t):
        if tok in right:          # the later assignment wins where the two sets meet
            assert torch.equal(y[:, :-1, tok], x4[:, 1:, tok]) and torch.equal(y[:, -1, tok], x4[:, -1, tok])
        elif tok in left:
            assert torch.equal(y[:, 1:, tok], x4[:, :-1, tok]) and torch.equal(y[:, 0, tok], x4[:, 0, tok])
        else:
            assert torch.equal(y[:, :, tok], x4[:, :, tok])
    with pytest.raises(ValueError, match="videos"):
        patch_shift(x[:5], f)


def test_column_first_sinkhorn_is_the_official_formula():
    """b = 1 / K.sum(0); 4 x (a = 1 / (K b), b = 1 / (a K)); log_softmax(log b)."""
    g = torch.Generator().manual_seed(1)
    logits = 30 * torch.rand(7, 5, generator=g, dtype=torch.float64)    # wide range: the start matters
    k = torch.exp(logits - logits.max())
    b = 1 / k.sum(0)
    for _ in range(4):
        a = 1 / (k @ b)
        b = 1 / (a @ k)
    official = torch.log_softmax(b.log(), 0)
    ours = sinkhorn_video_bias(logits, 1.0, 4, column_first=True)
    assert torch.allclose(ours, official, atol=1e-12)
    assert not torch.allclose(sinkhorn_video_bias(logits, 1.0, 4), official, atol=1e-6)


def test_unmasked_isa_and_two_way_isa_are_the_official_expressions():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 6, 8, generator=g)                                  # (pairs, words, items)
    isa = [InteractiveSimilarityAggregation(n, 0.01) for n in (6, 8, 8, 6)]
    with torch.no_grad():
        for m in isa:
            m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=g))
    sm = torch.softmax
    w1, w2, w3, w4 = (m.weight for m in isa)
    per_item = (sm((sm(x / 0.01, 1).transpose(1, 2) @ w1) / 0.01, -1).transpose(1, 2) * x).sum(1)
    s2i = (sm((sm(per_item / 0.01, -1) @ w2) / 0.01, -1) * per_item).sum(-1)
    per_word = (sm((sm(x / 0.01, -1) @ w3) / 0.01, -1) * x).sum(-1)
    i2w = (sm((sm(per_word / 0.01, -1) @ w4) / 0.01, -1) * per_word).sum(-1)
    with torch.no_grad():
        ours = two_way_isa(x, None, None, *isa)
        assert torch.allclose(ours, (s2i + i2w) / 2, atol=1e-6)
        ones = torch.ones(3, 6), torch.ones(3, 8)
        assert torch.allclose(two_way_isa(x, *ones, *isa), ours, atol=1e-6)
    assert math.isfinite(float(ours.sum()))


def test_init_from_clip_follows_the_official_trainer(tmp_path):
    from ucofia_helpers import write_openai_clip

    from lavis_c2f.common.errors import ConfigError
    from lavis_c2f.models.retriever import C2FUCoFiA, init_ucofia_from_clip

    path = write_openai_clip(tmp_path / "ViT-B-32.pt", embed=16, width=16, vision_layers=2, text_layers=2)
    sd = {k: v.float() for k, v in torch.load(path, weights_only=True).items()}
    m = init_ucofia_from_clip(str(path), max_words=8, max_frames=4, temporal_layers=3, shift_layers=[1])
    own = m.state_dict()
    assert torch.equal(own["frame_position_embeddings.weight"], sd["positional_embedding"])
    k_proj = sd["transformer.resblocks.1.attn.in_proj_weight"][16:32]          # temporal block 1 = text block 1
    assert torch.equal(own["temporal.layers.1.self_attn.k_proj.weight"], k_proj)
    assert torch.equal(own["clip.model.text_projection.weight"], sd["text_projection"].t())
    assert torch.equal(own["clip.model.vision_model.encoder.layers.1.mlp.fc1.weight"],
                       sd["visual.transformer.resblocks.1.mlp.c_fc.weight"])
    assert torch.equal(own["global_mat_weight"], torch.eye(16)) and torch.equal(own["frame_isa.weight"], torch.eye(4))
    assert m.temporal.layers[0].layer_norm1.eps == 1e-12 and m.hparams["frame_positions"] == 77
    cfg = {"arch": "c2f_ucofia_retriever", "clip_weights": str(path), "max_words": 8, "max_frames": 4,
           "temporal_layers": 1, "shift_layers": [1], "sk_norm": False}
    assert C2FUCoFiA.from_config(cfg).sk_norm is False
    with pytest.raises(ConfigError, match="clip_weights"):
        C2FUCoFiA.from_config({k: v for k, v in cfg.items() if k != "clip_weights"})
    with pytest.raises(ConfigError, match="max_frame"):
        C2FUCoFiA.from_config({**cfg, "max_frame": 4})


def test_quirk_switches_do_what_docs_ucofia_md_says():
    from ucofia_helpers import random_texts, random_videos, tiny_ucofia

    from lavis_c2f.models.retriever import UCoFiAText, UCoFiAVideo

    te, ve = random_texts(3, words=4), random_videos(5)
    g = torch.Generator().manual_seed(9)
    te2 = UCoFiAText(te.sentence, torch.where(te.mask.bool()[..., None], te.words,
                                              torch.randn(te.words.shape, generator=g)), te.mask)
    pmask = ve.mask.repeat_interleave(4, 1).bool()[..., None]
    ve2 = UCoFiAVideo(torch.where(ve.mask.bool()[..., None], ve.frames, torch.randn(ve.frames.shape, generator=g)),
                      ve.mask, torch.where(pmask, ve.patches, torch.randn(ve.patches.shape, generator=g)), ve.video)
    with torch.no_grad():
        official = tiny_ucofia()
        a, b = official.level_logits(te, ve), official.level_logits(te2, ve2)
        assert not torch.allclose(a[1:], b[1:])                              # padding counts (official)
        words = tiny_ucofia(mask_padded_words=True)
        torch.testing.assert_close(words.level_logits(te, ve)[2], words.level_logits(te2, ve)[2])
        frames = tiny_ucofia(mask_padded_frames=True)
        torch.testing.assert_close(frames.level_logits(te, ve)[1:], frames.level_logits(te, ve2)[1:])
        scaled = UCoFiAVideo(ve.frames, ve.mask, 3.0 * ve.patches, ve.video)
        norm = tiny_ucofia(normalize_pixels=True)
        torch.testing.assert_close(norm.level_logits(te, ve)[2], norm.level_logits(te, scaled)[2])
        s = float(official.clip.logit_scale.exp())
        torch.testing.assert_close(tiny_ucofia(pixel_logit_scale=True).level_logits(te, ve)[2], s * a[2])
        torch.testing.assert_close(tiny_ucofia(eval_pixel_weight=True).level_logits(te, ve),
                                   official.level_logits(te, ve, pixel_weight=True))
        assert not torch.allclose(official.level_logits(te, ve, pixel_weight=True)[2], a[2])
