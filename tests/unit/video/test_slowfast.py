"""SlowFast clip features (c2f_feature_slowfast), CLIP+SlowFast side by side (c2f_feature_concat),
their checkpoints (Caffe2 .pkl, PySlowFast and pytorchvideo .pyth) and HERO's frame sampling.

Random weights and tiny inputs (crop 32, 8 frames) except one slow full-size check; the real
Kinetics weights are tested in tests/weights/test_slowfast_weights.py."""
from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

pytest.importorskip("pytorchvideo")

from conftest import read_ids  # noqa: E402  (tests/unit/video/conftest.py)
from lavis_c2f.common.errors import ConfigError  # noqa: E402
from lavis_c2f.video import slowfast as sf  # noqa: E402
from lavis_c2f.video.backbones import (BackboneLoadError, ConcatBackbone, HeroSlowFastSampling,  # noqa: E402
                                       UniformSampling, backbone_key, build_backbone, short_backbone_name)

TINY = {"random_init": 0, "crop_size": 32, "num_frames": 8}


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("slowfast", **TINY)


def _clips(n=2, f=8, h=32, w=48, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, f, h, w, 3)).astype(np.uint8)


# --------------------------------------------------------------------------- sampling


def test_hero_frame_slots():
    # 30 fps source: floor(linspace(0, 63, 32)) = 0, 2, 4, ... clamped to the 60 slots of a 2 s clip
    got = sf.hero_frame_slots(2.0, 30.0)
    want = np.minimum(np.floor(np.linspace(0, 63, 32, dtype=np.float32)).astype(np.int64), 59)
    assert got.tolist() == want.tolist() and got[0] == 0 and got[-1] == 59 and got[1] == 2
    # HERO uses floor(source fps): 29.97 -> 29, 25 fps spans 53.3 slots
    assert sf.hero_frame_slots(2.0, 29.97).tolist() == sf.hero_frame_slots(2.0, 29.0).tolist()
    assert sf.hero_frame_slots(2.0, 25.0)[-1] == 52
    assert sf.hero_frame_slots(2.0, float("nan")).tolist() == got.tolist()  # unknown rate: the grid's own
    off = HeroSlowFastSampling().offsets(2.0, 30.0)
    np.testing.assert_allclose(off, (got + 0.5) / 30)


def test_decoder_takes_the_30fps_grid_frames(media):
    """At 30 fps, grid slot n shows source frame n: clip k holds frames 60k + slots (the last
    frame repeats past the end of the 100-frame video), in the order the offsets are given."""
    from lavis_c2f.video.decode import decode_clips

    slots = sf.hero_frame_slots(2.0, 30.0, num_frames=8)
    offsets = HeroSlowFastSampling(num_frames=8).offsets(2.0, 30.0)
    res = decode_clips(media["id30"], 2.0, offsets=offsets, backend="pyav")
    ids = np.asarray(read_ids(res.frames)).reshape(res.frames.shape[:2])
    assert ids.shape == (2, 8)
    assert ids[0].tolist() == slots.tolist()
    assert ids[1].tolist() == np.minimum(60 + slots, 99).tolist()
    # several streams: frames come back in the offsets' order (here 8 SlowFast frames, then the centre)
    both = np.concatenate([offsets, UniformSampling(1).explicit_offsets(2.0, 30.0)])
    res2 = decode_clips(media["id30"], 2.0, offsets=both, backend="auto")
    ids2 = np.asarray(read_ids(res2.frames)).reshape(res2.frames.shape[:2])
    assert ids2[:, :8].tolist() == ids.tolist() and ids2[:, 8].tolist() == [29, 89]
    with pytest.raises(ValueError, match="ffmpeg"):
        decode_clips(media["id30"], 2.0, offsets=offsets, backend="ffmpeg")
    with pytest.raises(ValueError, match="offsets"):
        decode_clips(media["id30"], 2.0, offsets=[0.5, 2.5])


# --------------------------------------------------------------------------- features


def test_features_follow_heros_normalisation_and_pathways(tiny):
    clips = _clips()
    got = tiny.encode_clips(clips)
    assert got.shape == (2, 2304) and got.dtype == np.float32 and np.isfinite(got).all()
    # by hand (frames decoded at the shorter side 32): centre crop, x / 255, (x - 0.45) / (0.225 + 1e-8),
    # slow pathway = frames linspace(0, 7, 2) = [0, 7]
    x = torch.from_numpy(clips).float() / 255                        # N F H W 3
    x = x[:, :, :, 8:40].permute(0, 4, 1, 2, 3)
    x = (x - 0.45) / (0.225 + 1e-8)
    with torch.no_grad():
        y = [x[:, :, [0, 7]], x]
        for block in tiny.model.blocks[:5]:
            y = block(y)
        want = torch.cat([p.mean(dim=(2, 3, 4)) for p in y], 1).half().float().numpy()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4)  # float16 values: one rounding step
    # batch independence (up to a float16 rounding step) and determinism across builds
    np.testing.assert_allclose(tiny.encode_clips(clips[1:]), got[1:], rtol=2e-3, atol=1e-4)
    again = build_backbone("slowfast", **TINY)
    assert again.weights_id == tiny.weights_id
    np.testing.assert_array_equal(again.encode_clips(clips), got)
    assert build_backbone("slowfast", **{**TINY, "random_init": 1}).weights_id != tiny.weights_id


