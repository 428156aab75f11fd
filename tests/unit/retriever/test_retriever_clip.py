"""End-to-end CLIP towers (``clip_path``) with a tiny random CLIPConfig saved to a tmp dir."""
import pytest
import torch

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.retriever import C2FTMassRetriever


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=12),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=12)
    d = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(cfg).save_pretrained(str(d))
    return str(d)


def _batch(b=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (b, 8), generator=g)
    att = torch.ones(b, 8, dtype=torch.long)
    att[1, 5:] = 0
    ids[:, -1] = 63  # EOS = highest id (CLIP pools the argmax token)
    pix = torch.randn(b, 6, 3, 16, 16, generator=g)
    pmask = torch.ones(b, 6)
    pmask[2, 2:] = 0
    return {"txt_input_ids": ids, "txt_attention_mask": att, "vid_pixels": pix, "vid_pixels_mask": pmask,
            "vid": ["a", "b", "c"]}


def _model(path, **kw):
    return C2FTMassRetriever(text_input_dim=12, video_input_dim=12, embed_dim=12, num_frames=4, num_heads=1,
                             text_proj="none", video_proj="none", num_trials=3, clip_path=path, **kw)


def test_frozen_clip_towers_train_only_the_head(tiny_clip_dir):
    m = _model(tiny_clip_dir, freeze_clip=True).train()
    assert not m.clip.model.training  # frozen towers stay in eval mode
    out = m(_batch())
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in m.clip.parameters())
    assert m.pool.q_proj.weight.grad is not None


def test_fine_tuned_clip_towers_get_gradients_and_match_features(tiny_clip_dir):
    m = _model(tiny_clip_dir, freeze_clip=False, use_frame_word=True).train()
    b = _batch()
    m(b)["loss"].backward()
    grads = [p.grad for p in m.clip.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    m.eval()
    with torch.no_grad():
        t = m.encode_text(input_ids=b["txt_input_ids"], attention_mask=b["txt_attention_mask"])
        want = m.clip.model.get_text_features(input_ids=b["txt_input_ids"], attention_mask=b["txt_attention_mask"])
        assert torch.allclose(t.sentence, want, atol=1e-5)
        v = m.encode_video(pixel_values=b["vid_pixels"], pixel_mask=b["vid_pixels_mask"])
        assert v.frames.shape == (3, 4, 12) and v.mask[2].tolist() == [1, 1, 0, 0]
        # uniform selection of 4 of 6 frames: centres 0, 2, 3, 5
        f0 = m.clip.model.get_image_features(pixel_values=b["vid_pixels"][0, [0, 2, 3, 5]])
        assert torch.allclose(v.frames[0], f0, atol=1e-5)
        s = m.score(t, v)
    assert s.shape == (3, 3) and torch.isfinite(s).all()


def test_clip_path_errors(tmp_path, tiny_clip_dir):
    with pytest.raises(ConfigError, match="clip_path"):
        _model(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="text_input_dim"):
        C2FTMassRetriever(text_input_dim=16, video_input_dim=12, embed_dim=12, clip_path=tiny_clip_dir)
    m = C2FTMassRetriever(text_input_dim=12, video_input_dim=12, embed_dim=12)
    with pytest.raises(ValueError, match="CLIP"):
        m.encode_text(input_ids=torch.ones(1, 3, dtype=torch.long))
