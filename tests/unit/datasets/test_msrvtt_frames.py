"""The c2f_msrvtt builder: frames datasets over generated videos named as MSR-VTT's, errors for
missing / unreadable videos and bad configs."""
import pytest
import torch

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.datasets.frames_builders import MSRVTTBuilder
from lavis_c2f.video.decode import VideoDecodeError

from frames_helpers import BOS, msrvtt_dataset_cfg, write_char_tokenizer, write_msrvtt_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("msrvtt")
    write_msrvtt_corpus(root, ["video0", "video1", "video2"], ["video7", "video8"])
    clip = root / "clip"
    write_char_tokenizer(clip)
    return root, clip


def test_msrvtt_builder_makes_frames_datasets(corpus):
    root, clip = corpus
    ds = MSRVTTBuilder(msrvtt_dataset_cfg(root, clip, num_frames=5)).build_datasets()
    train, test = ds["train"], ds["test"]
    assert len(train) == 6 and train.videos == ["video0", "video1", "video2"]
    assert len(test) == 2 and test.num_videos == 2 and test.gt_video_index("ret1") == 1
    item = train[3]
    assert item["vid"] == "video1" and item["pixels"].shape == (5, 3, 32, 32)
    assert item["pixel_mask"].tolist() == [1.0] * 5
    batch = train.collater([train[i] for i in (0, 3, 5)])
    assert batch["vid_pixels"].shape == (3, 5, 3, 32, 32) and batch["vid_pixels_mask"].shape == (3, 5)
    assert batch["txt_input_ids"].shape[0] == 3 and batch["txt_input_ids"][:, 0].eq(BOS).all()
    assert batch["video_index"].tolist() == [0, 1, 2]
    # train augmentations are keyed by (seed, epoch, item): reproducible, different per epoch
    torch.testing.assert_close(train[3]["pixels"], item["pixels"])
    train.set_epoch(1)
    assert not torch.equal(train[3]["pixels"], item["pixels"])
    # eval: deterministic clip_test frames, 12 uniform picks of 12 frames = all of them
    vb = test.video_batch([1, 0])
    assert vb["vid"] == ["video8", "video7"] and vb["vid_pixels"].shape == (2, 5, 3, 32, 32)
    qb = test.query_batch([0, 1])
    assert qb["gt_video_index"].tolist() == [0, 1] and qb["txt_attention_mask"].shape == qb["txt_input_ids"].shape
    # the colour survives the transform: video7 is yellow (high red, low blue)
    yellow = test.frames("video7")["pixels"]
    assert yellow[:, 2].mean() < 0 < yellow[:, 0].mean()


def test_fps_sampling_pads_and_masks(corpus):
    root, clip = corpus
    ds = MSRVTTBuilder(msrvtt_dataset_cfg(root, clip, splits=["test"],
                                          frames={"kind": "fps", "num_frames": 4})).build_datasets()
    fr = ds["test"].frames("video7")                          # 1.2 s at 10 fps: frames 0 and 10
    assert fr["pixel_mask"].tolist() == [1, 1, 0, 0]
    assert fr["pixels"][2:].abs().sum() == 0


def test_missing_unreadable_and_bad_config(corpus, tmp_path):
    root, clip = corpus
    cfg = msrvtt_dataset_cfg(root, clip)
    with pytest.raises(ConfigError, match=r"datasets.c2f_msrvtt: unknown key\(s\) 'frame'"):
        MSRVTTBuilder({**cfg, "frame": {}})
    with pytest.raises(ConfigError, match="frames: num_frames"):
        MSRVTTBuilder({**cfg, "frames": {"num_frames": 0}})
    bad = dict(cfg, videos={"path": str(tmp_path), "key_format": "{vid}.mp4"})
    with pytest.raises(ConfigError, match=r"5 of 5 videos have no file \{vid\}.mp4 in .*: video0, video1"):
        MSRVTTBuilder(bad).build_datasets()
    for v in ("video0", "video1", "video2", "video7", "video8"):
        (tmp_path / f"{v}.mp4").write_bytes((root / "videos" / f"{v}.mp4").read_bytes())
    (tmp_path / "video1.mp4").write_text("not a video")
    probing = dict(cfg, videos={"path": str(tmp_path), "check": "probe"})
    with pytest.raises(ConfigError, match=r"(?s)1 unreadable video file\(s\):\n.*FAILED .*video1.mp4: not a readable"):
        MSRVTTBuilder(probing).build_datasets()
    lazy = MSRVTTBuilder(dict(cfg, videos={"path": str(tmp_path)})).build_datasets()["train"]
    with pytest.raises(VideoDecodeError, match="video1.mp4: not a readable media file"):
        lazy[2]
    missing_ann = dict(cfg, annotations={"test": {"path": "nope.csv", "format": "msrvtt_test"}})
    with pytest.raises(ConfigError, match=r"annotations.test.path: file not found: .*nope.csv"):
        MSRVTTBuilder(missing_ann).build_datasets()
