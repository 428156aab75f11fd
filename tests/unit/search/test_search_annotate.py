"""``lavis-c2f annotate``: sentence splitting, pseudo-annotator saliency, window merging, captions
errors, and the command end to end on generated clips (zero-shot and with a tiny grounder)."""
import json

import pytest

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.common.io import read_jsonl
from lavis_c2f.data.readers import read_annotations
from lavis_c2f.search.annotate import (clip_ids_of, merge_windows, pseudo_annotator_scores, read_caption_rows,
                                       split_sentences)


def test_split_sentences():
    assert split_sentences("A man opens the door. He walks in!  Then? he sits\ndown") == [
        "A man opens the door.", "He walks in!", "Then?", "he sits", "down"]
    assert split_sentences("  ...  \n 42. ") == []
    assert split_sentences("version 2.5 is out") == ["version 2.5 is out"]


def test_pseudo_annotators_floor_round_ceil_of_the_normalised_saliency():
    sal = [0.0, 0.25, 0.5, 0.6, 1.0]  # u = sal; 4u = 0, 1, 2, 2.4, 4
    assert pseudo_annotator_scores(sal, [0, 1, 2, 3, 4]) == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [2, 2, 3], [4, 4, 4]]
    # affine changes of the curve do not matter; a flat curve is 0.5 everywhere
    assert pseudo_annotator_scores([10 * s - 3 for s in sal], [3]) == [[2, 2, 3]]
    assert pseudo_annotator_scores([0.7, 0.7], [0, 1]) == [[2, 2, 2], [2, 2, 2]]
    assert pseudo_annotator_scores([0.0, 0.375, 1.0], [1]) == [[1, 2, 2]]  # 4u = 1.5
    with pytest.raises(ValueError):
        pseudo_annotator_scores([], [])


def test_merge_windows_and_clip_ids():
    assert merge_windows([[10, 20, 0.5], [0, 4, 0.9], [18, 24, 0.7], [24, 26, 0.1]]) == [
        [0.0, 4.0, 0.9], [10.0, 24.0, 0.7], [24.0, 26.0, 0.1]]
    assert clip_ids_of([[0.0, 4.0], [10.0, 14.0]], 2.0, 10) == [0, 1, 5, 6]
    assert clip_ids_of([[4.2, 4.6]], 2.0, 10) == [2]  # shorter than a clip: the clip of its middle
    assert clip_ids_of([[17.0, 25.0]], 2.0, 10) == [8, 9]  # clipped to the video's clips


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_caption_rows_match_videos_by_id_name_or_path(video_dir, tmp_path):
    caps = _write(tmp_path / "c.jsonl", [{"vid": "gray", "caption": "a"}, {"video": "redblue.mp4", "caption": "b"},
                                         {"video": "./pattern", "caption": "c"}, ""])
    rows, skipped = read_caption_rows(str(caps), str(video_dir))
    assert [(r.line, r.vid) for r in rows] == [(1, "gray"), (2, "redblue"), (3, "pattern")] and skipped == 0


@pytest.mark.parametrize("row, match", [
    ("{not json", r"c.jsonl:1: invalid JSON"),
    ('["a list"]', r"c.jsonl:1: expected a JSON object"),
    ({"vid": "gray"}, r"c.jsonl:1, field 'caption': missing or empty"),
    ({"vid": "gray", "caption": "  "}, r"c.jsonl:1, field 'caption'"),
    ({"caption": "x"}, r"c.jsonl:1, field 'vid': missing 'vid' \(or 'video'\)"),
    ({"vid": 3, "caption": "x"}, r"c.jsonl:1, field 'vid': 'vid' must be a non-empty string"),
    ({"video": "missing.mp4", "caption": "x"}, r"c.jsonl:1, field 'video': no video 'missing.mp4' .*video ids: gray"),
])
def test_bad_caption_lines_name_file_line_and_field(video_dir, tmp_path, row, match):
    caps = _write(tmp_path / "c.jsonl", [row])
    with pytest.raises(DataFormatError, match=match):
        read_caption_rows(str(caps), str(video_dir))


def test_missing_videos_can_be_skipped(video_dir, tmp_path):
    caps = _write(tmp_path / "c.jsonl", [{"vid": "nope", "caption": "x"}, {"vid": "gray", "caption": "y"}])
    rows, skipped = read_caption_rows(str(caps), str(video_dir), skip_missing=True)
    assert [r.vid for r in rows] == ["gray"] and skipped == 1


