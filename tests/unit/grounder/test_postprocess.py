"""Inference post-processing: clamp bound, snapping, NMS, top-k, config validation."""
from __future__ import annotations

import math

import pytest
import torch

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.grounder import PostProcessConfig, postprocess_batch
from lavis_c2f.models.grounder.postprocess import postprocess_sample, rank_windows, snap_windows


def _logits(fg_probs):
    p = torch.tensor(fg_probs)
    return torch.stack([torch.log(p), torch.log(1 - p)], dim=1)


def test_rank_windows_sorts_and_rounds():
    rows = rank_windows(_logits([0.2, 0.9, 0.5]),
                        torch.tensor([[0.5, 0.2], [0.25, 0.1], [0.9, 0.4]]), duration=30.0)
    assert [r[2] for r in rows] == [0.9, 0.5, 0.2]
    assert rows[0][:2] == [6.0, 9.0]
    assert rows[1][:2] == [21.0, 33.0]  # before clamping, may exceed the duration
    assert all(r == [float(f"{v:.4f}") for v in r] for r in rows)


def test_duration_clamp_is_the_default_and_official_bound_is_fixed():
    logits, spans = _logits([0.9, 0.8]), torch.tensor([[0.9, 0.4], [0.05, 0.3]])
    ours = postprocess_sample(logits, spans, None, duration=30.0, clip_length=2.0,
                              config=PostProcessConfig())["windows"]
    assert ours[0][:2] == [20.0, 30.0] and ours[1][:2] == [0.0, 6.0]
    official = postprocess_sample(logits, spans, None, duration=30.0, clip_length=2.0,
                                  config=PostProcessConfig.official())["windows"]
    assert official[0][:2] == [20.0, 32.0]  # the official bound is 150 s whatever the video


def test_end_clamped_to_duration_after_snapping():
    rows = postprocess_sample(_logits([0.7]), torch.tensor([[0.5, 1.0]]), None, duration=29.5,
                              clip_length=2.0, config=PostProcessConfig())["windows"]
    assert rows[0][:2] == [0.0, 29.5]  # 29.5 snaps to 30, then back to the duration


def test_snap_rounds_half_to_even_like_torch_round():
    out = snap_windows([[3.0, 5.0, 0.123456]], clip_length=2.0, min_ts_val=0, max_ts_val=150)
    assert out == [[4.0, 4.0, 0.1235]]  # 1.5 -> 2, 2.5 -> 2
    out = snap_windows([[3.0, 5.0, 0.5]], clip_length=2.0, min_ts_val=0, max_ts_val=150,
                       round_to_clip=False)
    assert out[0][:2] == [3.0, 5.0]


def test_nms_and_top_k():
    logits = _logits([0.9, 0.85, 0.6, 0.5])
    spans = torch.tensor([[0.3, 0.2], [0.31, 0.2], [0.8, 0.1], [0.5, 0.9]])
    cfg = PostProcessConfig(nms_threshold=0.5)
    rows = postprocess_sample(logits, spans, None, 100.0, 2.0, cfg)["windows"]
    assert [r[2] for r in rows] == [0.9, 0.6, 0.5]  # the near-duplicate 0.85 is suppressed
    cfg = PostProcessConfig(nms_threshold=0.5, top_k=2)
    assert len(postprocess_sample(logits, spans, None, 100.0, 2.0, cfg)["windows"]) == 2
    cfg = PostProcessConfig(top_k=1)
    assert len(postprocess_sample(logits, spans, None, 100.0, 2.0, cfg)["windows"]) == 1


def test_saliency_is_float16_rounded():
    sal = torch.tensor([0.123456789, -1.00001])
    out = postprocess_sample(_logits([0.5]), torch.tensor([[0.5, 0.5]]), sal, 10.0, 2.0,
                             PostProcessConfig())["saliency"]
    assert out == sal.half().tolist() and out[0] != pytest.approx(0.123456789, abs=1e-7)


def test_config_validation():
    assert PostProcessConfig.from_mapping({"max_ts_val": 150, "top_k": 3}).top_k == 3
    with pytest.raises(ConfigError, match=r"model\.postprocess: unknown key\(s\) 'bogus'"):
        PostProcessConfig.from_mapping({"bogus": 1}, "model.postprocess")
    with pytest.raises(ConfigError, match="nms_threshold"):
        PostProcessConfig.from_mapping({"nms_threshold": 2.0})
    with pytest.raises(ConfigError, match="top_k"):
        PostProcessConfig.from_mapping({"top_k": 0})


def test_batch_rows_and_errors():
    out = {"pred_logits": torch.randn(2, 3, 2), "pred_spans": torch.rand(2, 3, 2) * 0.5 + 0.2,
           "saliency_scores": torch.randn(2, 4), "video_mask": torch.tensor([[1., 1, 1, 1], [1, 1, 0, 0]])}
    rows = postprocess_batch(out, qids=[1, 2], queries=["a", "b"], vids=["v1", "v2"],
                             durations=[8.0, 4.0], clip_lengths=[2.0, 2.0], config=PostProcessConfig())
    assert [r["qid"] for r in rows] == [1, 2] and len(rows[1]["pred_saliency_scores"]) == 2
    assert set(rows[0]) == {"qid", "query", "vid", "pred_relevant_windows", "pred_saliency_scores"}
    assert all(0.0 <= st <= ed <= 4.0 for st, ed, _ in rows[1]["pred_relevant_windows"])
    with pytest.raises(ValueError, match="durations"):
        postprocess_batch(out, qids=[1, 2], queries=["a", "b"], vids=["v1", "v2"], durations=[8.0],
                          clip_lengths=[2.0, 2.0], config=PostProcessConfig())
    with pytest.raises(ValueError, match="duration"):
        postprocess_sample(out["pred_logits"][0], out["pred_spans"][0], None, 0.0, 2.0,
                           PostProcessConfig())
    assert not math.isnan(rows[0]["pred_relevant_windows"][0][2])