@pytest.mark.slow
def test_full_size_features_are_the_classifier_input():
    """224 x 224 x 32 frames: the time-space mean equals pytorchvideo's own head pooling (the
    input of Kinetics' classifier layer, what HERO takes with ``last_fc``)."""
    b = build_backbone("slowfast", random_init=0, half_precision_output=False, batch_size=1)
    clips = _clips(n=1, f=32, h=224, w=300)
    got = b.encode_clips(clips)
    x = torch.from_numpy(clips[:, :, :, 38:262]).float().div(255).permute(0, 4, 1, 2, 3)
    x = (x - 0.45) / (0.225 + 1e-8)
    with torch.no_grad():
        y = sf.pack_pathways(x, 4)
        for block in b.model.blocks[:6]:   # ... res5, then PoolConcatPathway(AvgPool3d (8,7,7) / (32,7,7))
            y = block(y)
    np.testing.assert_allclose(got, y.flatten(1).numpy(), rtol=1e-4, atol=1e-5)


def test_slowfast_has_no_text_and_needs_weights(tiny, tmp_path):
    assert tiny.text_dim == 0 and tiny.stream_names == ["slowfast"] and tiny.decode_size == 32
    with pytest.raises(ConfigError, match="no text encoder"):
        tiny.encode_text(["a query"])
    with pytest.raises(ValueError, match=r"\(N, 8, H, W, 3\)"):
        tiny.encode_clips(_clips(f=4))
    with pytest.raises(ConfigError, match="slowfast_checkpoint is required"):
        build_backbone("slowfast")
    with pytest.raises(BackboneLoadError, match="not found"):
        build_backbone("slowfast", slowfast_checkpoint=str(tmp_path / "none.pkl"))


# --------------------------------------------------------------------------- checkpoints


def _caffe2_blob_names():
    """Blob names of PySlowFast's SLOWFAST_8x8_R50.pkl, written out from the architecture (3, 4,
    6, 3 bottleneck blocks per stage, a projection shortcut in block 0, Fast-to-Slow fusion after
    the stem and stages 2-4) in Caffe2's naming, independently of the conversion rules."""
    bn = ("s", "b", "rm", "riv")
    names = ["conv1_w", "t_conv1_w", "pred_w", "pred_b"]
    names += [f"res_conv1_bn_{x}" for x in bn] + [f"t_res_conv1_bn_{x}" for x in bn]
    names += ["t_pool1_subsample_w"] + [f"t_pool1_subsample_bn_{x}" for x in bn]
    for stage, depth in zip((2, 3, 4, 5), (3, 4, 6, 3)):
        for pre in ("", "t_"):
            for i in range(depth):
                for br in ("branch2a", "branch2b", "branch2c") + (("branch1",) if i == 0 else ()):
                    names += [f"{pre}res{stage}_{i}_{br}_w"] + [f"{pre}res{stage}_{i}_{br}_bn_{x}" for x in bn]
        if stage < 5:
            last = f"t_res{stage}_{depth - 1}_branch2c_bn_subsample"
            names += [f"{last}_w"] + [f"{last}_bn_{x}" for x in bn]
    return names + ["conv1_w_momentum", "model_iter", "lr"]


@pytest.fixture(scope="module")
def reference_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        m = sf.build_slowfast_r50()
    with torch.no_grad():
        for name, buf in m.named_buffers():   # non-trivial BN statistics
            if "running" in name:
                buf.copy_(torch.rand_like(buf) + (0.5 if "var" in name else -0.5))
    return m


def test_caffe2_names_cover_the_network_exactly(reference_model):
    own = {k for k in reference_model.state_dict() if "num_batches_tracked" not in k}
    mapped = [sf.pyslowfast_to_pytorchvideo(sf.caffe2_to_pyslowfast(n)) for n in _caffe2_blob_names()[:-3]]
    assert None not in mapped and len(set(mapped)) == len(mapped)
    assert set(mapped) == own
    assert sf.caffe2_to_pyslowfast("res4_2_branch2b_bn_riv") == "s4.pathway0_res2.branch2.b_bn.running_var"
    assert sf.caffe2_to_pyslowfast("t_res3_3_branch2c_bn_subsample_bn_s") == "s3_fuse.bn.weight"
    assert (sf.pyslowfast_to_pytorchvideo("s5.pathway1_res0.branch1_bn.bias")
            == "blocks.4.multipathway_blocks.1.res_blocks.0.branch1_norm.bias")


def _expected(reference_model, clips):
    b = build_backbone("slowfast", **TINY)
    b.model.load_state_dict(reference_model.state_dict())
    return b.encode_clips(clips)


