"""bench/train_parity.py: layouts, recipe mapping, comparisons, dropout replay and the table.

The official code is never imported here: the pieces that touch it are tested on stand-ins
with the official layouts (sequence-first tensors, (B*H, Lq, Lk) attention weights).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench_helpers import load_bench


@pytest.fixture(scope="module")
def tp():
    return load_bench("train_parity.py", "train_parity")


@pytest.fixture(scope="module")
def pc(tp):
    """bench/parity_common.py (what train_parity.py and parity_mesm.py share), as train_parity loaded it."""
    import parity_common

    return parity_common


def _qvh_rows():
    def row(qid, vid, duration, windows, clips):
        return {"qid": qid, "query": f"a person does thing {qid}", "duration": duration, "vid": vid,
                "relevant_windows": windows, "relevant_clip_ids": clips,
                "saliency_scores": [[4, 2, 2]] * len(clips)}
    return [row(1, "a", 150, [[0, 4]], [0, 1]), row(2, "b", 150, [[146, 150]], [73, 74]),
            row(3, "c", 126, [[10, 14], [20, 24]], [5, 6, 10, 11]), row(4, "d", 88, [[84, 88]], [42, 43])]


@pytest.fixture(scope="module")
def qvh_sample(tp, tmp_path_factory):
    ann = tmp_path_factory.mktemp("ann")
    for split in ("train", "val"):
        (ann / f"highlight_{split}_release.jsonl").write_text("\n".join(json.dumps(r) for r in _qvh_rows()) + "\n")
    return tp.make_qvh_sample(str(ann), str(tmp_path_factory.mktemp("qvh") / "sample"), n_train=4, n_val=2,
                              streams=(("slowfast", 6), ("clip", 4)), text_dim=5)


def test_qvh_sample_layout_alternates_lengths_and_matches_durations(tp, qvh_sample):
    assert qvh_sample.layout == "qvh"
    assert [Path(d).name for d in qvh_sample.video_dirs] == ["slowfast_features", "clip_features"]
    rows = [json.loads(line) for line in open(qvh_sample.annotations["train"])]
    assert [r["duration"] for r in rows] == [150, 126, 150, 88]  # full, short, full, short
    assert len([json.loads(line) for line in open(qvh_sample.annotations["val"])]) == 2
    feats = np.load(Path(qvh_sample.video_dirs[0]) / "d.npz")["features"]
    assert feats.shape == (44, 6) and feats.dtype == np.float32
    text = np.load(Path(qvh_sample.text_dir) / "qid3.npz")
    assert text["last_hidden_state"].shape == (len(rows[1]["query"].split()) + 2, 5)
    assert qvh_sample.widths() == (10, 5)
    assert tp.detect_corpus(qvh_sample.root).annotations == qvh_sample.annotations


def test_detect_corpus_rejects_other_folders(tp, tmp_path):
    with pytest.raises(SystemExit, match="neither a demo corpus"):
        tp.detect_corpus(str(tmp_path))


def test_recipe_checks_and_official_command_line(tp, qvh_sample):
    with pytest.raises(SystemExit, match="256"):
        tp.Recipe(hidden_dim=64).check()
    with pytest.raises(SystemExit, match="multiple of 5"):
        tp.Recipe(epochs=7).check()
    recipe = tp.Recipe(epochs=10, lr=5e-4)
    argv = tp.official_argv(recipe, qvh_sample, 3, "/tmp/results")
    opts = dict(zip(argv[::1], argv[1:]))
    assert opts["--device"] == "-1" and opts["--num_workers"] == "0" and opts["--seed"] == "3"
    assert opts["--v_feat_dim"] == "10" and opts["--t_feat_dim"] == "5"
    assert opts["--n_epoch"] == "10" and opts["--lr"] == "0.0005" and opts["--max_es_cnt"] == "-1"
    i = argv.index("--v_feat_dirs")
    assert argv[i + 1:i + 3] == qvh_sample.video_dirs


def test_our_project_builds_model_and_dataset(tp, qvh_sample):
    from lavis_c2f.datasets.builders import QVHighlightsBuilder
    from lavis_c2f.models.grounder.lavis_models import C2FQDDETR

    recipe = tp.Recipe()
    for variant, (model_over, data_over) in tp.VARIANTS.items():
        project = tp.our_project(recipe, qvh_sample, 7, "/tmp/out", variant)
        assert project["run"]["weight_decay_scope"] == "all" and project["run"]["drop_last"] is False
        assert project["model"]["t2v_mask_mode"] == model_over.get("t2v_mask_mode", "official")
        data = project["datasets"]["c2f_qvh"]
        assert data["saliency_tie_break"] == data_over.get("saliency_tie_break", "official")
        assert data["seed"] == 7
    model = C2FQDDETR.from_config(tp.our_model_config(recipe, qvh_sample))
    assert model.detr.vid_dim == 12 and model.postprocess.max_ts_val == 150.0
    assert model.postprocess.nms_threshold is None and model.config["train_neg_pass"] is True
    ds = QVHighlightsBuilder(dict(tp.our_dataset_config(recipe, qvh_sample, 0), splits=["train"])).build_datasets()
    item = ds["train"][3]
    assert tuple(item["video_feat"].shape) == (44, 12)  # 6 + 4 + 2 TEF columns
    assert item["saliency_pos_labels"][0] in (42, 43)


def test_relative_differences(pc):
    assert pc.rel_diff(1.0, 1.0) == 0.0
    assert pc.rel_diff(1.00001, 1.0) == pytest.approx(1e-5)
    assert pc.rel_diff(1e-8, 0.0) == pytest.approx(1e-2)  # floor 1e-6
    big = torch.tensor([1.0, -2.0], dtype=torch.float64)
    worst, rows = pc.grad_differences(
        {"a": big + 1e-6, "tiny": torch.tensor([3e-9]), "none": None, "one_sided": torch.ones(1)},
        {"a": big, "tiny": torch.tensor([0.0]), "none": None, "one_sided": None})
    by_name = {r[0]: r for r in rows}
    assert by_name["a"][1] == pytest.approx(5e-7, rel=1e-3)
    assert by_name["tiny"][1] == pytest.approx(3e-9 / (1e-4 * 2.0), rel=1e-3)  # floored scale
    assert math.isinf(worst) and rows[0][0] == "one_sided" and "none" not in by_name


def test_draw_support_and_distribution(pc):
    rng = np.random.default_rng(0)
    a = pc.draw_support(lambda k: [int(rng.integers(0, 4))], 400)
    b = pc.draw_support(lambda k: [k % 4], 400)
    ok, why = pc.same_distribution(a, b)
    assert ok and "4 values" in why
    ok, why = pc.same_distribution(a, pc.draw_support(lambda k: [k % 5], 400))
    assert not ok and "official only [4]" in why


class _OfficialLike(torch.nn.Module):
    """Official layouts: input dropout batch-first, a transformer part sequence-first, attention
    weights dropped as (B*H, Lq, Lk) through a module-level ``dropout`` function."""

    def __init__(self, attention_module):
        super().__init__()
        self.inp = torch.nn.Dropout(0.5)
        self.transformer = torch.nn.Module()
        self.transformer.drop = torch.nn.Dropout(0.25)
        self.attention_module = attention_module

    def forward(self, x, heads=2):  # x (B, L, D)
        x = self.inp(x)
        s = self.transformer.drop(x.transpose(0, 1)).transpose(0, 1)  # seq-first inside
        w = torch.ones(x.shape[0] * heads, x.shape[1], x.shape[1])
        w = self.attention_module.dropout(w, p=0.1, training=self.training)
        return s, w.reshape(x.shape[0], heads, x.shape[1], x.shape[1])


class _OursLike(torch.nn.Module):
    def forward(self, x, heads=2):
        import torch.nn.functional as F

        x = F.dropout(x, 0.5, self.training)
        s = F.dropout(x, 0.25, self.training)
        w = F.dropout(torch.ones(x.shape[0], heads, x.shape[1], x.shape[1]), p=0.1, training=self.training)
        return s, w


def test_dropout_replay_gives_ours_the_official_masks(pc):
    import types

    import torch.nn.functional as F

    attention = types.SimpleNamespace(dropout=F.dropout)
    official, ours = _OfficialLike(attention).train(), _OursLike().train()
    x = torch.randn(3, 5, 4)
    replay = pc.DropoutReplay()
    replay.record(official, attention)
    try:
        s_off, w_off = official(x)
    finally:
        replay.restore()
    assert [m[0] for m in replay.masks] == ["batch_first", "seq_first", "heads"]
    assert attention.dropout is F.dropout and F.dropout.__module__ == "torch.nn.functional"
    replay.replay()
    try:
        s_ours, w_ours = ours(x)
    finally:
        replay.restore()
    assert replay.used == 3
    torch.testing.assert_close(s_ours, s_off)
    torch.testing.assert_close(w_ours, w_off)
    with pytest.raises(RuntimeError, match="dropout site mismatch"):
        pc.DropoutReplay.to_ours("seq_first", torch.ones(5, 3, 4, dtype=torch.bool), torch.Size([3, 4, 5]))
    vec = torch.rand(3, 8) > 0.5  # a (B, D) vector inside a sequence-first module: no axis to swap
    assert torch.equal(pc.DropoutReplay.to_ours("seq_first", vec, torch.Size([3, 8])), vec)


def test_parity_table_means_spreads_and_missing_runs(pc):
    def job(code, variant, seed, mAP, ok=True):
        metrics = {"MR-full-R1@0.5": 50.0 + seed, "MR-full-R1@0.7": 30.0, "MR-full-mAP": mAP}
        result = {"train_seconds": 10.0, "train_samples": 100 * (seed + 1),
                  "test": {"1": metrics, "100": dict(metrics, **{"MR-full-mAP": mAP - 1})}} if ok else None
        return pc.Job(code, variant, seed, [], {}, "", "", result=result)

    jobs = [job("official QD-DETR", "official defaults", s, 40.0 + s) for s in range(3)]
    jobs += [job("ours QD-DETR", "official recipe (defaults)", s, 42.0, ok=s != 2) for s in range(3)]
    table, rows = pc.parity_table(jobs, 100)
    lines = table.splitlines()
    assert lines[2].startswith("| official QD-DETR | official defaults | 3/3 | 51.00 ± 1.00 | 30.00 ± 0.00 | 41.00 ± 1.00 |")
    assert "| 40.00 ± 1.00 |" in lines[2] and lines[2].endswith("| 20.00 ± 10.00 |")
    assert "| 2/3 |" in lines[3]
    assert rows[1]["mAP@batched"] == [41.0, 41.0] and pc.mean_sd([]) == "-" and pc.mean_sd([2.0]) == "2.00"


def test_seed_comparison_standard_error_and_pairing(pc):
    d, se = pc.difference_of_means([2.0, 4.0, 6.0], [1.0, 1.0])
    assert d == pytest.approx(3.0) and se == pytest.approx(math.sqrt(4.0 / 3))  # official sd 0
    with pytest.raises(ValueError, match="two runs"):
        pc.difference_of_means([1.0], [1.0, 2.0])
    official = {"seeds": [0, 1, 2], "R1@0.5@batched": [10.0, 20.0, 30.0], "R1@0.7@batched": [5.0, 5.0, 6.0],
                "mAP@batched": [1.0]}
    ours = {"seeds": [1, 2, 3], "R1@0.5@batched": [22.0, 28.0, 24.0], "R1@0.7@batched": [1.0, 1.0, 1.1],
            "mAP@batched": [1.0, 2.0]}
    lines = pc.seed_comparison(ours, official).splitlines()
    assert "paired over seeds [1, 2]" in lines[0]
    assert "inside the noise" in lines[1] and "1: +2.00, 2: -2.00" in lines[1] and "on 1/2" in lines[1]
    assert "ours LOWER" in lines[2]
    assert "too few runs" in lines[3]
