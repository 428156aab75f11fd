"""End-to-end stage-1 inputs: CLIP frame transforms (T-MASS's clip_test / clip_train) and the
CLIP tokenizer processor."""
import numpy as np
import pytest
import torch

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.processors.clip_processors import CLIP_MEAN, CLIP_STD, ClipFrameProcessor, ClipTokenizer

from frames_helpers import BOS, EOS, write_char_tokenizer


def _frames(n=3, h=40, w=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_eval_transform_is_tmass_clip_test():
    from torchvision import transforms as T

    raw = _frames()
    official = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                          T.Normalize(CLIP_MEAN, CLIP_STD)])
    want = official(torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255)
    got = ClipFrameProcessor(32, mode="eval")(raw)
    assert got.shape == (3, 3, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_train_transform_draws_as_torchvision_from_its_generator(seed):
    from torchvision import transforms as T

    raw = _frames(seed=seed)
    official = T.Compose([T.RandomResizedCrop(32, scale=(0.5, 1.0)), T.RandomHorizontalFlip(),
                          T.ColorJitter(brightness=0, saturation=0, hue=0), T.Normalize(CLIP_MEAN, CLIP_STD)])
    torch.manual_seed(seed)
    want = official(torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255)
    got = ClipFrameProcessor(32, mode="train")(raw, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        ClipFrameProcessor(32)(raw.astype(np.float32))


def test_tokenizer_formats_and_errors(tmp_path):
    write_char_tokenizer(tmp_path)
    tok = ClipTokenizer(str(tmp_path), max_words=6)
    enc = tok(["ab c", "abcdefgh"])
    a, b, c = 0, 1, 2
    assert enc["input_ids"].tolist() == [[BOS, a, 26 + b, 26 + c, EOS, EOS],           # padded with EOS
                                         [BOS, a, b, c, 3, EOS]]                        # truncated, EOS kept
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    fixed = ClipTokenizer.from_config({"path": str(tmp_path), "max_words": 8, "padding": "max_length"})(["ab"])
    assert fixed["input_ids"].shape == (1, 8) and fixed["attention_mask"].sum() == 4
    with pytest.raises(ConfigError, match="no CLIP tokenizer files"):
        ClipTokenizer(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="unknown key"):
        ClipTokenizer.from_config({"path": str(tmp_path), "max_len": 3})
