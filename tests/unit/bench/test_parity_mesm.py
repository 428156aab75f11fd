"""bench/parity_mesm.py (the MESM side of bench/train_parity.py): MESM's layout, the recipe given to
both codes, our side built from it, padding-cropped dropout replay. The official code is never
imported here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench_helpers import ROOT, load_bench


@pytest.fixture(scope="module")
def pm():
    if str(ROOT / "bench") not in sys.path:  # parity_mesm imports its sibling scripts
        sys.path.insert(0, str(ROOT / "bench"))
    load_bench("official_runtime.py", "official_runtime")
    load_bench("parity_common.py", "parity_common")
    return load_bench("parity_mesm.py", "parity_mesm")


def _demo_corpus(root: Path) -> Path:
    """A demo-layout corpus: 3 train videos (2, 2 and 1 queries), 1 val and 1 test video."""
    (root / "annotations").mkdir(parents=True)
    (root / "clip_features").mkdir()
    (root / "clip_text_features").mkdir()
    (root / "corpus.json").write_text(json.dumps({"name": "c2f_demo"}))
    rng = np.random.default_rng(0)
    qid = 0
    words = ["the", "man", "opens", "a", "red", "door", "slowly", "near", "window"]
    for split, vids in (("train", ["demo_v0", "demo_v0", "demo_v1", "demo_v1", "demo_v2"]),
                        ("val", ["demo_v3"]), ("test", ["demo_v4"])):
        rows = []
        for vid in vids:
            n_clips = 10 + int(vid[-1])
            if not (root / "clip_features" / f"{vid}.npz").exists():
                np.savez(root / "clip_features" / f"{vid}.npz",
                         features=rng.standard_normal((n_clips, 8)).astype(np.float32))
            query = " ".join(words[(qid + i) % len(words)] for i in range(4 + qid % 3))
            np.savez(root / "clip_text_features" / f"qid{qid}.npz",
                     last_hidden_state=rng.standard_normal((len(query.split()) + 2, 6)).astype(np.float32),
                     pooler_output=rng.standard_normal(6).astype(np.float32))
            rows.append({"qid": qid, "query": query, "duration": 2 * n_clips, "vid": vid,
                         "relevant_windows": [[2, 8]], "relevant_clip_ids": [1, 2, 3],
                         "saliency_scores": [[1, 2, 3], [4, 4, 4], [0, 1, 0]]})
            qid += 1
        (root / "annotations" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def layout(pm, tmp_path_factory):
    from parity_common import detect_corpus

    corpus = detect_corpus(str(_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus")))
    return pm.write_mesm_layout(corpus, str(tmp_path_factory.mktemp("mesm") / "layout"))


def test_mesm_vid_and_stream_order(pm):
    assert pm.mesm_vid("RoripwjYFp8_360.0_510.0", 150) == "RoripwjYFp8_360.0_510.0"
    assert pm.mesm_vid("demo_v0000", 30) == "demo_v0000_0_30"
    assert pm.mesm_vid("a_b_c", 12.4) == "a_b_c_0_12"  # not numbers: renamed
    assert pm.stream_order(["/f/slowfast_features", "/f/clip_features"]) == ["/f/clip_features",
                                                                             "/f/slowfast_features"]


def test_layout_files(pm, layout):
    import h5py

    rows = [json.loads(line) for line in open(layout.split_file("train"))]
    assert [r["vid"] for r in rows][:3] == ["demo_v0_0_20", "demo_v0_0_20", "demo_v1_0_22"]
    assert pm.count_items(layout.split_file("train")) == 3
    test_rows = [json.loads(line) for line in open(Path(layout.test_ann_path) / "highlight_val_release.jsonl")]
    assert [r["vid"] for r in test_rows] == ["demo_v4_0_28"] and "relevant_windows" in test_rows[0]
    counts = [tuple(map(int, line.split())) for line in open(layout.counts_file)]
    assert counts and all(a[1] >= b[1] for a, b in zip(counts, counts[1:]))  # most frequent first
    from lavis_c2f.models.grounder.vocab import ReconstructionVocab

    assert ReconstructionVocab.from_counts_file(layout.counts_file, 50, "clip").tokenizer == "clip"
    assert layout.feat_dims == [8]
    with h5py.File(layout.feat_files[0], "r") as h:
        src = np.load(Path(layout.text_dir).parent / "clip_features" / "demo_v2.npz")["features"]
        np.testing.assert_array_equal(h["demo_v2_0_24"][()], src)
        assert len(h.keys()) == 5
    state = torch.load(layout.text_model_path, weights_only=True)
    assert state["token_embedding.weight"].shape == (49408, 64) and state["ln_final.weight"].dtype == torch.float16
    assert "transformer.resblocks.0.attn.in_proj_weight" in state and "transformer.resblocks.1.mlp.c_fc.weight" not in state
    from lavis_c2f.models.grounder.pos_weights import PosTagger

    assert PosTagger(layout.tagger_dir).weights(["man", "opens", "the", "door"]) == [2, 2, 1, 2]


def test_official_command_line(pm, layout):
    r = pm.MesmRecipe(epochs=10, bsz=2)
    argv = pm.official_mesm_argv(r, layout, 5, "/tmp/results")
    opts = dict(zip(argv, argv[1:]))
    assert opts["--dataset_name"] == "qvhighlights" and opts["--device"] == "cpu" and opts["--seed"] == "5"
    assert opts["--v_feat_dim"] == "8" and opts["--t_feat_dim"] == "64" and opts["--batch_size"] == "2"
    assert opts["--text_model_path"] == layout.text_model_path and opts["--bpe_path"].endswith(".txt.gz")
    assert opts["--eval_epoch_interval"] == "5" and opts["--max_es_cnt"] == "-1" and opts["--n_epoch"] == "10"
    for flag in ("--rec_fw", "--rec_ss", "--share_MLP", "--use_tef", "--aux_loss", "--use_triplet",
                 "--normalize_video", "--normalize_txt", "--sort_results"):
        assert flag in argv


def test_our_side_builds_and_trains_one_step(pm, layout):
    from lavis_c2f.datasets.builders import QVHighlightsBuilder
    from lavis_c2f.models.grounder.lavis_models import C2FMESMQDDETR

    r = pm.MesmRecipe(dim_feedforward=32, bsz=2)
    project = pm.our_mesm_project(r, layout, 3, "/tmp/out")
    assert project["run"]["batch_size_train"] == 2 and project["datasets"]["c2f_qvh"]["group_by"] == "youtube"
    model = C2FMESMQDDETR.from_config(pm.model_type_merged(project["model"]))
    assert model.detr.text_encoder is not None and model.detr.text_encoder.hidden_size == 64
    assert model.config["ss_group_video"] == "concat" and model.config["global_token_masked"] is True
    ds = QVHighlightsBuilder(dict(pm.our_mesm_dataset_config(r, layout, 0), splits=["train"])).build_datasets()
    train = ds["train"]
    assert len(train) == 3  # items = videos
    batch = train.collater([train[0], train[2]])
    assert batch["group"] == ["demo_v0", "demo_v0", "demo_v2"] and batch["src_vid"].shape[-1] == 10
    torch.manual_seed(0)
    model.train()
    losses = model(batch)
    for key in ("loss", "loss_rec_fw", "loss_rec_ss", "loss_saliency"):
        assert torch.isfinite(losses[key]), key
    assert float(losses["fw_aligned_frac"]) == 1.0


def test_dropout_replay_cuts_official_text_padding(pm):
    from parity_common import DropoutReplay

    heads = torch.rand(2 * 4, 5, 32) > 0.5  # official (B*H, Lq, Lk): text keys padded to 32
    ours = DropoutReplay.to_ours("heads", heads, torch.Size([2, 4, 5, 14]), crop_padding=True)
    torch.testing.assert_close(ours, heads.reshape(2, 4, 5, 32)[..., :14])
    seq = torch.rand(33, 2, 6) > 0.5  # official (L, B, D) with L = 32 words + the SS token
    torch.testing.assert_close(DropoutReplay.to_ours("seq_first", seq, torch.Size([2, 15, 6]), crop_padding=True),
                               seq.transpose(0, 1)[:, :15])
    with pytest.raises(RuntimeError, match="dropout site mismatch"):  # only padding may be cut
        DropoutReplay.to_ours("seq_first", seq, torch.Size([2, 15, 6]))
    with pytest.raises(RuntimeError, match="dropout site mismatch"):  # never grown
        DropoutReplay.to_ours("batch_first", seq, torch.Size([40, 2, 6]), crop_padding=True)


def test_official_checkpoint_model_drops_the_text_tower(pm):
    import official_runtime

    state = {"text_encoder.token_embedding.weight": 1, "input_vid_proj.0.weight": 2, "a.text_encoder_x": 3}
    assert official_runtime.without_text_encoder(state) == {"input_vid_proj.0.weight": 2}


def test_init_differences_flag_another_scheme(pm):
    torch.manual_seed(0)
    default = torch.nn.Linear(256, 256).weight.detach()
    xavier = torch.nn.init.xavier_uniform_(torch.empty(256, 256))
    rows = pm.init_differences({"a": default, "b": default, "small": torch.ones(3, 3), "only_official": default},
                               {"a": default.clone(), "b": xavier, "small": torch.zeros(3, 3)})
    assert [r[0] for r in rows] == ["b"]
    assert rows[0][1] == pytest.approx(256 ** -0.5 / 3 ** 0.5, rel=0.05) and rows[0][2] == pytest.approx(0.0625, rel=0.05)