def _check_qvh(out_path, want_qids):
    rows = read_jsonl(out_path)
    recs = read_annotations(str(out_path), fmt="qvh")  # the package's own reader accepts the file
    assert [r["qid"] for r in rows] == want_qids and len(recs) == len(rows)
    for r in rows:
        assert set(r) >= {"qid", "query", "vid", "duration", "relevant_windows", "relevant_clip_ids",
                          "saliency_scores", "confidence", "window_scores", "caption_line", "mode"}
        assert len(r["saliency_scores"]) == len(r["relevant_clip_ids"]) and r["relevant_clip_ids"]
        assert all(len(s) == 3 and all(0 <= x <= 4 for x in s) and max(s) - min(s) <= 1 for s in r["saliency_scores"])
        ws = r["relevant_windows"]
        assert all(0 <= a < b <= r["duration"] + 1e-6 for a, b in ws)
        assert all(ws[i][1] <= ws[i + 1][0] for i in range(len(ws) - 1))  # no overlap
        assert r["confidence"] == max(r["window_scores"]) and len(r["window_scores"]) == len(ws)
    return rows


def test_annotate_end_to_end_zero_shot(cli, video_dir, tmp_path):
    caps = _write(tmp_path / "captions.jsonl", [
        {"vid": "redblue", "caption": "The screen is red. Then it turns blue."},
        {"video": "pattern.mp4", "caption": "A colourful test pattern with a moving counter!"},
        {"vid": "gray", "caption": "Nothing happens."}])
    out = tmp_path / "ann.jsonl"
    summary = tmp_path / "summary.json"
    code, stdout, err = cli("annotate", video_dir, "--captions", caps, "--out", out, "--backbone", "random",
                            "--min-score", "0.2", "--max-windows", "2", "--qid-start", "1000",
                            "--summary-json", summary)
    assert code == 0, err
    s = json.loads(summary.read_text())
    assert s["captions"] == 3 and s["sentences"] == 4 and s["videos"] == 3
    assert s["kept"] + s["dropped_low_score"] == 4 and s["kept"] >= 1
    rows = _check_qvh(out, list(range(1000, 1000 + s["kept"])))
    assert all(r["mode"] == "zero-shot" for r in rows) and all(r["confidence"] >= 0.2 for r in rows)
    assert {r["caption_line"] for r in rows} <= {1, 2, 3}
    assert "mode: stage 2: ZERO-SHOT" in stdout and f"kept {s['kept']}" in stdout and f"wrote {s['kept']}" in stdout
    # the threshold filters: with 1.0 only perfect-contrast windows could stay; no annotation -> exit code 1
    code, stdout, _ = cli("annotate", video_dir, "--captions", caps, "--out", out, "--backbone", "random",
                          "--min-score", "1.0", "--summary-json", summary)
    strict = json.loads(summary.read_text())
    assert strict["kept"] < s["kept"] and len(read_jsonl(out)) == strict["kept"]
    assert (code == 1) == (strict["kept"] == 0) and all(r["confidence"] >= 1.0 for r in read_jsonl(out))


def test_annotate_with_a_trained_grounder(cli, video_dir, ckpts, tmp_path):
    caps = _write(tmp_path / "captions.jsonl", [{"vid": "pattern", "caption": "A test pattern. A counter."}])
    out = tmp_path / "ann.jsonl"
    code, stdout, err = cli("annotate", video_dir, "--captions", caps, "--out", out, "--backbone", "random",
                            "--grounder-ckpt", ckpts["grounder"], "--min-score", "0.0", "--max-windows", "3")
    assert code == 0, err
    rows = _check_qvh(out, [0, 1])
    assert all(r["mode"] == "trained" for r in rows) and "trained c2f_qd_detr" in stdout


def test_annotate_errors(cli, video_dir, tmp_path):
    caps = _write(tmp_path / "bad.jsonl", [{"vid": "gray", "caption": "ok"}, {"vid": "ghost", "caption": "x"}])
    code, _, err = cli("annotate", video_dir, "--captions", caps, "--out", tmp_path / "o.jsonl", "--backbone", "random")
    assert code == 1 and "bad.jsonl:2, field 'vid': no video 'ghost'" in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()
    code, _, err = cli("annotate", tmp_path / "none", "--captions", caps, "--out", tmp_path / "o.jsonl",
                       "--backbone", "random")
    assert code == 1 and "video folder not found" in err
    code, _, err = cli("annotate", video_dir, "--captions", caps, "--out", tmp_path / "o.jsonl", "--backbone",
                       "random", "--min-score", "2")
    assert code == 1 and "min_score must be in [0, 1]" in err


def test_undecodable_videos_are_reported_and_their_sentences_dropped(cli, video_dir, tmp_path):
    import shutil

    d = tmp_path / "vids"
    shutil.copytree(video_dir, d)
    (d / "broken.mp4").write_text("not a video\n" * 10)
    caps = _write(tmp_path / "c.jsonl", [{"vid": "broken", "caption": "One. Two."},
                                         {"vid": "gray", "caption": "A gray screen."}])
    out = tmp_path / "ann.jsonl"
    code, stdout, err = cli("annotate", d, "--captions", caps, "--out", out, "--backbone", "random",
                            "--min-score", "0", "--summary-json", tmp_path / "s.json")
    s = json.loads((tmp_path / "s.json").read_text())
    assert code == 0, err
    assert s["dropped_video_failed"] == 2 and "broken" in s["videos_failed"] and s["kept"] == 1
    assert "failed: broken:" in stdout
