"""Fusion maths, the perfect-stage-1 bound, VCMR rows and the weight search (pure python)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.pipeline.fusion import (FusionConfig, evaluate_candidates, fuse_candidates, fuse_rows,
                                       load_fusion_choice, normalise_s1, oracle_moments, tune_fusion)

# one query, three candidates in stage-1 order; windows [st, ed, s2]
CANDS = [
    ["a", 3.0, [[0.0, 4.0, 0.5], [10.0, 12.0, 0.2]]],
    ["b", 1.0, [[2.0, 6.0, 0.9]]],
    ["c", 2.0, [[0.0, 2.0, 0.4]]],
]


def test_normalise_s1():
    z = normalise_s1([3.0, 1.0, 2.0], "zscore")
    np.testing.assert_allclose(z, [1.0 / math.sqrt(2 / 3), -1.0 / math.sqrt(2 / 3), 0.0])
    np.testing.assert_allclose(normalise_s1([3.0, 1.0, 2.0], "minmax"), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(normalise_s1([3.0, 1.0, 2.0], "rank"), [1.0, 2 / 3, 1 / 3])
    np.testing.assert_array_equal(normalise_s1([5.0, 5.0], "zscore"), [0.0, 0.0])   # no spread
    np.testing.assert_array_equal(normalise_s1([5.0], "minmax"), [0.0])
    assert normalise_s1([], "zscore").shape == (0,)


def test_product_fusion_by_hand():
    z = normalise_s1([3.0, 1.0, 2.0], "zscore")
    fused = fuse_candidates(CANDS, FusionConfig(form="product", weight=1.0))
    expect = sorted([("a", 0.0, 4.0, 0.5 * math.exp(z[0])), ("a", 10.0, 12.0, 0.2 * math.exp(z[0])),
                     ("b", 2.0, 6.0, 0.9 * math.exp(z[1])), ("c", 0.0, 2.0, 0.4 * math.exp(z[2]))],
                    key=lambda m: -m[3])
    assert [m[:3] for m in fused] == [list(e[:3]) for e in expect]
    np.testing.assert_allclose([m[3] for m in fused], [e[3] for e in expect])
    # weight 0: the grounder alone decides across videos
    w0 = fuse_candidates(CANDS, FusionConfig(form="product", weight=0.0))
    assert [m[0] for m in w0] == ["b", "a", "c", "a"]
    assert [m[3] for m in w0] == [0.9, 0.5, 0.4, 0.2]


def test_sum_fusion_and_stage1_form():
    fused = fuse_candidates(CANDS, FusionConfig(form="sum", weight=0.5, s1_norm="minmax"))
    # s1n = a 1.0, b 0.0, c 0.5 -> a 0.75 and 0.6, b 0.45, c 0.45 (tie: stage-1 order, b before c)
    assert [(m[0], round(m[3], 6)) for m in fused] == [("a", 0.75), ("a", 0.6), ("b", 0.45), ("c", 0.45)]
    s1 = fuse_candidates(CANDS, FusionConfig(form="stage1"))
    assert [m[0] for m in s1] == ["a", "a", "b", "c"]          # videos by stage 1
    assert [m[1] for m in s1[:2]] == [0.0, 10.0]                 # windows by s2 inside a video


def test_ties_keep_stage1_then_window_order_and_max_moments():
    cands = [["x", 1.0, [[0, 1, 0.5], [2, 3, 0.5]]], ["y", 1.0, [[4, 5, 0.5]]]]
    fused = fuse_candidates(cands, FusionConfig(weight=2.0))     # equal s1 -> z = 0 -> all scores 0.5
    assert [m[:3] for m in fused] == [["x", 0.0, 1.0], ["x", 2.0, 3.0], ["y", 4.0, 5.0]]
    assert len(fuse_candidates(cands, FusionConfig(max_moments=2))) == 2
    assert fuse_candidates([], FusionConfig()) == []


def test_fusion_config_validation():
    with pytest.raises(ConfigError, match="form"):
        FusionConfig(form="max")
    with pytest.raises(ConfigError, match="weight"):
        FusionConfig(form="sum", weight=1.5)
    with pytest.raises(ConfigError, match="weight"):
        FusionConfig(weight=-1.0)
    with pytest.raises(ConfigError, match=r"run\.fusion: unknown key\(s\) 'alpha'"):
        FusionConfig.from_mapping({"alpha": 1}, where="run.fusion")
    with pytest.raises(ConfigError, match=r"run\.fusion\.s1_norm"):
        FusionConfig.from_mapping({"s1_norm": "l2"}, where="run.fusion")
    assert FusionConfig.from_mapping({"weight": 2}).weight == 2.0


def _row(qid, gt_vid, windows, cands, gt_windows, stage1=None):
    return {"qid": qid, "query": f"q{qid}", "gt_vid": gt_vid, "relevant_windows": windows,
            "stage1": stage1 if stage1 is not None else [[c[0], c[1]] for c in cands],
            "candidates": cands, "gt_windows": gt_windows, "gt_saliency": None, "duration": 30}


def test_oracle_puts_gt_windows_first():
    row = _row(1, "g", [[0, 4]], [["x", 2.0, [[0, 4, 0.9]]], ["g", 1.0, [[10, 12, 0.3], [0, 4, 0.2]]]],
               gt_windows=[[10, 12, 0.3], [0, 4, 0.2]])
    fused = fuse_candidates(row["candidates"], FusionConfig())
    oracle = oracle_moments(row, fused, 100)
    assert oracle[:2] == [["g", 10.0, 12.0, 0.3], ["g", 0.0, 4.0, 0.2]]
    assert [m[0] for m in oracle[2:]] == ["x"]
    # GT video absent from the candidates: the oracle still has its windows
    row2 = _row(2, "g", [[0, 4]], [["x", 2.0, [[0, 4, 0.9]]]], gt_windows=[[0, 4, 0.7]])
    assert oracle_moments(row2, fuse_candidates(row2["candidates"], FusionConfig()), 100)[0] == ["g", 0.0, 4.0, 0.7]


def test_evaluate_candidates_metrics_and_upper_bound():
    rows = [
        # q1: stage 1 ranks the GT video first, but a distractor's window scores higher: with
        # weight 0 -> VCMR R@1 miss, R@5 hit; the oracle (GT video first) hits at rank 1.
        _row(1, "g1", [[0, 4]], [["g1", 2.0, [[0, 4, 0.8]]], ["x", 1.0, [[0, 4, 0.9]]]],
             gt_windows=[[0, 4, 0.8]]),
        # q2: GT video not retrieved -> VCMR miss everywhere; oracle hits (window IoU 0.6 >= 0.5, < 0.7)
        _row(2, "g2", [[0, 10]], [["y", 1.0, [[0, 4, 0.5]]]], gt_windows=[[0, 6, 0.5]]),
        # q3: retrieved first with a good window
        _row(3, "g3", [[2, 6]], [["g3", 5.0, [[2, 6, 0.7]]], ["z", 1.0, [[0, 2, 0.1]]]],
             gt_windows=[[2, 6, 0.7]]),
        # q4: no ground truth (not evaluated)
        {**_row(4, "g4", [], [["g4", 1.0, [[0, 1, 0.1]]]], gt_windows=None)},
    ]
    flat, report, vcmr_rows = evaluate_candidates(rows, FusionConfig(weight=0.0), protocol="r1miou")
    assert [r["qid"] for r in vcmr_rows] == [1, 2, 3, 4]
    assert set(vcmr_rows[0]) == {"qid", "query", "pred_moments"}
    assert all(len(m) == 4 and isinstance(m[0], str) for r in vcmr_rows for m in r["pred_moments"])
    assert report["num_labelled"] == 3
    assert flat["VCMR-R@1-IoU@0.5"] == pytest.approx(100 / 3, abs=0.01)      # q3 only
    assert flat["VCMR-R@5-IoU@0.5"] == pytest.approx(200 / 3, abs=0.01)      # q1, q3
    assert flat["oracle-VCMR-R@1-IoU@0.5"] == 100.0
    assert flat["oracle-VCMR-R@1-IoU@0.7"] == pytest.approx(200 / 3, abs=0.01)
    assert flat["stage1-R@1"] == pytest.approx(200 / 3, abs=0.01)              # q1, q3
    assert flat["stage1-R@5"] == pytest.approx(200 / 3, abs=0.01)
    assert flat["stage1-found"] == pytest.approx(200 / 3, abs=0.01)
    assert flat["VR-R@1"] == pytest.approx(100 / 3, abs=0.01)
    # single-video metrics of the grounder in the GT video (r1miou convention, MR- prefix)
    assert flat["MR-R1@0.5"] == 100.0 and flat["MR-R1@0.7"] == pytest.approx(200 / 3, abs=0.01)
    # stronger stage-1 weight fixes q1's rank-1 miss
    flat2, _, _ = evaluate_candidates(rows, FusionConfig(weight=4.0), protocol="r1miou")
    assert flat2["VCMR-R@1-IoU@0.5"] == pytest.approx(200 / 3, abs=0.01)


def test_evaluate_candidates_without_ground_truth():
    rows = [_row(1, "g", [], [["g", 1.0, [[0, 1, 0.5]]]], gt_windows=None)]
    flat, report, vcmr_rows = evaluate_candidates(rows, FusionConfig())
    assert flat == {} and "note" in report and vcmr_rows[0]["pred_moments"][0][0] == "g"


def test_tune_fusion_picks_best_weight_and_file_roundtrip(tmp_path):
    rows = [
        _row(1, "g1", [[0, 4]], [["g1", 2.0, [[0, 4, 0.8]]], ["x", 1.0, [[0, 4, 0.9]]]], [[0, 4, 0.8]]),
        _row(2, "g2", [[0, 4]], [["g2", 3.0, [[0, 4, 0.3]]], ["y", 1.0, [[0, 4, 0.95]]]], [[0, 4, 0.3]]),
    ]
    res = tune_fusion(rows, form="product", weights=[4.0, 0.0, 1.0], smooth=0)
    assert [g["weight"] for g in res["grid"]] == [0.0, 1.0, 4.0]            # sorted
    by_w = {g["weight"]: g["metrics"]["VCMR-R@1-IoU@0.5"] for g in res["grid"]}
    assert by_w == {0.0: 0.0, 1.0: 100.0, 4.0: 100.0}
    best = max(by_w.values())
    assert res["weight"] == min(w for w, v in by_w.items() if v == best)   # smallest best weight
    assert res["value"] == best
    path = tmp_path / "fusion.json"
    path.write_text(json.dumps(res))
    cfg = load_fusion_choice(str(path))
    assert cfg == FusionConfig(form="product", weight=res["weight"], s1_norm="zscore", max_moments=100)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"form": "nope"}))
    with pytest.raises(DataFormatError, match="bad.json"):
        load_fusion_choice(str(bad))
    with pytest.raises(ConfigError, match="unknown metric"):
        tune_fusion(rows, weights=[0.0], metric="VCMR-R@3-IoU@0.5")
    with pytest.raises(ConfigError, match="smooth"):
        tune_fusion(rows, weights=[0.0], smooth=-1)


def test_tune_fusion_smoothing_passes_over_a_lone_spike():
    # two candidates per query with zscore(s1) = (+1, -1): with product fusion the second video's
    # window overtakes the first one's at a per-query threshold weight t (s2 ratio e^(2t))
    def gt_first_above(qid, t):      # the GT video is stage-1's first: right for w > t
        s2_x = 0.5
        return _row(qid, "g", [[0, 4]], [["g", 2.0, [[0, 4, s2_x * math.exp(-2 * t)]]], ["x", 1.0, [[0, 4, s2_x]]]],
                    [[0, 4, s2_x * math.exp(-2 * t)]])

    def gt_second_below(qid, t):     # the GT video is stage-1's second: right for w < t
        s2_g = 0.5
        return _row(qid, "g", [[0, 4]], [["x", 2.0, [[0, 4, s2_g * math.exp(-2 * t)]]], ["g", 1.0, [[0, 4, s2_g]]]],
                    [[0, 4, s2_g]])

    rows = [gt_first_above(1, 0.1), gt_first_above(2, 0.1), gt_second_below(3, 0.3), gt_second_below(4, 3.0),
            gt_second_below(5, 3.0)]
    grid = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
    plain = tune_fusion(rows, weights=grid, smooth=0, recall_ks=(1,))
    by_w = {g["weight"]: g["metrics"]["VCMR-R@1-IoU@0.5"] for g in plain["grid"]}
    assert by_w == {0.0: 60.0, 0.25: 100.0, 0.5: 80.0, 1.0: 80.0, 2.0: 80.0, 4.0: 40.0}
    assert plain["weight"] == 0.25                                            # the lone spike
    smoothed = tune_fusion(rows, weights=grid, recall_ks=(1,))                # smooth=1 by default
    scores = {g["weight"]: g["score"] for g in smoothed["grid"]}
    assert scores[0.5] == pytest.approx((100 + 80 + 80) / 3, abs=1e-3)
    assert scores[0.0] == pytest.approx((60 + 100) / 2, abs=1e-3)            # the window is clipped at the ends
    assert smoothed["smooth"] == 1 and smoothed["weight"] == 0.5 and smoothed["value"] == 80.0
    # the default score also averages R@5 and R@10 (both 100 here: two candidates per query)
    default = tune_fusion(rows, weights=grid)
    assert default["recall_ks"] == [1, 5, 10] and default["weight"] == 0.5
    assert {g["weight"]: g["score"] for g in default["grid"]}[0.5] == pytest.approx((260 / 3 + 200) / 3, abs=1e-3)


def test_tune_fusion_recall_ks_keep_r10():
    # q1: the GT video is stage-1's last of 12 but the grounder's favourite: inside the top 10 of
    # the fused list for w = 0.5, last for w = 8. q2: the GT video is stage-1's first but the
    # grounder prefers the other one: found first only for w = 8. R@1 alone picks 8 and loses
    # R@10; the default score (mean of R@1, R@5, R@10) keeps 0.5.
    q1 = _row(1, "g", [[0, 4]], [["x%d" % i, 20.0 - i, [[0, 4, 0.3]]] for i in range(11)]
              + [["g", 5.0, [[0, 4, 0.99]]]], [[0, 4, 0.99]])
    q2 = _row(2, "g", [[0, 4]], [["g", 2.0, [[0, 4, 0.3]]], ["x", 1.0, [[0, 4, 0.95]]]], [[0, 4, 0.3]])
    rows = [q1, q2]
    plain = tune_fusion(rows, weights=[0.5, 8.0], smooth=0, recall_ks=(1,))
    default = tune_fusion(rows, weights=[0.5, 8.0], smooth=0)
    m = {g["weight"]: g["metrics"] for g in default["grid"]}
    assert m[0.5]["VCMR-R@1-IoU@0.5"] == 0.0 and m[8.0]["VCMR-R@1-IoU@0.5"] == 50.0
    assert m[0.5]["VCMR-R@10-IoU@0.5"] == 100.0 and m[8.0]["VCMR-R@10-IoU@0.5"] == 50.0
    assert plain["weight"] == 8.0 and default["weight"] == 0.5
    with pytest.raises(ConfigError, match="recall_ks"):
        tune_fusion(rows, weights=[0.5], recall_ks=())


def test_fuse_rows_keeps_query_order():
    rows = [_row(i, "g", [[0, 1]], [["g", float(i), [[0, 1, 0.5]]]], None) for i in range(5)]
    assert [r["qid"] for r in fuse_rows(rows, FusionConfig())] == list(range(5))
