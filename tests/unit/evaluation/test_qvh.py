"""QVHighlights official metrics: golden reproduction, hand-computed cases, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.evaluation._rows import JsonlRows, QidMismatchError, load_rows
from lavis_c2f.evaluation.qvh import (detection_ap, eval_r1_miou, eval_submission, evaluate_files,
                                      format_brief_table)

OFFICIAL_BRIEF_KEYS = [
    "MR-full-R1@0.5", "MR-full-R1@0.7", "MR-full-mAP", "MR-full-mAP@0.5", "MR-full-mAP@0.75",
    "MR-long-mAP", "MR-middle-mAP", "MR-short-mAP",
    "HL-min-Fair-mAP", "HL-min-Fair-Hit1", "HL-min-Good-mAP", "HL-min-Good-Hit1",
    "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1"]
THRESHOLDS = ["0.5", "0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85", "0.9", "0.95"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_contains(actual, expected, where="result"):
    """Every key of ``expected`` is in ``actual`` with an equal value (recursively)."""
    for key, value in expected.items():
        assert key in actual, f"{where}: missing key {key!r}"
        if isinstance(value, dict):
            assert isinstance(actual[key], dict), f"{where}/{key} is not a dict"
            assert_contains(actual[key], value, f"{where}/{key}")
        else:
            assert actual[key] == value, f"{where}/{key}: {actual[key]!r} != official {value!r}"


# --------------------------------------------------------------------------- golden
@pytest.fixture(scope="module")
def golden(shared_dir):
    d = shared_dir / "data"
    return (load_rows(d / "eval_golden" / "sample_val_preds.jsonl"),
            load_rows(d / "qvhighlights" / "highlight_val_release.jsonl"),
            json.loads((d / "eval_golden" / "sample_val_preds_metrics_raw.json").read_text()))


def test_golden_official_numbers_reproduced(golden):
    submission, gt, expected = golden
    result = json.loads(json.dumps(eval_submission(submission, gt)))
    assert_contains(result, expected)
    assert list(result)[:8] == ["brief", "HL-min-Fair", "HL-min-Good", "HL-min-VeryGood",
                                "full", "long", "middle", "short"]
    # the extras sit beside the official keys and are consistent with them
    brief = result["brief"]
    assert brief["MR-full-R1@0.3"] >= brief["MR-full-R1@0.5"] >= brief["MR-full-R1@0.7"]
    assert 0 < brief["MR-full-mIoU"] < 100
    assert result["extra"]["num_queries"] == 1550
    assert [result["extra"][b]["num_queries"] for b in ("short", "middle", "long", "full")] == \
        [429, 957, 574, 1550]  # what the official script prints for this file


def test_golden_without_extras_is_exactly_official(golden):
    submission, gt, expected = golden
    result = json.loads(json.dumps(eval_submission(submission, gt, extras=False)))
    assert result == expected
    assert list(result) == list(expected)                  # same key order as well
    assert list(result["brief"]) == list(expected["brief"]) == OFFICIAL_BRIEF_KEYS


def test_golden_intersection_of_a_partial_submission(golden):
    submission, gt, _ = golden
    part = submission[:100]
    with pytest.raises(QidMismatchError):
        eval_submission(part, gt)
    on_part = eval_submission(part, gt, match_number=False)
    reference = eval_submission(part, [r for r in gt if r["qid"] in {p["qid"] for p in part}])
    assert on_part == reference
    assert on_part["extra"]["num_queries"] == 100


# --------------------------------------------------------------------------- MR by hand
def mr_case():
    """A (middle), B (long, first listed window misses), C (short)."""
    gt = [
        {"qid": "A", "vid": "a", "duration": 150, "relevant_windows": [[0, 20]]},
        {"qid": "B", "vid": "b", "duration": 150, "relevant_windows": [[0, 40], [60, 100]]},
        {"qid": "C", "vid": "c", "duration": 150, "relevant_windows": [[0, 4]]},
    ]
    sub = [
        {"qid": "A", "pred_relevant_windows": [[0, 20, 0.9], [30, 40, 0.8]]},
        # scores order: miss, exact, IoU 36/40 = 0.9
        {"qid": "B", "pred_relevant_windows": [[110, 130, 0.9], [0, 40, 0.8], [64, 100, 0.7]]},
        # listed first: [0, 2] (IoU 0.5); best score: [0, 4] (exact)
        {"qid": "C", "pred_relevant_windows": [[0, 2, 0.5], [0, 4, 0.9]]},
    ]
    return sub, gt


def test_detection_ap_by_hand():
    sub, gt = mr_case()
    ap = detection_ap([np.array(r["pred_relevant_windows"], float) for r in sub],
                      [np.array(r["relevant_windows"], float) for r in gt])
    np.testing.assert_allclose(ap[0], 1.0)
    # B: FP, TP, TP -> precision 0, 1/2, 2/3 at recall 0, 1/2, 1 -> AP = 2/3 up to IoU 0.9;
    # at 0.95 the third is a FP -> AP = 1/2 * 1/2
    np.testing.assert_allclose(ap[1], [2 / 3] * 9 + [0.25])
    np.testing.assert_allclose(ap[2], 1.0)


def test_moment_retrieval_by_hand():
    sub, gt = mr_case()
    r = eval_submission(sub, gt)
    full = r["full"]
    assert full["MR-mAP"]["0.5"] == round(100 * (1 + 2 / 3 + 1) / 3, 2) == 88.89
    assert full["MR-mAP"]["0.95"] == 75.0
    assert full["MR-mAP"]["average"] == round(100 * (9 * (8 / 3) / 3 + 2.25 / 3) / 10, 2) == 87.5
    # R1 uses the FIRST LISTED window: A IoU 1, B IoU 0, C IoU 0.5
    assert full["MR-R1"]["0.5"] == 66.67 and full["MR-R1"]["0.55"] == 33.33
    assert full["MR-R1"]["0.95"] == 33.33
    assert r["brief"]["MR-full-R1@0.3"] == 66.67
    assert r["brief"]["MR-full-mIoU"] == 50.0
    assert r["short"]["MR-mAP"]["average"] == 100.0 and r["short"]["MR-R1"]["0.5"] == 100.0
    assert r["short"]["MR-R1"]["0.55"] == 0.0
    assert r["middle"]["MR-mAP"]["average"] == 100.0
    assert r["long"]["MR-mAP"]["average"] == 62.5
    assert r["long"]["MR-R1"]["0.5"] == 0.0
    assert [r["extra"][b]["num_queries"] for b in ("short", "middle", "long", "full")] == [1, 1, 1, 3]
    assert "HL-min-Fair" not in r  # no saliency predictions -> no HL, as in the official code
    assert list(r["brief"]) == sorted(r["brief"])


def test_length_bucket_keeps_only_windows_in_range():
    gt = [{"qid": 1, "relevant_windows": [[0, 4], [10, 50]]}]     # one short and one long window
    sub = [{"qid": 1, "pred_relevant_windows": [[10, 50, 0.9], [0, 4, 0.1]]}]
    r = eval_submission(sub, gt)
    # full: both matched -> AP 1; short sees only [0, 4]: FP then TP -> AP 1/2
    assert r["full"]["MR-mAP"]["average"] == 100.0
    assert r["short"]["MR-mAP"]["average"] == 50.0
    assert r["long"]["MR-mAP"]["average"] == 100.0
    assert r["middle"]["MR-mAP"]["average"] is None and r["extra"]["middle"]["num_queries"] == 0
    # R1 in the short bucket compares the first window with the short GT window only
    assert r["short"]["MR-R1"]["0.5"] == 0.0 and r["long"]["MR-R1"]["0.5"] == 100.0


def test_only_first_ten_windows_count_for_map():
    gt = [{"qid": 1, "relevant_windows": [[0, 10]]}]
    windows = [[20 + i, 30 + i, 0.9] for i in range(10)] + [[0, 10, 0.99]]
    r = eval_submission([{"qid": 1, "pred_relevant_windows": windows}], gt)
    assert r["full"]["MR-mAP"]["average"] == 0.0  # the 11th window is cut before sorting
    windows[0] = [0, 10, 0.01]                    # now among the first 10, ranked last
    r = eval_submission([{"qid": 1, "pred_relevant_windows": windows}], gt)
    assert r["full"]["MR-mAP"]["average"] == 10.0  # precision 1/10 at recall 1


def test_empty_prediction_counts_as_miss():
    gt = [{"qid": 1, "relevant_windows": [[0, 10]]}, {"qid": 2, "relevant_windows": [[0, 10]]}]
    sub = [{"qid": 1, "pred_relevant_windows": [[0, 10, 1.0]]}, {"qid": 2, "pred_relevant_windows": []}]
    r = eval_submission(sub, gt)
    assert r["brief"]["MR-full-mAP"] == 50.0 and r["brief"]["MR-full-R1@0.5"] == 50.0


# --------------------------------------------------------------------------- HL by hand
def hl_case():
    gt = [
        {"qid": 1, "duration": 8, "relevant_windows": [[0, 6]], "relevant_clip_ids": [0, 1, 2],
         "saliency_scores": [[4, 2, 0], [2, 2, 2], [0, 3, 4]]},
        {"qid": 2, "duration": 8, "relevant_windows": [[6, 8]], "relevant_clip_ids": [3],
         "saliency_scores": [[4, 4, 4]]},
        {"qid": 3, "duration": 4, "relevant_windows": [[0, 4]], "relevant_clip_ids": [0, 1],
         "saliency_scores": [[2, 2, 2], [2, 2, 2]]},
    ]
    sub = [
        {"qid": 1, "pred_saliency_scores": [0.9, 0.1, 0.5, 0.5]},   # clips 2 and 3 tie
        {"qid": 2, "pred_saliency_scores": [0.2, 0.8]},             # short: padded with 0
        {"qid": 3, "pred_saliency_scores": [0.1, 0.2, 0.9]},        # argmax beyond the video
    ]
    return sub, gt


def test_highlight_by_hand():
    sub, gt = hl_case()
    r = eval_submission(sub, gt)
    assert "full" not in r  # no window predictions -> no MR
    # per annotator AP, worked out in the comments of each level:
    # Fair  q1: a0 [1,1,0,0] -> (1 + 1/2)/2, a1 [1,1,1,0] -> (1 + 3/4 + 3/4)/3, a2 [0,1,1,0] -> 1/2
    #       q2: positive clip 3 ties with clip 2 at the padded score 0 -> 1/4 (x3); q3: all positive -> 1
    fair = (0.75 + 2.5 / 3 + 0.5 + 3 * 0.25 + 3 * 1.0) / 9
    # Good  q1: a0 [1,0,0,0] -> 1, a1 and a2 [0,0,1,0] (tied) -> 1/3; q2: 1/4 (x3); q3: none -> 0
    good = (1 + 2 / 3 + 0.75) / 9
    # VeryGood q1: a0 -> 1, a1 none -> 0, a2 [0,0,1,0] -> 1/3; q2: 1/4 (x3); q3: 0
    very_good = (1 + 1 / 3 + 0.75) / 9
    assert r["HL-min-Fair"]["HL-mAP"] == round(100 * fair, 2) == 64.81
    assert r["HL-min-Good"]["HL-mAP"] == round(100 * good, 2) == 26.85
    assert r["HL-min-VeryGood"]["HL-mAP"] == round(100 * very_good, 2) == 23.15
    # Hit@1: q1 clip 0 is positive for some annotator at every level; q2 picks a zero clip;
    # q3's argmax is outside the video
    for level in ("Fair", "Good", "VeryGood"):
        assert r[f"HL-min-{level}"]["HL-Hit1"] == 33.33
        assert r["brief"][f"HL-min-{level}-Hit1"] == 33.33
    assert list(r["brief"]) == ["HL-min-Fair-mAP", "HL-min-Fair-Hit1", "HL-min-Good-mAP",
                                "HL-min-Good-Hit1", "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1"]


def test_hit1_takes_first_argmax_on_ties():
    gt = [{"qid": 1, "duration": 4, "relevant_windows": [[0, 4]], "relevant_clip_ids": [1],
           "saliency_scores": [[4, 4, 4]]}]
    r = eval_submission([{"qid": 1, "pred_saliency_scores": [0.5, 0.5]}], gt)
    assert r["HL-min-Fair"]["HL-Hit1"] == 0.0                       # argmax -> clip 0
    assert r["HL-min-Fair"]["HL-mAP"] == 50.0                        # one tie group: 1/2
    r = eval_submission([{"qid": 1, "pred_saliency_scores": [0.4, 0.5]}], gt)
    assert r["HL-min-Fair"]["HL-Hit1"] == 100.0 and r["HL-min-Fair"]["HL-mAP"] == 100.0


# --------------------------------------------------------------------------- unlabelled GT
def test_rows_without_windows_are_skipped_and_counted():
    sub, gt = mr_case()
    gt = gt + [{"qid": "D", "vid": "d", "duration": 150}]
    sub = sub + [{"qid": "D", "pred_relevant_windows": [[0, 5, 0.3]]}]
    r = eval_submission(sub, gt)
    assert r["extra"]["num_skipped_no_windows"] == 1 and r["extra"]["full"]["num_queries"] == 3
    assert r["full"] == eval_submission(*mr_case())["full"]


def test_test_split_without_labels_is_explained(shared_dir, tmp_path):
    gt = load_rows(shared_dir / "data" / "qvhighlights" / "highlight_test_release.jsonl")
    sub = write_jsonl(tmp_path / "pred.jsonl",
                      [{"qid": r["qid"], "pred_relevant_windows": [[0, 2, 1.0]]} for r in gt])
    with pytest.raises(DataFormatError, match="test split"):
        evaluate_files(str(sub), str(gt.source))


# --------------------------------------------------------------------------- bad input
def test_missing_gt_qid_names_qid_and_files(tmp_path):
    sub, gt = mr_case()
    sub_path = write_jsonl(tmp_path / "pred.jsonl", sub[:2])
    gt_path = write_jsonl(tmp_path / "gt.jsonl", gt)
    with pytest.raises(QidMismatchError) as e:
        evaluate_files(str(sub_path), str(gt_path))
    msg = str(e.value)
    assert "'C'" in msg and str(sub_path) in msg and f"{gt_path}:3" in msg
    assert "match_number=False" in msg
    r = evaluate_files(str(sub_path), str(gt_path), match_number=False)
    assert r["extra"]["num_queries"] == 2


def test_extra_submitted_qid_names_line(tmp_path):
    sub, gt = mr_case()
    sub_path = write_jsonl(tmp_path / "pred.jsonl", sub + [{"qid": "Z", "pred_relevant_windows": []}])
    with pytest.raises(QidMismatchError) as e:
        evaluate_files(str(sub_path), str(write_jsonl(tmp_path / "gt.jsonl", gt)))
    assert e.value.path == str(sub_path) and e.value.line == 4 and "'Z'" in str(e.value)


def test_missing_field_names_file_line_and_field(tmp_path):
    sub, gt = mr_case()
    del sub[1]["pred_relevant_windows"]
    sub_path = write_jsonl(tmp_path / "pred.jsonl", sub)
    with pytest.raises(DataFormatError) as e:
        evaluate_files(str(sub_path), str(write_jsonl(tmp_path / "gt.jsonl", gt)))
    assert (e.value.path, e.value.line, e.value.field) == (str(sub_path), 2, "pred_relevant_windows")
    assert f"{sub_path}:2" in str(e.value)


def test_malformed_json_line_names_line(tmp_path):
    sub, gt = mr_case()
    sub_path = tmp_path / "pred.jsonl"
    sub_path.write_text(json.dumps(sub[0]) + "\n" + '{"qid": "B", "pred_relevant_windows": [[0, 1,\n')
    with pytest.raises(DataFormatError) as e:
        evaluate_files(str(sub_path), str(write_jsonl(tmp_path / "gt.jsonl", gt)))
    assert e.value.line == 2 and "invalid JSON" in str(e.value)


@pytest.mark.parametrize("row,field", [
    ({"qid": "A", "pred_relevant_windows": [[10, 5, 0.9]]}, "pred_relevant_windows"),   # end < start
    ({"qid": "A", "pred_relevant_windows": [[0, 5]]}, "pred_relevant_windows"),         # no score
    ({"qid": "A", "pred_relevant_windows": [[0, True, 0.5]]}, "pred_relevant_windows"),  # bool
    ({"qid": "A", "pred_relevant_windows": "0 5"}, "pred_relevant_windows"),
    ({"qid": None, "pred_relevant_windows": [[0, 5, 1]]}, "qid"),
])
def test_bad_prediction_rows(row, field):
    _, gt = mr_case()
    sub = JsonlRows([row], source="preds.jsonl", lines=[7])
    with pytest.raises(DataFormatError) as e:
        eval_submission(sub, gt, match_number=False)
    assert (e.value.path, e.value.line, e.value.field) == ("preds.jsonl", 7, field)


def test_bad_ground_truth_rows():
    sub, _ = hl_case()
    gt = [{"qid": 1, "duration": 8, "relevant_windows": [[0, 2]], "relevant_clip_ids": [4],
           "saliency_scores": [[1, 2, 3]]}]                     # clip 4 of a 4-clip video
    with pytest.raises(DataFormatError) as e:
        eval_submission(sub[:1], gt)
    assert e.value.field == "relevant_clip_ids" and e.value.path == "<ground_truth>" and e.value.line == 1
    gt[0].update(relevant_clip_ids=[0, 1])                     # 2 ids, 1 score row
    with pytest.raises(DataFormatError, match="saliency_scores"):
        eval_submission(sub[:1], gt)


def test_duplicate_qid_names_both_lines():
    sub, gt = mr_case()
    with pytest.raises(DataFormatError) as e:
        eval_submission(sub + [sub[0]], gt)
    assert e.value.line == 4 and "first seen on line 1" in str(e.value)


def test_inconsistent_rows_are_rejected():
    sub, gt = mr_case()
    sub[0]["pred_saliency_scores"] = [0.1, 0.2]   # the first row decides HL is evaluated
    with pytest.raises(DataFormatError) as e:
        eval_submission(sub, gt)
    assert e.value.field == "pred_saliency_scores" and e.value.line == 2


# --------------------------------------------------------------------------- R@k / mIoU
def test_r1_miou_by_hand():
    gt = [{"qid": 1, "relevant_windows": [[0, 10]]},
          {"qid": 2, "relevant_windows": [[0, 10], [20, 30]]},
          {"qid": 3, "duration": 30}]                                           # no GT: skipped
    sub = [{"qid": 1, "pred_relevant_windows": [[20, 30], [0, 10]]},           # hit at rank 2
           {"qid": 2, "pred_relevant_windows": [[0, 5, 0.1]]},                 # IoU 0.5 at rank 1
           {"qid": 3, "pred_relevant_windows": [[0, 5, 0.1]]}]
    r = eval_r1_miou(sub, gt)
    assert dict(r["brief"]) == {"R1@0.3": 50.0, "R1@0.5": 50.0, "R1@0.7": 0.0,
                                "R5@0.3": 100.0, "R5@0.5": 100.0, "R5@0.7": 50.0, "mIoU": 25.0}
    assert r["num_queries"] == 2 and r["num_skipped_no_gt"] == 1
    r = eval_r1_miou(sub, gt, thresholds=(0.5,), topk=(2,))
    assert dict(r["brief"]) == {"R2@0.5": 100.0, "mIoU": 25.0}


def test_r1_miou_on_golden_agrees_with_official_r1(golden):
    submission, gt, expected = golden
    r = eval_r1_miou(submission, gt)
    # best-over-GT IoU of the first window is what the official R1 uses
    assert r["brief"]["R1@0.5"] == expected["brief"]["MR-full-R1@0.5"]
    assert r["brief"]["R1@0.7"] == expected["brief"]["MR-full-R1@0.7"]
    assert r["brief"]["R5@0.5"] >= r["brief"]["R1@0.5"]


def test_format_brief_table_aligns_columns():
    table = format_brief_table({"MR-full-mAP": 32.2, "HL-min-VeryGood-Hit1": 55.55, "x": None})
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1            # every row equally wide
    assert lines[2].split() == ["MR-full-mAP", "32.20"] and lines[4].split() == ["x", "n/a"]
