"""CLIP+SlowFast-style indexes (two feature streams) searched with official-layout grounder
checkpoints: stage 1 reads the text stream, the grounder gets the streams in the order its
checkpoint records (QD-DETR ``v_feat_dirs``, MESM ``feat_files``) or ``--grounder-streams``.

The streams are a tiny random SlowFast (crop 32, 8 frames) and the 16-d ``random`` backbone
standing in for CLIP (the stream named ``random``)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

pytest.importorskip("pytorchvideo")

from lavis_c2f.common.errors import ConfigError  # noqa: E402

BACKBONE = "slowfast+random"
CFG = {"random_init": 0, "crop_size": 32, "num_frames": 8, "dim": 16}
VID_DIM = 2304 + 16


def _official_qd_detr(path, feat_dirs, seed=0, **opt_extra):
    """An official QD-DETR checkpoint layout ({"model", "opt", "epoch"}) with random weights."""
    from lavis_c2f.models.grounder.model import QDDETR

    torch.manual_seed(seed)
    hp = dict(hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=48, num_queries=5, max_v_l=75)
    model = QDDETR(txt_dim=16, vid_dim=VID_DIM + 2, **hp)
    opt = argparse.Namespace(t_feat_dim=16, v_feat_dim=VID_DIM + 2, max_q_l=32, ctx_mode="video_tef",
                             position_embedding="sine", n_input_proj=2, input_dropout=0.5, dropout=0.1,
                             aux_loss=True, span_loss_type="l1", use_txt_pos=False, contrastive_align_loss=False,
                             contrastive_hdim=64, pre_norm=False, **hp, **feat_dirs, **opt_extra)
    torch.save({"model": model.state_dict(), "opt": opt, "epoch": 3}, path)
    return str(path)


@pytest.fixture(scope="module")
def sf_index(video_dir, tmp_path_factory):
    from lavis_c2f.index.build import index_videos

    out = tmp_path_factory.mktemp("sf") / "index"
    index_videos(video_dir, out, backbone=BACKBONE, backbone_config=CFG, workers=0, progress=False)
    return str(out)


def test_index_of_two_streams(sf_index):
    from lavis_c2f.common.io import read_json
    from lavis_c2f.data.features import NpzDirStore
    from lavis_c2f.video.backbones import build_backbone

    side = read_json(sf_index + ".c2f-video.json")
    bb = side["backbone"]
    assert bb["name"] == "c2f_feature_slowfast+c2f_feature_random" and bb["dim"] == VID_DIM
    assert bb["streams"] == [{"name": "slowfast", "dim": 2304}, {"name": "random", "dim": 16}]
    assert bb["text_columns"] == [2304, VID_DIM]
    store = NpzDirStore(side["features_dir"] + "/clip_features", field="features")
    feats = store.get("gray")
    assert feats.shape == (3, VID_DIM)  # 5 s -> 3 clips of 2 s
    # the random stream equals a random-only extraction (its frame: the clip centre)
    only = build_backbone("random", dim=16)
    from lavis_c2f.video.decode import decode_clips

    frames = decode_clips(_video(side, "gray"), 2.0).frames
    np.testing.assert_allclose(feats[:, 2304:], only.encode_clips(frames), rtol=1e-5, atol=1e-6)


def _video(side, vid):
    from lavis_c2f.common.io import read_jsonl

    rows = read_jsonl(side["features_dir"] + "/videos.jsonl")
    return next(r["path"] for r in rows if r["vid"] == vid)


def test_grounder_streams_follow_the_checkpoint(sf_index, tmp_path):
    from lavis_c2f.models.grounder.predictor import GrounderPredictor
    from lavis_c2f.predictor import C2FPredictor

    # trained on [CLIP-like | SlowFast] (MESM's order), the index holds [SlowFast | CLIP-like]
    ckpt = _official_qd_detr(tmp_path / "model_best.ckpt",
                             {"v_feat_dirs": ["feats/random_features", "feats/slowfast_features"]})
    p = C2FPredictor.from_checkpoints(grounder_ckpt=ckpt, backbone=BACKBONE, index=sf_index, device="cpu")
    assert p.grounder_streams == ["random", "slowfast"]
    assert "on random+slowfast features" in p.describe_mode()
    video = p.video("redblue")
    got = p.predict("the screen turns blue", video, top_k=5)
    # the same grounder fed by hand with the columns in its order
    q = p.encode_query("the screen turns blue")
    gp = GrounderPredictor(p.grounder, clip_length=2.0, postprocess=p.stage2.postprocess, stream_dims=[16, 2304])
    feats = np.concatenate([video.features[:, 2304:], video.features[:, :2304]], axis=1)
    want = gp.predict(q.tokens, feats, video.duration)
    assert got.windows == [list(map(float, w)) for w in want["windows"]][:5]
    np.testing.assert_allclose(got.saliency, want["saliency"], rtol=1e-6)
    # stage 1 (zero-shot) scores the text stream only
    from lavis_c2f.models import zero_shot as zs

    ranked = dict(p.stage1("the screen turns blue", k=3))
    want = zs.video_scores(q.pooled, [video.features[:, 2304:]], p.zero_shot)[0]  # normalises the text once
    assert ranked["redblue"] == pytest.approx(float(want), rel=1e-5)


def test_mesm_feat_files_and_explicit_streams(sf_index, tmp_path):
    from lavis_c2f.models.grounder.checkpoint import checkpoint_feature_streams
    from lavis_c2f.predictor import C2FPredictor, select_streams

    mesm_like = _official_qd_detr(tmp_path / "mesm.ckpt", {"feat_files": ["data/slowfast.hdf5", "data/random.hdf5"]})
    assert checkpoint_feature_streams(mesm_like, ["random", "slowfast"]) == ["slowfast", "random"]
    p = C2FPredictor.from_checkpoints(grounder_ckpt=mesm_like, backbone=BACKBONE, index=sf_index, device="cpu")
    assert p.grounder_streams == ["slowfast", "random"] and p.stage2.columns is None
    # a checkpoint that names a stream the index lacks: an error that says how to choose
    clip = _official_qd_detr(tmp_path / "clip.ckpt", {"v_feat_dirs": ["f/slowfast_features", "f/clip_features"]})
    with pytest.raises(ConfigError, match="clip_features.*--grounder-streams"):
        C2FPredictor.from_checkpoints(grounder_ckpt=clip, backbone=BACKBONE, index=sf_index, device="cpu")
    p2 = C2FPredictor.from_checkpoints(grounder_ckpt=clip, backbone=BACKBONE, index=sf_index, device="cpu",
                                       grounder_streams=["slowfast", "random"])
    assert p2.grounder_streams == ["slowfast", "random"]
    # no recorded streams: the index's order
    bare = _official_qd_detr(tmp_path / "bare.ckpt", {})
    assert checkpoint_feature_streams(bare, ["random", "slowfast"]) is None
    assert C2FPredictor.from_checkpoints(grounder_ckpt=bare, backbone=BACKBONE, index=sf_index,
                                         device="cpu").grounder_streams is None
    cols, dims = select_streams(["slowfast", "clip"], [3, 2], ["clip", "slowfast"])
    assert cols.tolist() == [3, 4, 0, 1, 2] and dims == [2, 3]
    assert select_streams(["slowfast", "clip"], [3, 2], ["clip"])[0].tolist() == [3, 4]
    assert select_streams(["clip"], [2], ["x"]) == (None, [2])
    with pytest.raises(ConfigError, match="'audio'"):
        select_streams(["slowfast", "clip"], [3, 2], ["audio", "clip"])


def test_runner_checkpoint_streams(tmp_path):
    from lavis_c2f.models.grounder.checkpoint import checkpoint_feature_streams

    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": {}, "config": {"model": {"arch": "c2f_qd_detr"}, "datasets": {"c2f_qvh": {
        "video_features": [{"type": "npz", "path": "qvh/clip_features"},
                           {"type": "hdf5", "path": "qvh/slowfast_features.hdf5"}]}}}}, path)
    assert checkpoint_feature_streams(str(path), ["slowfast", "clip"]) == ["clip", "slowfast"]


def test_search_cli_with_the_index_settings(cli_run, sf_index, tmp_path):
    ckpt = _official_qd_detr(tmp_path / "qd.ckpt", {"v_feat_dirs": ["f/slowfast_features", "f/random_features"]})
    code, out, err = cli_run("search", sf_index, "a red screen", "--grounder-ckpt", ckpt, "--json", "--top-k", "3")
    assert code == 0, err
    res = json.loads(out)
    assert res["mode"]["stage2"] == "trained" and len(res["moments"]) == 3
    assert "on slowfast+random features" in res["mode_description"]
    code, out, err = cli_run("search", sf_index, "a red screen", "--grounder-ckpt", ckpt, "--grounder-streams",
                             "random", "slowfast")
    assert code == 0, err
    assert "on random+slowfast features" in out


@pytest.fixture()
def cli_run(capsys):
    import lavis_c2f.cli as main_cli

    def run(*argv):
        capsys.readouterr()
        code = main_cli.main([str(a) for a in argv])
        got = capsys.readouterr()
        return code, got.out, got.err

    return run
