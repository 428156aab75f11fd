"""Frame sources, stage-2 prediction files, the refiner dataset/collater and the builder."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.data.records import MomentRecord
from lavis_c2f.models.refiner.data import (ArrayFrameSource, FeatureImageFrameSource, FolderFrameSource,
                                           FrameProcessor, RefinerDataset, RefinerDatasetBuilder, SamplerConfig,
                                           VideoFileFrameSource, collate_refiner, load_stage2_predictions)

SHARED = Path(__file__).resolve().parents[3].parent / "shared"


def striped_video(n=20, h=16, w=16):
    """Frames whose colour changes in 4 events (one per 5 frames), at t = k + 0.5 s."""
    frames = np.zeros((n, h, w, 3), dtype=np.uint8)
    for k in range(n):
        ev = k // 5
        frames[k, :, : (ev + 1) * w // 4, ev % 3] = 200
        frames[k, : h // 2, :, (ev + 1) % 3] = 50 * ev
    return frames, np.arange(n) + 0.5


def test_frame_processor_normalises_and_resizes():
    proc = FrameProcessor(8)
    x = proc(np.full((2, 4, 6, 3), 255, dtype=np.uint8))
    assert x.shape == (2, 3, 8, 8)
    expected = (1.0 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(x[0, :, 3, 3], expected)


def test_array_source_frames_in_region():
    frames, times = striped_video()
    src = ArrayFrameSource({"v": (frames, times)})
    f, t = src.frames_in("v", 4.0, 9.0, max_frames=64)
    np.testing.assert_allclose(t, [4.5, 5.5, 6.5, 7.5, 8.5])
    assert f.shape == (5, 16, 16, 3)
    f, t = src.frames_in("v", 0.0, 20.0, max_frames=4)
    assert len(t) == 4 and np.all(np.diff(t) > 0)
    f, t = src.frames_in("v", 3.1, 3.2, max_frames=4)  # no frame inside: the nearest one
    np.testing.assert_allclose(t, [3.5])
    with pytest.raises(DataFormatError):
        src.frames_in("missing", 0, 1, 4)
    with pytest.raises(ValueError):
        ArrayFrameSource({"v": (frames, times[:3])})


def test_folder_source(tmp_path):
    from PIL import Image

    frames, _ = striped_video(n=6)
    d = tmp_path / "frames" / "vid1"
    d.mkdir(parents=True)
    for k, fr in enumerate(frames):
        Image.fromarray(fr).save(d / f"{k:05d}.png")
    (d / "notes.txt").write_text("ignored")
    src = FolderFrameSource(str(tmp_path / "frames"), fps=2.0)
    f, t = src.frames_in("vid1", 0.0, 1.5, max_frames=10)
    np.testing.assert_allclose(t, [0.25, 0.75, 1.25])
    np.testing.assert_array_equal(f, frames[:3])
    with pytest.raises(DataFormatError, match="frame folder not found"):
        src.frames_in("vid2", 0, 1, 4)
    (tmp_path / "frames" / "empty").mkdir()
    with pytest.raises(DataFormatError, match="no image files"):
        src.frames_in("empty", 0, 1, 4)
    (d / "00009.jpg").write_bytes(b"not an image")
    src2 = FolderFrameSource(str(tmp_path / "frames"), fps=1.0)
    with pytest.raises(DataFormatError, match="unreadable image"):
        src2.frames_in("vid1", 6.0, 8.0, 4)


def test_feature_image_source(tmp_path):
    feats = np.random.default_rng(0).standard_normal((5, 20)).astype(np.float32)
    (tmp_path / "feats").mkdir()
    np.savez(tmp_path / "feats" / "v.npz", features=feats)
    src = FeatureImageFrameSource({"type": "npz", "path": str(tmp_path / "feats"), "field": "features"},
                                  clip_length=2.0, image_size=12)
    f, t = src.frames_in("v", 0, 10, 10)
    np.testing.assert_allclose(t, [1, 3, 5, 7, 9])
    assert f.shape == (5, 12, 12, 3) and f.dtype == np.uint8
    assert len({f[i].tobytes() for i in range(5)}) == 5  # different rows, different images
    with pytest.raises(DataFormatError):
        src.frames_in("other", 0, 1, 4)


def test_video_file_source_on_real_video():
    video = SHARED / "data" / "media" / "charades_sample.mp4"
    if not video.is_file():
        pytest.skip(f"../shared not found: {video}")
    src = VideoFileFrameSource(str(video.parent), ext=".mp4", fps=0.5, image_size=32, cache_videos=1)
    f, t = src.frames_in("charades_sample", 0.0, 12.0, max_frames=8)
    assert f.shape[1:] == (32, 32, 3) and f.dtype == np.uint8 and len(f) == len(t) >= 3
    assert np.all(np.diff(t) > 0) and t[0] == pytest.approx(1.0)
    assert "charades_sample" in src.cache
    with pytest.raises(DataFormatError, match="video file not found"):
        src.frames_in("nope", 0, 1, 2)


def write_stage2(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_load_stage2_predictions_and_errors(tmp_path):
    p = write_stage2(tmp_path / "s2.jsonl", [
        {"qid": 1, "pred_relevant_windows": [[2, 8, 0.9], [10, 12, 0.1]], "pred_saliency_scores": [0.5]},
        {"qid": 2, "pred_relevant_windows": []}])
    out = load_stage2_predictions(p)
    assert out[1]["windows"] == [[2.0, 8.0, 0.9], [10.0, 12.0, 0.1]] and out[1]["saliency"] == [0.5]
    assert out[2] == {"windows": [], "saliency": None}
    for rows, field in (([{"pred_relevant_windows": []}], "qid"),
                        ([{"qid": 1, "pred_relevant_windows": [[1, "x", 2]]}], "pred_relevant_windows"),
                        ([{"qid": 1, "pred_relevant_windows": 3}], "pred_relevant_windows"),
                        ([{"qid": 1, "pred_relevant_windows": []}, {"qid": 1, "pred_relevant_windows": []}], "qid")):
        bad = write_stage2(tmp_path / "bad.jsonl", rows)
        with pytest.raises(DataFormatError) as e:
            load_stage2_predictions(bad)
        assert e.value.field == field and e.value.path == bad and e.value.line is not None


def records():
    return [MomentRecord(qid=1, query="red event", vid="v", duration=20.0, relevant_windows=[(5.0, 10.0)]),
            MomentRecord(qid=2, query="blue event", vid="v", duration=20.0, relevant_windows=[(15.0, 20.0)])]


def test_dataset_and_collater(tmp_path):
    frames, times = striped_video()
    (tmp_path / "srts").mkdir()
    (tmp_path / "srts" / "v.srt").write_text("1\n00:00:06,000 --> 00:00:07,000\nthe red one\n")
    stage2 = {1: {"windows": [[5.0, 9.0, 0.8]], "saliency": [0.1] * 10}}
    sampler = SamplerConfig(margin_s=2.0, margin_ratio=0.0, n_candidates=16, n_frames=4, seed=0)
    ds = RefinerDataset(records(), ArrayFrameSource({"v": (frames, times)}), sampler, image_size=8,
                        captions_dir=str(tmp_path / "srts"), stage2=stage2, on_missing_stage2="whole_video")
    s0, s1 = ds[0], ds[1]
    assert s0["region"] == [3.0, 11.0] and s1["region"] == [0.0, 20.0]
    assert s0["frames"].shape == (4, 3, 8, 8) and len(s0["frame_times"]) == 4
    assert all(3.0 <= t <= 11.0 for t in s0["frame_times"]) and s0["frame_times"] == sorted(s0["frame_times"])
    assert s0["target_windows"] == [(5.0, 10.0)] and s0["stage2_windows"] == [[5.0, 9.0, 0.8]]
    assert [c.text for c in s0["captions"]] == ["the red one"]
    # k-means on 20 frames with 4 colour events picks one frame per event
    assert sorted(int(t // 5) for t in s1["frame_times"]) == [0, 1, 2, 3]
    assert s1["stage2_windows"] == [] and s1["stage2_saliency"] is None
    batch = ds.collater([s0, s1])
    assert batch["frames"].shape == (2, 4, 3, 8, 8) and batch["frame_mask"].sum().item() == 8
    assert batch["qid"] == [1, 2] and batch["region"].tolist() == [[3.0, 11.0], [0.0, 20.0]]
    assert batch["relevant_windows"] == [[[5.0, 10.0]], [[15.0, 20.0]]]
    with pytest.raises(DataFormatError, match="no stage-2 prediction"):
        RefinerDataset(records(), ArrayFrameSource({"v": (frames, times)}), sampler, stage2=stage2,
                       stage2_source="s2.jsonl")
    short = collate_refiner([s0, {**s1, "frames": s1["frames"][:2], "frame_times": s1["frame_times"][:2]}])
    assert short["frame_mask"].tolist()[1] == [1, 1, 0, 0]


def test_sampler_config_validation():
    assert SamplerConfig.from_mapping({"n_frames": 6, "margin_s": 2}).margin_s == 2.0
    with pytest.raises(ConfigError, match="unknown"):
        SamplerConfig.from_mapping({"n_frame": 6})
    with pytest.raises(ConfigError):
        SamplerConfig.from_mapping({"n_frames": 0})
    with pytest.raises(ConfigError):
        SamplerConfig.from_mapping({"keyframes": "random"})


def mini_corpus(root: Path):
    (root / "annotations").mkdir(parents=True)
    (root / "feats").mkdir()
    rows = [{"qid": 1, "query": "red event", "vid": "v", "duration": 20, "relevant_windows": [[4, 10]]},
            {"qid": 2, "query": "blue event", "vid": "v", "duration": 20, "relevant_windows": [[14, 20]]}]
    (root / "annotations" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    np.savez(root / "feats" / "v.npz", features=np.random.default_rng(0).standard_normal((10, 12)).astype(np.float32))
    return root


def builder_cfg(root, **kw):
    cfg = {"variant": "interleaved", "data_root": str(root),
           "annotations": {"train": {"path": "annotations/train.jsonl", "format": "qvh"}},
           "frames": {"type": "feature_image", "path": "feats", "clip_length": 2.0},
           "sampler": {"n_candidates": 8, "n_frames": 3}, "image_size": 16}
    cfg.update(kw)
    return cfg


def test_builder(tmp_path):
    root = mini_corpus(tmp_path)
    s2 = write_stage2(tmp_path / "s2.jsonl", [{"qid": 1, "pred_relevant_windows": [[4, 8, 0.7]]},
                                                {"qid": 2, "pred_relevant_windows": [[12, 18, 0.6]]}])
    ds = RefinerDatasetBuilder(builder_cfg(root, stage2_predictions={"train": s2})).build_datasets()["train"]
    assert len(ds) == 2 and ds.ann_path.endswith("train.jsonl") and ds.records[0].qid == 1
    batch = ds.collater([ds[0], ds[1]])
    assert batch["frames"].shape == (2, 3, 3, 16, 16)
    assert batch["stage2_windows"][1] == [[12.0, 18.0, 0.6]]
    assert os.path.isfile(RefinerDatasetBuilder.default_config_path())


@pytest.mark.parametrize("kw,match", [
    ({"frame": {}}, "unknown key"),
    ({"frames": {"type": "webcam", "path": "x"}}, "frames.type"),
    ({"frames": {"type": "folder", "path": "nowhere"}}, "frames.path: not found"),
    ({"frames": {"type": "feature_image", "path": "feats"}}, "clip_length"),
    ({"captions": "no_srts"}, "captions: folder not found"),
    ({"stage2_predictions": {"train": "none.jsonl"}}, "stage2_predictions.train: file not found"),
    ({"annotations": {"train": {"path": "missing.jsonl"}}}, "annotation file not found"),
    ({"sampler": {"n_frames": -2}}, "sampler.n_frames"),
])
def test_builder_errors_name_the_key(tmp_path, kw, match):
    root = mini_corpus(tmp_path)
    with pytest.raises(ConfigError, match=match):
        RefinerDatasetBuilder(builder_cfg(root, **kw)).build_datasets()
