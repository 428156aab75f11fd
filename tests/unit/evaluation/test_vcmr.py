"""Video-corpus moment retrieval recall: hits, misses, wrong video, empty GT, bad rows."""
from __future__ import annotations

import json

import pytest

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.evaluation._rows import JsonlRows, QidMismatchError
from lavis_c2f.evaluation.vcmr import eval_vcmr, evaluate_files

GT = [
    {"qid": 1, "vid": "a", "relevant_windows": [[0, 10]]},
    {"qid": 2, "vid": "b", "relevant_windows": [[10, 20]]},
    {"qid": 3, "vid": "c"},                                        # no GT: skipped
    {"qid": 4, "vid": "d", "relevant_windows": [[0, 10], [50, 60]]},
]
SUB = [
    # rank 1 wrong video, rank 2 IoU 0.6, rank 3 exact
    {"qid": 1, "pred_moments": [["x", 0, 10, 0.9], ["a", 0, 6, 0.8], ["a", 0, 10, 0.7]]},
    # right window in the wrong video
    {"qid": 2, "pred_moments": [["a", 10, 20, 0.9]]},
    {"qid": 3, "pred_moments": [["c", 0, 5, 0.9]]},
    # second GT window matched at rank 1
    {"qid": 4, "pred_moments": [["d", 52, 60, 0.9]]},
]


def test_vcmr_by_hand():
    r = eval_vcmr(SUB, GT, ks=(1, 2, 5), iou_thresholds=(0.5, 0.7))
    assert dict(r["brief"]) == {
        # q4 hits at rank 1 for both thresholds (IoU 0.8); q1 at rank 2 (0.5) / rank 3 (0.7)
        "VCMR-R@1-IoU@0.5": round(100 / 3, 2), "VCMR-R@2-IoU@0.5": round(200 / 3, 2),
        "VCMR-R@5-IoU@0.5": round(200 / 3, 2),
        "VCMR-R@1-IoU@0.7": round(100 / 3, 2), "VCMR-R@2-IoU@0.7": round(100 / 3, 2),
        "VCMR-R@5-IoU@0.7": round(200 / 3, 2),
        "VR-R@1": round(100 / 3, 2), "VR-R@2": round(200 / 3, 2), "VR-R@5": round(200 / 3, 2)}
    assert r["num_queries"] == 3 and r["num_skipped_no_gt"] == 1


def test_vcmr_default_keys():
    r = eval_vcmr(SUB, GT)
    assert list(r["brief"])[:8] == [f"VCMR-R@{k}-IoU@{t}" for t in ("0.5", "0.7") for k in (1, 5, 10, 100)]


def test_only_top_k_entries_are_read():
    sub = [dict(SUB[0], pred_moments=SUB[0]["pred_moments"] + [["a", "bad"]])] + SUB[1:]
    assert eval_vcmr(sub, GT, ks=(1, 3))["brief"]["VCMR-R@3-IoU@0.7"] == round(200 / 3, 2)
    with pytest.raises(DataFormatError) as e:
        eval_vcmr(sub, GT, ks=(1, 4))
    assert e.value.field == "pred_moments" and e.value.line == 1


def test_qid_mismatch_and_intersection():
    with pytest.raises(QidMismatchError, match="qid 4"):
        eval_vcmr(SUB[:3], GT)
    r = eval_vcmr(SUB[:3], GT, ks=(5,), match_number=False)
    assert r["num_queries"] == 2 and r["brief"]["VCMR-R@5-IoU@0.5"] == 50.0


@pytest.mark.parametrize("moment", [["a", 10, 5, 0.1], ["a", 0], [None, 0, 5, 0.1], ["a", 0, 5, "hi"]])
def test_bad_moments_name_file_and_line(moment):
    sub = JsonlRows([SUB[0], {"qid": 2, "pred_moments": [moment]}], source="m.jsonl", lines=[1, 2])
    with pytest.raises(DataFormatError) as e:
        eval_vcmr(sub, GT, match_number=False)
    assert (e.value.path, e.value.line, e.value.field) == ("m.jsonl", 2, "pred_moments")


def test_gt_without_vid_is_rejected():
    gt = [{"qid": 1, "relevant_windows": [[0, 10]]}]
    with pytest.raises(DataFormatError) as e:
        eval_vcmr(SUB[:1], gt)
    assert e.value.field == "vid"


def test_evaluate_files(tmp_path):
    sub_path, gt_path = tmp_path / "moments.jsonl", tmp_path / "gt.jsonl"
    sub_path.write_text("".join(json.dumps(r) + "\n" for r in SUB))
    gt_path.write_text("".join(json.dumps(r) + "\n" for r in GT))
    assert evaluate_files(sub_path, gt_path) == eval_vcmr(SUB, GT)
