"""merge-stage1: output format, top-K, validation errors with file:line, atomic output, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.pipeline.merge import merge_stage1, read_stage1_ranks, read_video_list, stage1_lists

ANN = [
    {"qid": 1, "query": "a man opens a door", "duration": 30, "vid": "v1", "relevant_windows": [[2, 6]],
     "relevant_clip_ids": [1, 2], "saliency_scores": [[1, 2, 3], [2, 2, 2]], "custom": "kept"},
    {"qid": 2, "query": "a dog runs", "duration": 40, "vid": "v2", "relevant_windows": [[0, 4]]},
    {"qid": 3, "query": "a cat sleeps", "duration": 20, "vid": "v3"},
]
RANKS = [
    {"qid": 2, "query": "a dog runs", "ranked_vids": [["v1", 0.9], ["v2", 0.8], ["v3", 0.1]]},
    {"qid": 1, "query": "a man opens a door", "ranked_vids": [["v1", 0.7], ["v3", 0.5], ["v2", -0.2]]},
    {"qid": 3, "query": "a cat sleeps", "ranked_vids": [["v2", 0.3], ["v1", 0.2], ["v3", 0.1]]},
]


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def files(tmp_path):
    return _write(tmp_path / "ann.jsonl", ANN), _write(tmp_path / "ranks.jsonl", RANKS), tmp_path


def test_merge_keeps_rows_and_adds_top_k(files):
    ann, ranks, tmp = files
    out = tmp / "out" / "merged.jsonl"
    s = merge_stage1(ranks, ann, 2, str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["qid"] for r in rows] == [1, 2, 3]                      # annotation order
    for r, a in zip(rows, ANN):
        assert {k: v for k, v in r.items() if k != "stage1_result"} == a   # every key kept as is
    assert rows[0]["stage1_result"] == [["v1", 0.7], ["v3", 0.5]]
    assert rows[1]["stage1_result"] == [["v1", 0.9], ["v2", 0.8]]
    assert s["num_queries"] == 3 and s["top_k"] == 2
    assert s["gt_in_top_k"] == pytest.approx(200 / 3, abs=0.01)         # q1, q2 (q3's v3 is 3rd)
    # the merged file is a valid stage-2 annotation file whose records carry the lists
    from lavis_c2f.data.readers import read_annotations

    recs = read_annotations(str(out), fmt="qvh")
    assert stage1_lists(recs, None) == [r["stage1_result"] for r in rows]
    assert stage1_lists(recs, ranks, top_k=1)[2] == [["v2", 0.3]]      # a ranks file wins


def test_unknown_qid_names_stage1_file_and_line(files):
    ann, _, tmp = files
    bad = _write(tmp / "bad.jsonl", RANKS + [{"qid": 99, "ranked_vids": [["v1", 0.1]]}])
    with pytest.raises(DataFormatError) as e:
        merge_stage1(bad, ann, 2, str(tmp / "o.jsonl"))
    assert f"{bad}:4" in str(e.value) and "field 'qid'" in str(e.value) and "99" in str(e.value)
    assert not (tmp / "o.jsonl").exists()


def test_query_without_stage1_row(files):
    ann, _, tmp = files
    partial = _write(tmp / "partial.jsonl", RANKS[:2])
    with pytest.raises(DataFormatError) as e:
        merge_stage1(partial, ann, 2, str(tmp / "o.jsonl"))
    assert f"{ann}:3" in str(e.value) and "qid 3" in str(e.value)
    s = merge_stage1(partial, ann, 2, str(tmp / "o.jsonl"), allow_missing=True)
    assert s["num_missing"] == 1
    assert json.loads((tmp / "o.jsonl").read_text().splitlines()[2])["stage1_result"] == []


def test_missing_video_and_corpus_list(files):
    ann, _, tmp = files
    rows = [dict(r) for r in RANKS]
    rows[1] = {"qid": 1, "ranked_vids": [["v1", 0.7], ["v9", 0.5]]}
    ranks = _write(tmp / "r.jsonl", rows)
    with pytest.raises(DataFormatError) as e:
        merge_stage1(ranks, ann, 2, str(tmp / "o.jsonl"))
    assert f"{ranks}:2" in str(e.value) and "ranked_vids[1]" in str(e.value) and "v9" in str(e.value)
    # only the kept top-K are checked
    merge_stage1(ranks, ann, 1, str(tmp / "o.jsonl"))
    # a corpus list makes the video known
    (tmp / "vids.txt").write_text("v9\nv10\n")
    merge_stage1(ranks, ann, 2, str(tmp / "o.jsonl"), videos=read_video_list(str(tmp / "vids.txt")))
    (tmp / "vids.json").write_text(json.dumps({"vids": ["v9"]}))
    assert read_video_list(str(tmp / "vids.json")) == {"v9"}


@pytest.mark.parametrize("row,field", [
    ({"qid": 1, "ranked_vids": [["v1", "high"]]}, "ranked_vids[0]"),
    ({"qid": 1, "ranked_vids": [["v1"]]}, "ranked_vids[0]"),
    ({"qid": 1, "ranked_vids": [[3, 0.5]]}, "ranked_vids[0]"),
    ({"qid": 1, "ranked_vids": [["v1", float("nan")]]}, "ranked_vids[0]"),
    ({"qid": 1, "ranked_vids": {"v1": 0.5}}, "ranked_vids"),
    ({"qid": 1, "ranked_vids": [["v1", 0.5], ["v2", 0.4], ["v1", 0.3]]}, "ranked_vids[2]"),
    ({"qid": 1}, "ranked_vids"),
    ({"ranked_vids": []}, "qid"),
    ({"qid": [1], "ranked_vids": []}, "qid"),
])
def test_bad_stage1_rows(tmp_path, row, field):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"qid": 0, "ranked_vids": []}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataFormatError) as e:
        read_stage1_ranks(str(path))
    assert f"{path}:2" in str(e.value) and f"field '{field}'" in str(e.value)


def test_duplicate_and_empty_stage1(tmp_path):
    path = _write(tmp_path / "d.jsonl", [RANKS[0], RANKS[0]])
    with pytest.raises(DataFormatError, match=r"d\.jsonl:2.*duplicate qid 2 \(first on line 1\)"):
        read_stage1_ranks(path)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match="empty"):
        read_stage1_ranks(str(tmp_path / "e.jsonl"))
    (tmp_path / "j.jsonl").write_text('{"qid": 1, "ranked_vids": [\n')
    with pytest.raises(DataFormatError, match=r"j\.jsonl:1"):
        read_stage1_ranks(str(tmp_path / "j.jsonl"))


def test_bad_annotations_and_top_k(files):
    ann, ranks, tmp = files
    with pytest.raises(ConfigError, match="top-k"):
        merge_stage1(ranks, ann, 0, str(tmp / "o.jsonl"))
    bad_ann = tmp / "bad_ann.jsonl"
    bad_ann.write_text(json.dumps(ANN[0]) + "\n" + json.dumps({"qid": 2, "query": "x", "vid": "v2"}) + "\n")
    with pytest.raises(DataFormatError) as e:
        merge_stage1(ranks, str(bad_ann), 2, str(tmp / "o.jsonl"))
    assert f"{bad_ann}:2" in str(e.value) and "duration" in str(e.value)
    with pytest.raises(DataFormatError, match="not found"):
        merge_stage1(ranks, str(tmp / "nope.jsonl"), 2, str(tmp / "o.jsonl"))


def test_stage1_lists_needs_a_source(files):
    from lavis_c2f.data.readers import read_annotations

    ann, _, _ = files
    with pytest.raises(ConfigError, match="merge-stage1"):
        stage1_lists(read_annotations(ann, fmt="qvh"), None)


def test_cli_exit_codes(files, capsys):
    from lavis_c2f.cli import main

    ann, ranks, tmp = files
    out = tmp / "cli.jsonl"
    assert main(["merge-stage1", "--stage1", ranks, "--ann", ann, "--top-k", "3", "--out", str(out)]) == 0
    assert "3 queries" in capsys.readouterr().out and out.is_file()
    bad = _write(tmp / "bad.jsonl", [{"qid": 7, "ranked_vids": []}])
    assert main(["merge-stage1", "--stage1", bad, "--ann", ann, "--top-k", "3", "--out", str(tmp / "x.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "merge-stage1: error" in err and f"{bad}:1" in err
