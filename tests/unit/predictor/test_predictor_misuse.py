"""C2FPredictor misuse: clear errors instead of silent nonsense."""
import json
import shutil

import numpy as np
import pytest

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.predictor import C2FPredictor, EncodedVideo
from lavis_c2f.video.decode import VideoDecodeError
from predictor_helpers import random_backbone


@pytest.fixture(scope="module")
def bare():
    """A predictor without an index (zero-shot stages)."""
    return C2FPredictor.from_checkpoints(backbone="random", device="cpu")


def test_search_without_an_index(bare):
    with pytest.raises(ConfigError, match="search needs an index.*lavis-c2f index videos"):
        bare.search("a dog")
    with pytest.raises(ConfigError, match="no index"):
        bare.video("pattern")


def test_bad_queries(bare, videos):
    v = bare.encode_video(videos["gray"])
    for q in ("", "   \n "):
        with pytest.raises(ValueError, match="query is empty"):
            bare.predict(q, v)
    with pytest.raises(TypeError, match="query must be a string"):
        bare.predict(["a", "b"], v)
    with pytest.raises(ValueError, match="top_k"):
        bare.predict("a", v, top_k=0)


def test_video_encoded_by_another_backbone(bare, videos):
    other = C2FPredictor.from_checkpoints(backbone=random_backbone(seed=7), device="cpu")
    v = other.encode_video(videos["gray"])
    with pytest.raises(ValueError, match="encoded by c2f_feature_random .*seed|but this predictor uses"):
        bare.predict("gray", v)
    with pytest.raises(TypeError, match="EncodedVideo"):
        bare.predict("gray", v.features)
    empty = EncodedVideo("e", np.zeros((0, 16), np.float32), 1.0, 2.0, bare.features_id)
    with pytest.raises(ValueError, match="no clips"):
        bare.predict("gray", empty)


def test_undecodable_or_missing_video(bare, tmp_path):
    with pytest.raises(VideoDecodeError, match="not found"):
        bare.encode_video(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video\n" * 20)
    with pytest.raises(VideoDecodeError):
        bare.encode_video(bad)


def test_index_of_another_backbone_or_clip_length(zs_index):
    with pytest.raises(ConfigError, match=r"built with the c2f_feature_random backbone \(c2f_feature_random:.*"
                                          r"predictor's backbone is c2f_feature_random \(c2f_feature_random:"):
        C2FPredictor.from_checkpoints(index=zs_index, backbone=random_backbone(seed=7), device="cpu")
    with pytest.raises(ConfigError, match="clip_length=1.0 but the index was extracted with clip_length=2.0"):
        C2FPredictor.from_checkpoints(index=zs_index, backbone="random", clip_length=1.0, device="cpu")
    with pytest.raises(ConfigError, match="backbone_cfg is only used"):
        C2FPredictor.from_checkpoints(backbone=random_backbone(), backbone_cfg={"dim": 8})


def test_not_an_index_from_videos(tmp_path, zs_index):
    with pytest.raises(FileNotFoundError, match="index folder not found"):
        C2FPredictor.from_checkpoints(index=tmp_path / "none", backbone="random")
    copy = tmp_path / "copy"
    shutil.copytree(zs_index, copy)
    with pytest.raises(DataFormatError, match="c2f-video.json.*lavis-c2f index videos"):
        C2FPredictor.from_checkpoints(index=copy, backbone="random")
    side = json.loads(open(zs_index + ".c2f-video.json").read())
    del side["backbone"]
    (tmp_path / "copy.c2f-video.json").write_text(json.dumps(side))
    with pytest.raises(DataFormatError, match="copy.c2f-video.json.*missing or invalid field"):
        C2FPredictor.from_checkpoints(index=copy, backbone="random")


def test_demo_corpus_needs_its_own_constructor_and_checkpoints(demo):
    with pytest.raises(ConfigError, match="for_demo_corpus"):
        C2FPredictor.from_checkpoints(index=demo["corpus"], backbone="random")
    with pytest.raises(ConfigError, match="needs trained checkpoints.*chance level"):
        C2FPredictor.for_demo_corpus(None, demo["corpus"])
    with pytest.raises(ConfigError, match="missing stage2"):
        C2FPredictor.for_demo_corpus({"stage1": demo["stage1"]["ckpt"]}, demo["corpus"])
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        C2FPredictor.for_demo_corpus(demo["run"] / "nope")


def test_from_config_rejects_unknown_and_misplaced_keys(demo):
    with pytest.raises(ConfigError, match="unknown key.*'grounder_checkpoint'.*did you mean 'grounder_ckpt'"):
        C2FPredictor.from_config({"grounder_checkpoint": "x.pth"})
    with pytest.raises(ConfigError, match=r"\['backbone'\] are not used with demo_corpus"):
        C2FPredictor.from_config({"run_dir": str(demo["run"]), "backbone": "random"})
    with pytest.raises(ConfigError, match="splits is only used with demo_corpus"):
        C2FPredictor.from_config({"backbone": "random", "splits": ["test"]})
    p = C2FPredictor.from_config({"backbone": "random", "device": "cpu", "zero_shot": {"video_score": "max"},
                                  "stage1_top_k": 3})
    assert p.zero_shot.video_score == "max" and p.stage1_top_k == 3 and p.device == "cpu"


def test_invalid_settings():
    with pytest.raises(ConfigError, match="stage1_top_k"):
        C2FPredictor.from_checkpoints(backbone="random", stage1_top_k=0)
    with pytest.raises(ConfigError, match="fusion.form"):
        C2FPredictor.from_checkpoints(backbone="random", fusion={"form": "max"})
    with pytest.raises(ConfigError, match="unknown backbone"):
        C2FPredictor.from_checkpoints(backbone="resnet")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        C2FPredictor.from_checkpoints(backbone="random", device="tpu")


def test_device_rule(monkeypatch):
    """The predictor and the runner share one rule; only the predictor refuses a GPU it lacks
    (the runner falls back to CPU so that one YAML serves both)."""
    import torch

    from lavis_c2f.common.dist import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert C2FPredictor.from_checkpoints(backbone="random", device="auto").device == "cpu"
    with pytest.raises(ConfigError, match="device 'cuda' requested but CUDA is not available"):
        C2FPredictor.from_checkpoints(backbone="random", device="cuda")
    assert resolve_device("cuda").type == "cpu" and resolve_device(None).type == "cpu"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:1", fallback=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1) and resolve_device("cuda:0") == torch.device("cuda", 0)


def test_missing_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        C2FPredictor.from_checkpoints(grounder_ckpt=tmp_path / "g.pth", backbone="random")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        C2FPredictor.from_checkpoints(retriever_ckpt=tmp_path / "r.pth", backbone="random")
