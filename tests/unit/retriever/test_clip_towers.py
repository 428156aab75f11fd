"""ClipTowers built from a local folder, from CLIPConfig arguments, and their errors."""
import pytest
import torch

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.retriever.clip_towers import ClipTowers, build_clip_config, clip_config_from_path

TINY = dict(text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=10),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=16, patch_size=8),
            projection_dim=8)


def test_from_config_and_from_path_give_the_same_features(tmp_path):
    torch.manual_seed(0)
    a = ClipTowers.from_config(TINY, freeze=False)
    assert a.projection_dim == 8 and a.image_size == 16 and a.logit_scale.requires_grad
    a.model.save_pretrained(str(tmp_path))
    assert clip_config_from_path(str(tmp_path))["projection_dim"] == 8
    b = ClipTowers.from_path(str(tmp_path), freeze=True)
    assert not any(p.requires_grad for p in b.parameters())
    b.train()
    assert not b.model.training            # frozen towers stay in eval mode
    ids = torch.tensor([[38, 5, 7, 39, 39], [38, 9, 39, 39, 39]])
    att = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    px = torch.randn(3, 3, 16, 16)
    a.eval()
    with torch.no_grad():
        tok, m, sent = a.encode_text(ids, att)
        assert tok.shape == (2, 5, 8) and m.dtype == tok.dtype
        torch.testing.assert_close(sent, a.model.get_text_features(input_ids=ids, attention_mask=att))
        torch.testing.assert_close(b.encode_text(ids, att)[2], sent)
        torch.testing.assert_close(b.encode_frames(px), a.model.get_image_features(pixel_values=px))


def test_errors_name_the_folder_or_key(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ClipTowers.from_path(str(tmp_path))
    with pytest.raises(ConfigError, match="no config.json"):
        clip_config_from_path(str(tmp_path))
    with pytest.raises(ConfigError, match="clip_config: expected a mapping"):
        build_clip_config([1, 2])
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        clip_config_from_path(str(tmp_path))
