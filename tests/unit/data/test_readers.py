"""Annotation readers on the real files (../shared) and on hand-made bad files."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.data.features import FeatureStore
from lavis_c2f.data.readers import (read_annotations, read_charades_durations_csv, read_charades_sta,
                                    read_qvh_jsonl, read_tacos, write_qvh_jsonl)
from lavis_c2f.data.records import MomentRecord

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


def shared(rel: str) -> Path:
    p = (SHARED / rel).resolve()
    if not p.exists():
        pytest.skip(f"../shared not found: {p}")
    return p


# --------------------------------------------------------------------------- real files


@pytest.mark.parametrize("split,n_q,n_v,has_gt", [("train", 7218, 7100, True), ("val", 1550, 1519, True),
                                                   ("test", 1542, 1529, False)])
def test_qvh_real_counts(split, n_q, n_v, has_gt):
    recs = read_annotations(shared(f"qvhighlights/highlight_{split}_release.jsonl"))
    assert len(recs) == n_q and len({r.vid for r in recs}) == n_v
    assert recs.report.n_read == n_q and recs.report.n_skipped == 0
    assert all(r.has_windows == has_gt for r in recs)
    if has_gt:
        r = recs[0]
        assert len(r.relevant_clip_ids) == len(r.saliency_scores)
        assert all(len(s) == 3 for s in r.saliency_scores)
        assert all(0 <= st < ed <= r.duration for rr in recs for st, ed in rr.relevant_windows)


def test_qvh_val_first_record_values():
    r = read_qvh_jsonl(shared("qvhighlights/highlight_val_release.jsonl"))[0]
    assert r.qid == 2579 and r.vid == "NUsG9BgSes0_210.0_360.0" and r.duration == 150.0
    assert r.query.startswith("A girl and her mother cooked")
    assert r.relevant_clip_ids[0] == 41 and r.saliency_scores[0] == [1.0, 1.0, 2.0]
    assert r.source.endswith("highlight_val_release.jsonl:1")


@pytest.mark.parametrize("split,n_videos,n_queries,n_clamped", [("train", 75, 9790, 43), ("val", 27, 4436, 0),
                                                               ("test", 25, 4001, 5)])
def test_tacos_real_counts(split, n_videos, n_queries, n_clamped):
    path = shared(f"tacos/{split}.json")
    recs = read_annotations(path)
    assert len(recs) == n_queries and len({r.vid for r in recs}) == n_videos
    assert recs.report.n_clamped == n_clamped
    assert [r.qid for r in recs] == list(range(n_queries))
    raw = json.loads(path.read_text())
    vid0 = next(iter(raw))
    meta = raw[vid0]
    r0 = recs[0]
    assert r0.vid == vid0 and r0.query == meta["sentences"][0].strip()
    assert r0.duration == pytest.approx(meta["num_frames"] / meta["fps"])
    assert r0.relevant_windows[0] == pytest.approx((meta["timestamps"][0][0] / meta["fps"],
                                                     meta["timestamps"][0][1] / meta["fps"]))
    assert all(0 <= st < ed <= r.duration for r in recs for st, ed in r.relevant_windows)


def _charades_max_end(path: Path) -> dict:
    ends = defaultdict(float)
    for line in path.read_text().splitlines():
        vid, st, ed = line.split("##")[0].split()
        ends[vid] = max(ends[vid], float(st), float(ed))
    return ends


def test_charades_real_train_reversed_lines():
    path = shared("charades_sta/charades_sta_train.txt")
    durations = {v: e + 1.0 for v, e in _charades_max_end(path).items()}
    with pytest.raises(DataFormatError) as ei:
        read_charades_sta(path, durations)
    assert ei.value.line == 8252 and "charades_sta_train.txt:8252" in str(ei.value)
    swapped = read_charades_sta(path, durations, swap_reversed=True)
    assert len(swapped) == 12408 and swapped.report.n_swapped == 4
    r = swapped[8251]
    assert r.qid == 8251 and r.vid == "LEOL6" and r.relevant_windows == [(7.0, 8.0)]
    skipped = read_charades_sta(path, durations, on_error="skip")
    assert len(skipped) == 12404 and skipped.report.n_skipped == 4
    assert [p.line for p in skipped.report.problems] == [8252, 8440, 9623, 9624]


def test_charades_real_test_counts_and_qids():
    path = shared("charades_sta/charades_sta_test.txt")
    durations = {v: e for v, e in _charades_max_end(path).items()}
    recs = read_annotations(path, durations=durations)
    assert len(recs) == 3720 and len({r.vid for r in recs}) == 1334
    assert [r.qid for r in recs[:3]] == [0, 1, 2]
    assert read_annotations(path, durations=durations, qid_offset=100000)[0].qid == 100000


class _LengthStore(FeatureStore):
    """In-memory store: vid -> zeros (n_clips, 1)."""

    type_name = "memory"

    def __init__(self, lengths):
        super().__init__("memory://lengths")
        self.lengths = lengths

    def _list_keys(self):
        return list(self.lengths)

    def _read_fields(self, key, field):
        if key not in self.lengths:
            raise self._missing(key)
        return {None: np.zeros((self.lengths[key], 1), np.float32)}


def test_charades_feature_durations_clamp():
    """Feature-derived durations (num_clips * clip_length) end before many windows: the
    real data needs clamp=True, and the report counts the clamped windows."""
    path = shared("charades_sta/charades_sta_test.txt")
    ends = _charades_max_end(path)
    store = _LengthStore({v: int(math.floor(e / 2.0)) for v, e in ends.items()})
    with pytest.raises(DataFormatError):
        read_charades_sta(path, store, clip_length=2.0, tolerance=0.0)
    recs = read_charades_sta(path, store, clip_length=2.0, clamp=True, on_error="skip")
    assert len(recs) + recs.report.n_skipped == 3720
    assert all("starts at or after the video end" in str(p) for p in recs.report.problems)
    assert recs.report.n_clamped > 1000
    assert all(0 <= st < ed <= r.duration for r in recs for st, ed in r.relevant_windows)
    assert recs[0].duration == store.lengths[recs[0].vid] * 2.0


# --------------------------------------------------------------------------- bad QVH files

GOOD = {"qid": 1, "query": "a man walks", "duration": 150, "vid": "v1", "relevant_windows": [[0, 10]],
        "relevant_clip_ids": [0, 1, 2, 3, 4], "saliency_scores": [[1, 2, 3]] * 5}


def _write_jsonl(tmp_path: Path, rows, name="ann.jsonl") -> Path:
    p = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    p.write_text("\n".join(lines) + "\n")
    return p


def _bad(**changes):
    row = dict(GOOD, qid=2)
    for k, v in changes.items():
        if v is _DROP:
            row.pop(k)
        else:
            row[k] = v
    return row


_DROP = object()

QVH_BAD_CASES = [
    ("malformed", "{not json", None, "invalid JSON"),
    ("not_object", "[1, 2]", None, "expected a JSON object"),
    ("missing_query", _bad(query=_DROP), "query", "missing field"),
    ("missing_vid", _bad(vid=_DROP), "vid", "missing field"),
    ("wrong_type_duration", _bad(duration="long"), "duration", "positive number"),
    ("wrong_type_qid", _bad(qid=[1]), "qid", "int or str"),
    ("empty_query", _bad(query="   "), "query", "empty query"),
    ("duplicate_qid", dict(GOOD), "qid", "duplicate qid"),
    ("start_after_end", _bad(relevant_windows=[[20, 10]]), "relevant_windows[0]", "start 20 > end 10"),
    ("empty_window", _bad(relevant_windows=[[10, 10]]), "relevant_windows[0]", "empty window"),
    ("window_outside", _bad(relevant_windows=[[140, 160]]), "relevant_windows[0]", "outside [0, duration=150]"),
    ("window_wrong_type", _bad(relevant_windows=[[1, "x"]]), "relevant_windows[0]", "[start, end]"),
    ("windows_not_list", _bad(relevant_windows="0-10"), "relevant_windows", "list"),
    ("saliency_mismatch", _bad(saliency_scores=[[1, 2, 3]]), "saliency_scores", "1 score lists for 5"),
    ("clip_ids_wrong_type", _bad(relevant_clip_ids=["a"]), "relevant_clip_ids", "non-negative ints"),
]


@pytest.mark.parametrize("case,row,field,msg", QVH_BAD_CASES, ids=[c[0] for c in QVH_BAD_CASES])
def test_qvh_bad_input_names_file_line_field(tmp_path, case, row, field, msg):
    p = _write_jsonl(tmp_path, [GOOD, row])
    with pytest.raises(DataFormatError) as ei:
        read_qvh_jsonl(p)
    e = ei.value
    assert e.path == str(p) and e.line == 2 and e.field == field
    assert msg in str(e) and f"{p}:2" in str(e)
    # skip mode: the bad line is dropped, counted and kept in the report
    recs = read_qvh_jsonl(p, on_error="skip")
    assert [r.qid for r in recs] == [1]
    assert recs.report.n_read == 1 and recs.report.n_skipped == 1
    assert recs.report.problems[0].line == 2


def test_qvh_missing_file(tmp_path):
    with pytest.raises(DataFormatError) as ei:
        read_qvh_jsonl(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(ei.value) and "not found" in str(ei.value)
    with pytest.raises(DataFormatError):
        read_qvh_jsonl(tmp_path / "nope.jsonl", on_error="skip")


def test_qvh_tolerance_and_clamp(tmp_path):
    p = _write_jsonl(tmp_path, [_bad(qid=1, relevant_windows=[[140, 150.5]]),
                                _bad(qid=2, relevant_windows=[[-0.4, 10]])])
    recs = read_qvh_jsonl(p)
    assert recs[0].relevant_windows == [(140.0, 150.0)] and recs[1].relevant_windows == [(0.0, 10.0)]
    assert recs.report.n_clamped == 2
    far = _write_jsonl(tmp_path, [_bad(qid=1, relevant_windows=[[140, 170]])], "far.jsonl")
    with pytest.raises(DataFormatError):
        read_qvh_jsonl(far)
    assert read_qvh_jsonl(far, clamp=True)[0].relevant_windows == [(140.0, 150.0)]
    after_end = _write_jsonl(tmp_path, [_bad(qid=1, relevant_windows=[[155, 170]])], "after.jsonl")
    with pytest.raises(DataFormatError, match="starts at or after the video end"):
        read_qvh_jsonl(after_end, clamp=True)


def test_qvh_require_windows_and_test_split(tmp_path):
    row = {"qid": 5, "query": "q", "duration": 30, "vid": "v"}
    p = _write_jsonl(tmp_path, [row])
    recs = read_qvh_jsonl(p)
    assert recs[0].relevant_windows == [] and not recs[0].has_windows and recs[0].relevant_clip_ids is None
    with pytest.raises(DataFormatError) as ei:
        read_qvh_jsonl(p, require_windows=True)
    assert ei.value.field == "relevant_windows" and ei.value.line == 1


def test_write_qvh_jsonl_roundtrip(tmp_path):
    recs = read_qvh_jsonl(_write_jsonl(tmp_path, [GOOD, {"qid": "x7", "query": "q", "duration": 30.5,
                                                           "vid": "v2", "extra_key": 3}]))
    out = tmp_path / "sub" / "out.jsonl"
    write_qvh_jsonl(recs, out)
    back = read_qvh_jsonl(out)
    assert [(r.qid, r.vid, r.relevant_windows, r.saliency_scores, r.extra) for r in back] == \
        [(r.qid, r.vid, r.relevant_windows, r.saliency_scores, r.extra) for r in recs]
    assert back[1].extra == {"extra_key": 3}
    assert not list(out.parent.glob(".*.tmp"))


# --------------------------------------------------------------------------- bad Charades / TACoS


CHARADES_BAD = [
    ("no_hash", "AAAAA 1.0 2.0 a person sits", None, "malformed line"),
    ("two_fields", "AAAAA 1.0##a person sits", None, "malformed line"),
    ("bad_number", "AAAAA one 2.0##a person sits", "relevant_windows", "not numbers"),
    ("empty_query", "AAAAA 1.0 2.0##   ", "query", "empty query"),
    ("unknown_vid", "ZZZZZ 1.0 2.0##a person sits", "vid", "no duration for video 'ZZZZZ'"),
    ("reversed", "AAAAA 3.0 2.0##a person sits", "relevant_windows[0]", "start 3 > end 2"),
    ("outside", "AAAAA 1.0 40.0##a person sits", "relevant_windows[0]", "outside"),
]


@pytest.mark.parametrize("case,line,field,msg", CHARADES_BAD, ids=[c[0] for c in CHARADES_BAD])
def test_charades_bad_lines(tmp_path, case, line, field, msg):
    p = tmp_path / "cha.txt"
    p.write_text("AAAAA 0.0 5.5##a person opens a door.\n" + line + "\n")
    with pytest.raises(DataFormatError) as ei:
        read_charades_sta(p, {"AAAAA": 30.0})
    assert ei.value.line == 2 and ei.value.field == field and msg in str(ei.value)
    assert f"{p}:2" in str(ei.value)
    recs = read_charades_sta(p, {"AAAAA": 30.0}, on_error="skip")
    assert len(recs) == 1 and recs.report.n_skipped == 1 and recs[0].qid == 0


def test_charades_durations_csv(tmp_path):
    csv_path = tmp_path / "Charades_v1_test.csv"
    csv_path.write_text("id,subject,scene,length\nAAAAA,s1,Kitchen,30.25\nBBBBB,s2,Hall,12\n")
    assert read_charades_durations_csv(csv_path) == {"AAAAA": 30.25, "BBBBB": 12.0}
    ann = tmp_path / "cha.txt"
    ann.write_text("AAAAA 0.0 5.5##a person opens a door.\n\nBBBBB 1 3##someone laughs\n")
    recs = read_annotations(ann, durations=str(csv_path))
    assert [(r.qid, r.vid, r.duration) for r in recs] == [(0, "AAAAA", 30.25), (2, "BBBBB", 12.0)]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,len\nAAAAA,3\n")
    with pytest.raises(DataFormatError) as ei:
        read_charades_durations_csv(bad)
    assert ei.value.field == "length" and ei.value.line == 1
    bad.write_text("id,length\nAAAAA,abc\n")
    with pytest.raises(DataFormatError) as ei:
        read_charades_durations_csv(bad)
    assert ei.value.line == 2


def _tacos(tmp_path: Path, video_meta) -> Path:
    p = tmp_path / "tacos.json"
    p.write_text(json.dumps({"s1-d1.avi": {"timestamps": [[0, 30]], "sentences": ["He takes a pan"],
                                           "fps": 30.0, "num_frames": 300}, "s2-d2.avi": video_meta}))
    return p


TACOS_BAD = [
    ("missing_fps", {"timestamps": [[0, 30]], "sentences": ["x"], "num_frames": 300}, "s2-d2.avi.fps"),
    ("bad_fps", {"timestamps": [[0, 30]], "sentences": ["x"], "fps": 0, "num_frames": 300}, "s2-d2.avi.fps"),
    ("length_mismatch", {"timestamps": [[0, 30], [3, 9]], "sentences": ["x"], "fps": 30.0, "num_frames": 300},
     "s2-d2.avi.sentences"),
    ("reversed", {"timestamps": [[60, 30]], "sentences": ["x"], "fps": 30.0, "num_frames": 300},
     "s2-d2.avi.timestamps[0]"),
    ("bad_stamp", {"timestamps": [[60]], "sentences": ["x"], "fps": 30.0, "num_frames": 300},
     "s2-d2.avi.timestamps[0]"),
    ("empty_sentence", {"timestamps": [[0, 30]], "sentences": [" "], "fps": 30.0, "num_frames": 300},
     "s2-d2.avi.sentences[0]"),
]


@pytest.mark.parametrize("case,meta,field", TACOS_BAD, ids=[c[0] for c in TACOS_BAD])
def test_tacos_bad_input(tmp_path, case, meta, field):
    p = _tacos(tmp_path, meta)
    with pytest.raises(DataFormatError) as ei:
        read_tacos(p)
    assert ei.value.path == str(p) and ei.value.field == field
    recs = read_tacos(p, on_error="skip")
    assert [r.qid for r in recs] == [0] and recs.report.n_skipped == 1


def test_tacos_seconds_and_strip(tmp_path):
    p = _tacos(tmp_path, {"timestamps": [[30, 90], [150, 305]], "sentences": ["a", "b"], "fps": 30.0,
                          "num_frames": 300})
    recs = read_tacos(p, strip_video_ext=True, qid_offset=10)
    assert [(r.qid, r.vid) for r in recs] == [(10, "s1-d1"), (11, "s2-d2"), (12, "s2-d2")]
    assert recs[1].relevant_windows == [(1.0, 3.0)] and recs[2].relevant_windows == [(5.0, 10.0)]
    assert recs[2].duration == 10.0 and recs.report.n_clamped == 1


def test_tacos_invalid_json_names_line(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('{\n "a": {\n oops\n}')
    with pytest.raises(DataFormatError) as ei:
        read_tacos(p)
    assert ei.value.line == 3


def test_read_annotations_dispatch(tmp_path):
    with pytest.raises(DataFormatError, match="cannot tell the annotation format"):
        read_annotations(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="did you mean 'tacos'"):
        read_annotations(tmp_path / "x.json", fmt="taco")
    with pytest.raises(TypeError, match="durations"):
        read_annotations(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="on_error"):
        read_qvh_jsonl(_write_jsonl(tmp_path, [GOOD]), on_error="ignore")
    assert isinstance(read_annotations(_write_jsonl(tmp_path, [GOOD]))[0], MomentRecord)
