"""MomentRetrievalDataset / VideoRetrievalDataset, collaters, label functions, processors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.features import NpzDirStore
from lavis_c2f.data.records import MomentRecord
from lavis_c2f.datasets.collate import pad_sequences
from lavis_c2f.datasets.moment_retrieval import (MomentRetrievalDataset, collate_moment_retrieval,
                                                 saliency_labels_from_scores, saliency_labels_from_windows)
from lavis_c2f.datasets.video_retrieval import VideoRetrievalDataset
from lavis_c2f.processors.feature_processors import TextFeatureProcessor, VideoFeatureProcessor

FIXTURE = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "qd_detr_reference" / \
    "qd_detr_clip_reference.pt"


def _stores(tmp_path, lengths, tok_lengths, dv=6, dt=4, seed=0):
    rng = np.random.default_rng(seed)
    v, t = tmp_path / "v", tmp_path / "t"
    v.mkdir(), t.mkdir()
    for vid, L in lengths.items():
        np.savez(v / f"{vid}.npz", features=rng.standard_normal((L, dv)).astype(np.float32))
    for qid, T in tok_lengths.items():
        np.savez(t / f"qid{qid}.npz", last_hidden_state=rng.standard_normal((T, dt)).astype(np.float32),
                 pooler_output=rng.standard_normal(dt).astype(np.float32))
    return NpzDirStore(v), NpzDirStore(t, field="last_hidden_state")


def _rec(qid, vid, duration, windows=(), clip_ids=None, scores=None):
    return MomentRecord(qid=qid, query=f"query {qid}", vid=vid, duration=duration,
                        relevant_windows=list(windows), relevant_clip_ids=clip_ids, saliency_scores=scores)


# --------------------------------------------------------------------------- label functions


def test_saliency_from_scores_hard_and_easy():
    ids = [3, 4, 5, 6]
    scores = [[1, 1, 1], [4, 4, 4], [0, 0, 1], [2, 2, 2]]
    pos, neg, all_s = saliency_labels_from_scores(ids, scores, 10, np.random.default_rng(0))
    assert pos[0] == 4 and neg[0] == 5                     # hard: max / min summed score
    assert pos[1] in ids and neg[1] not in ids and 0 <= neg[1] < 10
    np.testing.assert_array_equal(all_s, [0, 0, 0, 3, 12, 1, 6, 0, 0, 0])
    # deterministic for one RNG seed, different draws for others
    again = saliency_labels_from_scores(ids, scores, 10, np.random.default_rng(0))
    assert (again[0], again[1]) == (pos, neg)
    draws = {tuple(saliency_labels_from_scores(ids, scores, 10, np.random.default_rng(s))[1]) for s in range(20)}
    assert len(draws) > 1
    # ties: stable sort keeps the first of equal scores as the hard negative
    pos, neg, _ = saliency_labels_from_scores([1, 2], [[1, 1, 1], [1, 1, 1]], 3, np.random.default_rng(0))
    assert neg[0] == 1 and pos[0] == 2
    # every clip relevant: no easy negative pool -> hard ones copied
    pos, neg, _ = saliency_labels_from_scores([0, 1], [[1, 1, 1], [2, 2, 2]], 2, np.random.default_rng(0))
    assert pos == [1, 1] and neg == [0, 0]
    # ids past the features are clamped (hard) and dropped from the score array
    pos, neg, all_s = saliency_labels_from_scores([4, 9], [[1, 1, 1], [4, 4, 4]], 6, np.random.default_rng(0))
    assert pos[0] == 5 and all_s.shape == (6,) and all_s[4] == 3 and all_s.sum() == 3


def test_saliency_from_windows():
    pos, neg, all_s = saliency_labels_from_windows([(2.0, 7.0)], 10, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(np.flatnonzero(all_s), [2, 3, 4, 5, 6])
    assert len(pos) == 2 and set(pos) <= {2, 3, 4, 5, 6} and pos[0] != pos[1]
    assert len(neg) == 2 and not set(neg) & {2, 3, 4, 5, 6}
    pos, neg, all_s = saliency_labels_from_windows([(0.0, 9.5)], 3, 1.0, np.random.default_rng(0))
    assert all_s.tolist() == [1, 1, 1] and neg == pos  # no negatives available -> copies


# --------------------------------------------------------------------------- moment dataset


def test_moment_dataset_sample_and_collate(tmp_path):
    vs, ts = _stores(tmp_path, {"a": 75, "b": 40, "c": 12}, {1: 20, 2: 7, 3: 32, 4: 5})
    recs = [
        _rec(1, "a", 150, [(26, 36)], list(range(13, 18)), [[1, 2, 3], [4, 4, 4], [0, 0, 0], [2, 2, 2], [1, 1, 1]]),
        _rec(2, "b", 90, [(10, 20), (40, 70), (75, 90)]),   # no saliency; features cover 80 s only
        _rec(3, "c", 24),                                    # no GT (test split)
        _rec(4, "c", 24, [(30, 40)]),                        # GT entirely past the features
    ]
    ds = MomentRetrievalDataset(recs, [vs], ts, vis_processor=VideoFeatureProcessor(max_len=75),
                                text_processor=TextFeatureProcessor(max_len=32), clip_length=2.0,
                                max_windows=5, seed=7)
    s0 = ds[0]
    assert s0["video_feat"].shape == (75, 8) and s0["query_feat"].shape == (20, 4)
    torch.testing.assert_close(s0["span_labels"], torch.tensor([[31 / 150, 10 / 150]]))
    assert s0["saliency_pos_labels"][0] == 14 and s0["saliency_neg_labels"][0] == 15
    assert s0["saliency_all_labels"][13:18].tolist() == [6, 12, 0, 6, 3] and s0["has_labels"]
    s1 = ds[1]
    assert s1["duration"] == 80.0  # min(90, 40 clips * 2 s)
    # (75, 90) is clamped to (75, 80)
    torch.testing.assert_close(s1["span_labels"],
                               torch.tensor([[15 / 80, 10 / 80], [55 / 80, 30 / 80], [77.5 / 80, 5 / 80]]))
    assert s1["saliency_all_labels"].sum() == 5 + 15 + 3  # clips 5-9, 20-34, 37-39
    batch = ds.collater([ds[i] for i in range(4)])
    assert batch["src_vid"].shape == (4, 75, 8) and batch["src_txt"].shape == (4, 32, 4)
    assert batch["src_vid_mask"].sum(1).tolist() == [75, 40, 12, 12]
    assert batch["src_txt_mask"].sum(1).tolist() == [20, 7, 32, 5]
    assert batch["src_vid"][1, 40:].abs().sum() == 0 and batch["src_txt"][1, 7:].abs().sum() == 0
    assert batch["src_vid_mask"].dtype == torch.float32
    assert batch["saliency_pos_labels"].shape == (4, 2) and batch["saliency_pos_labels"].dtype == torch.long
    assert batch["saliency_all_labels"].shape == (4, 75)
    assert batch["has_labels"].tolist() == [True, True, False, False]
    assert [tuple(s.shape) for s in batch["span_labels"]] == [(1, 2), (3, 2), (0, 2), (0, 2)]
    assert batch["duration"].tolist() == [150, 80, 24, 24] and batch["clip_length"].tolist() == [2.0] * 4
    assert batch["relevant_windows"][3] == [[30.0, 40.0]] and batch["qid"] == [1, 2, 3, 4]
    assert batch["saliency_pos_labels"][2].tolist() == [0, 0] and batch["saliency_all_labels"][2].sum() == 0
    # TEF of the sample's own length in the last two columns
    torch.testing.assert_close(batch["src_vid"][2, :12, -2:],
                               torch.stack([torch.arange(12) / 12, torch.arange(12) / 12 + 1 / 12], 1))


def test_moment_dataset_deterministic_per_epoch(tmp_path):
    vs, ts = _stores(tmp_path, {"a": 30}, {1: 5})
    windows = [(2 * i, 2 * i + 1) for i in range(8)]
    rec = _rec(1, "a", 60, windows, list(range(0, 16, 2)), [[i % 5, 1, 1] for i in range(8)])
    ds = MomentRetrievalDataset([rec], [vs], ts, clip_length=2.0, max_windows=3, seed=3)
    a, b = ds[0], ds[0]
    assert a["span_labels"].shape == (3, 2) and torch.equal(a["span_labels"], b["span_labels"])
    assert a["saliency_neg_labels"] == b["saliency_neg_labels"]
    seen = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        s = ds[0]
        seen.add((tuple(s["saliency_neg_labels"]), tuple(map(tuple, s["span_labels"].tolist()))))
    assert len(seen) > 1
    ds.set_epoch(0)
    assert torch.equal(ds[0]["span_labels"], a["span_labels"])


def test_collate_all_padding_sample():
    d = {"qid": 0, "query": "q", "vid": "v", "duration": 10.0, "clip_length": 2.0, "relevant_windows": [],
         "has_labels": False, "span_labels": torch.zeros(0, 2), "saliency_pos_labels": [0, 0],
         "saliency_neg_labels": [0, 0]}
    empty = dict(d, video_feat=torch.zeros(0, 5), query_feat=torch.zeros(0, 3),
                 saliency_all_labels=torch.zeros(0))
    full = dict(d, video_feat=torch.ones(4, 5), query_feat=torch.ones(2, 3), saliency_all_labels=torch.ones(4))
    b = collate_moment_retrieval([empty, full])
    assert b["src_vid"].shape == (2, 4, 5) and b["src_vid_mask"].tolist() == [[0] * 4, [1] * 4]
    assert b["src_txt_mask"].tolist() == [[0, 0], [1, 1]] and b["src_vid"][0].abs().sum() == 0
    only_empty = collate_moment_retrieval([empty])
    assert only_empty["src_vid"].shape == (1, 1, 5) and only_empty["src_vid_mask"].sum() == 0
    with pytest.raises(ValueError):
        collate_moment_retrieval([])
    with pytest.raises(ValueError, match="trailing shape"):
        pad_sequences([torch.zeros(2, 3), torch.zeros(2, 4)])


def test_matches_official_qd_detr_inputs(tmp_path):
    """Features written to npz and read back through the dataset + collater equal the padded
    inputs the official StartEndDataset / start_end_collate produced (fixture)."""
    if not FIXTURE.resolve().exists():
        pytest.skip(f"../shared not found: {FIXTURE.resolve()}")
    fx = torch.load(FIXTURE.resolve(), map_location="cpu", weights_only=True)
    x = fx["inputs"]
    metas = fx["meta"]["query_metas"]
    (tmp_path / "clip_features").mkdir()
    (tmp_path / "clip_text_features").mkdir()
    for m, vfeats, tfeat in zip(metas, x["raw_video_feats_unnormalized"], x["raw_text_feats_unnormalized"]):
        np.savez(tmp_path / "clip_features" / f"{m['vid']}.npz", features=vfeats[0].numpy())
        np.savez(tmp_path / "clip_text_features" / f"qid{m['qid']}.npz", last_hidden_state=tfeat.numpy(),
                 pooler_output=tfeat.numpy()[0])
    recs = [MomentRecord(qid=m["qid"], query=m["query"], vid=m["vid"], duration=float(m["duration"]))
            for m in metas]
    ds = MomentRetrievalDataset(recs, [NpzDirStore(tmp_path / "clip_features")],
                                NpzDirStore(tmp_path / "clip_text_features", field="last_hidden_state"),
                                vis_processor=VideoFeatureProcessor(max_len=75, use_tef=True),
                                text_processor=TextFeatureProcessor(max_len=32), clip_length=2.0)
    b = ds.collater([ds[i] for i in range(3)])
    torch.testing.assert_close(b["src_vid"], x["src_vid"], rtol=0, atol=1e-6)
    torch.testing.assert_close(b["src_txt"], x["src_txt"], rtol=0, atol=1e-6)
    assert torch.equal(b["src_vid_mask"], x["src_vid_mask"]) and torch.equal(b["src_txt_mask"], x["src_txt_mask"])
    assert b["duration"].tolist() == [150, 80, 24]


# --------------------------------------------------------------------------- retrieval dataset


def test_video_retrieval_dataset(tmp_path):
    vs, ts = _stores(tmp_path, {"a": 10, "b": 4, "c": 7}, {1: 3, 2: 6, 3: 2, 4: 4})
    recs = [_rec(1, "b", 8, [(0, 2)]), _rec(2, "a", 20, [(2, 4)]), _rec(3, "b", 8), _rec(4, "c", 14, [(1, 3)])]
    ds = VideoRetrievalDataset(recs, [vs], ts, vis_processor=VideoFeatureProcessor(max_len=8, use_tef=True),
                               text_processor=TextFeatureProcessor(max_len=5))
    assert ds.videos == ["b", "a", "c"] and len(ds) == 4 and ds.num_videos == 3
    assert [ds.gt_video_index(q) for q in (1, 2, 3, 4)] == [0, 1, 0, 2]
    with pytest.raises(KeyError, match="qid 9"):
        ds.gt_video_index(9)
    s = ds[1]
    assert s["video_feat"].shape == (8, 6)  # truncated to max_len, no TEF for stage 1
    assert s["query_feat"].shape == (5, 4) and s["txt_pooled"].shape == (4,)
    torch.testing.assert_close(s["txt_pooled"].norm(), torch.tensor(1.0), atol=1e-4, rtol=0)
    b = ds.collater([ds[i] for i in range(4)])
    assert set(b) == {"src_txt", "src_txt_mask", "txt_pooled", "src_vid", "src_vid_mask", "qid", "query",
                      "vid", "video_index"}
    assert b["src_vid"].shape == (4, 8, 6) and b["src_vid_mask"].sum(1).tolist() == [4, 8, 4, 7]
    assert b["src_txt"].shape == (4, 5, 4) and b["txt_pooled"].shape == (4, 4)
    assert b["video_index"].tolist() == [0, 1, 0, 2]
    qb = ds.query_batch([3, 0])
    assert qb["qid"] == [4, 1] and qb["gt_video_index"].tolist() == [2, 0] and qb["src_txt"].shape == (2, 4, 4)
    vb = ds.video_batch([2, 0])
    assert vb["vid"] == ["c", "b"] and vb["src_vid"].shape == (2, 7, 6)
    assert vb["src_vid_mask"].sum(1).tolist() == [7, 4]
    torch.testing.assert_close(vb["src_vid"][1, :4], ds.video_features("b"))


# --------------------------------------------------------------------------- processors


def test_processors_registered_and_strict():
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    vcls = registry.get_processor_class("c2f_video_features")
    tcls = registry.get_processor_class("c2f_text_features")
    assert vcls is VideoFeatureProcessor and tcls is TextFeatureProcessor
    vp = vcls.from_config(OmegaConf.create({"name": "c2f_video_features", "max_len": 3, "use_tef": False}))
    out = vp([np.ones((5, 2)), np.ones((4, 3))])
    assert out.shape == (3, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out[0, :2].norm(), torch.tensor(1.0), atol=1e-4, rtol=0)
    assert vcls.from_config(None).use_tef is True
    with pytest.raises(ConfigError, match="'max_lenght' \\(did you mean 'max_len'\\?\\)"):
        vcls.from_config({"max_lenght": 3})
    with pytest.raises(ConfigError, match="unknown key"):
        tcls.from_config({"use_tef": True})
    tp = tcls.from_config({"max_len": 2})
    assert tp(torch.ones(4, 3)).shape == (2, 3)