@pytest.mark.parametrize("layout", ["caffe2", "pyslowfast", "pytorchvideo"])
def test_checkpoint_layouts_load_strictly(tmp_path, reference_model, layout):
    sd = reference_model.state_dict()
    inverse = {sf.pyslowfast_to_pytorchvideo(sf.caffe2_to_pyslowfast(n)): n for n in _caffe2_blob_names()[:-3]}
    if layout == "caffe2":
        blobs = {c2: sd[pv].numpy() for pv, c2 in inverse.items()}
        blobs.update({"conv1_w_momentum": np.zeros(1, np.float32), "model_iter": np.array(7), "lr": np.array(0.1)})
        path = tmp_path / "SLOWFAST_8x8_R50.pkl"
        path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    elif layout == "pyslowfast":
        path = tmp_path / "SLOWFAST_8x8_R50_psf.pyth"
        torch.save({"model_state": {sf.caffe2_to_pyslowfast(c2): sd[pv] for pv, c2 in inverse.items()},
                    "epoch": 196}, path)
    else:
        path = tmp_path / "SLOWFAST_8x8_R50.pyth"
        torch.save({"model_state": {f"module.{k}": v for k, v in sd.items()}}, path)
    b = build_backbone("slowfast", **{**TINY, "random_init": None}, slowfast_checkpoint=str(path))
    clips = _clips(seed=1)
    np.testing.assert_array_equal(b.encode_clips(clips), _expected(reference_model, clips))
    assert b.weights_id.startswith("c2f_feature_slowfast:")


def test_bad_checkpoints_name_the_file(tmp_path, reference_model):
    sd = {k: v for k, v in reference_model.state_dict().items() if not k.endswith("conv_a.weight")}
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(BackboneLoadError, match=r"partial\.pth.*missing"):
        build_backbone("slowfast", slowfast_checkpoint=str(tmp_path / "partial.pth"))
    torch.save({"layer.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(BackboneLoadError, match=r"other\.pth.*unknown SlowFast parameter names"):
        build_backbone("slowfast", slowfast_checkpoint=str(tmp_path / "other.pth"))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"blobs": {"conv1_w": Evil()}}))
    with pytest.raises(BackboneLoadError, match=r"evil\.pkl.*refusing to unpickle builtins\.print"):
        build_backbone("slowfast", slowfast_checkpoint=str(tmp_path / "evil.pkl"))


# --------------------------------------------------------------------------- several streams


def test_concat_backbone_streams_and_names(tiny):
    c = build_backbone("slowfast+random", **TINY, dim=16)
    assert isinstance(c, ConcatBackbone)
    assert c.name == "c2f_feature_slowfast+c2f_feature_random" == backbone_key("slowfast+random")
    assert short_backbone_name(c.name) == "slowfast+random"
    assert (c.dim, c.stream_dims, c.stream_names, c.text_columns, c.text_dim) == (
        2320, [2304, 16], ["slowfast", "random"], (2304, 2320), 16)
    desc = c.describe()
    assert desc["streams"] == [{"name": "slowfast", "dim": 2304}, {"name": "random", "dim": 16}]
    assert [p["name"] for p in desc["parts"]] == ["c2f_feature_slowfast", "c2f_feature_random"]
    assert c.sampler(1).frames == 9
    clips = _clips(f=9)
    feats = c.encode_clips(clips)
    np.testing.assert_array_equal(feats[:, :2304], tiny.encode_clips(clips[:, :8]))
    np.testing.assert_array_equal(feats[:, 2304:], c.parts[1].encode_clips(clips[:, 8:]))
    # frames_per_clip applies to the uniform streams only
    assert c.sampler(3).frames == 11 and c.encode_clips(_clips(f=11)).shape == (2, 2320)
    t = c.encode_text(["a red car"])[0]
    np.testing.assert_array_equal(t.pooled, c.parts[1].encode_text(["a red car"])[0].pooled)
    rev = build_backbone("random+slowfast", **TINY, dim=16)
    assert rev.text_columns == (0, 16) and rev.weights_id != c.weights_id
    with pytest.raises(ConfigError, match="no stream accepts"):
        build_backbone("slowfast+random", **TINY, clip_path="x")
    with pytest.raises(ConfigError, match="twice"):
        backbone_key("random+random")
    with pytest.raises(ConfigError, match="no stream has a text encoder"):
        ConcatBackbone([tiny, build_backbone("slowfast", **{**TINY, "random_init": 1})])


def test_cli_backbone_options():
    from lavis_c2f.video.cli import backbone_options

    assert backbone_options("slowfast+clip_hf", "CLIP", slowfast_path="SF.pkl") == {
        "clip_path": "CLIP", "slowfast_checkpoint": "SF.pkl"}
    with pytest.raises(ConfigError, match="needs --slowfast-path"):
        backbone_options("clip_hf+slowfast", "CLIP")
    with pytest.raises(ConfigError, match="needs --clip-path"):
        backbone_options("slowfast+clip_lavis", None, slowfast_path="SF.pkl")
    with pytest.raises(ConfigError, match="--slowfast-path needs a backbone with SlowFast"):
        backbone_options("clip_hf", "CLIP", slowfast_path="SF.pkl")
