"""Inference noise: ``shared`` (one set of trial vectors for every pair) vs ``per_pair`` (fresh
noise per (text, video, trial), as the official evaluation) and explicit noise."""
import pytest
import torch

from lavis_c2f.common.errors import ConfigError

from retriever_helpers import embed, random_batch, tiny_model


@pytest.mark.parametrize("prior", ["uniform", "normal"])
def test_per_pair_noise_is_reproducible_and_block_invariant(prior):
    m = tiny_model(stochastic_prior=prior, prior_std=0.5, inference_noise="per_pair", num_trials=6)
    t, v = embed(m, random_batch(b=7, seed=3))
    full = m.score(t, v)
    torch.testing.assert_close(m.score(t, v), full, atol=0, rtol=0)                    # same call, same noise
    torch.testing.assert_close(m.score(t, v, block_size=3), full, atol=1e-6, rtol=0)  # videos split in blocks
    parts = torch.cat([m.score(t[a:a + 3], v, text_ids=list(range(a, min(7, a + 3)))) for a in range(0, 7, 3)])
    torch.testing.assert_close(parts, full, atol=1e-6, rtol=0)                        # queries split by callers
    shared = m.configure_inference(inference_noise="shared").score(t, v)
    assert (shared - full).abs().max() > 1e-4
    # per-pair scores are the best of K samples drawn independently for every pair
    m.configure_inference(inference_noise="per_pair")
    g = m.text_noise_generator(2)
    eps = m.stochastic.sample_eps_rows(7, (6, m.embed_dim), g)                          # text 2, videos 0..6
    noise = torch.zeros(7, 7, 6, m.embed_dim)
    noise[2] = eps
    torch.testing.assert_close(m.score(t, v, noise=noise)[2], full[2], atol=1e-6, rtol=0)


def test_explicit_noise_and_errors():
    m = tiny_model(num_trials=3)
    t, v = embed(m, random_batch(b=4, seed=1))
    zero = m.score(t, v, noise=torch.zeros(4, 4, 2, m.embed_dim))
    det = m.configure_inference(inference_mode="deterministic").score(t, v)
    torch.testing.assert_close(zero, det, atol=1e-6, rtol=0)                           # eps = 0 -> cos(t, pool)
    m.configure_inference(inference_mode="trials")
    with pytest.raises(ValueError, match=r"noise must be \(Q=4, V=4, K, D=16\)"):
        m.score(t, v, noise=torch.zeros(4, 3, 2, 16))
    with pytest.raises(ValueError, match="3 text_ids for 4 queries"):
        m.score(t, v, text_ids=[0, 1, 2])
    m.configure_inference(inference_noise="per_pair")
    with pytest.raises(ConfigError, match="score_pairs: inference_noise 'per_pair'"):
        m.score_pairs(t, v, torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="inference_noise"):
        m.configure_inference(inference_noise="fresh")


def test_duplicate_videos_option_and_logit_scale_clamp():
    batch = random_batch(b=4, seed=2, vids=["a", "b", "a", "c"])
    torch.manual_seed(0)
    masked = tiny_model(pool_dropout=0.0).train()
    plain = tiny_model(pool_dropout=0.0, mask_duplicate_videos=False).train()
    with torch.no_grad():
        masked.logit_scale.fill_(masked.logit_scale_max + 1.0)       # above the clamp
        t, v = masked.encode_text_batch(batch), masked.encode_video_batch(batch)
        eps = torch.rand(4, masked.embed_dim)
        want_masked = masked.contrastive_losses(t, v, batch["vid"], noise=eps)
        want_plain = masked.contrastive_losses(t, v, None, noise=eps)
    assert masked.logit_scale.item() == pytest.approx(masked.logit_scale_max)   # clamped in place in training
    assert want_masked["loss_nce"] < want_plain["loss_nce"]
    plain.load_state_dict(masked.state_dict())
    torch.manual_seed(1)
    got = plain(batch)
    torch.manual_seed(1)
    ref = masked.contrastive_losses(masked.encode_text_batch(batch), masked.encode_video_batch(batch), None)
    torch.testing.assert_close(got["loss"], ref["loss"])
