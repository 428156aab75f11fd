"""MSR-VTT annotation files (the CLIP4Clip / T-MASS release format) against golden records."""
import json
from pathlib import Path

import pytest

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.data.msrvtt import MSRVTTCaptions, read_msrvtt_test, read_msrvtt_train, read_msrvtt_video_list

GOLDEN = Path(__file__).parent / "golden" / "msrvtt"


def _rows(records, split):
    return [{"split": split, "qid": r.qid, "query": r.query, "vid": r.vid, "duration": round(r.duration, 6)}
            for r in records]


def test_train_and_test_records_match_the_golden_file():
    want = [json.loads(line) for line in (GOLDEN / "expected_records.jsonl").read_text().splitlines()]
    train = read_msrvtt_train(GOLDEN / "MSRVTT_train.9k.csv", GOLDEN / "MSRVTT_data.json")
    test = read_msrvtt_test(GOLDEN / "MSRVTT_JSFUSION_test.csv", GOLDEN / "MSRVTT_data.json")
    assert _rows(train, "train") + _rows(test, "test") == want
    assert train.report.n_read == 7 and test.report.n_read == 3
    assert test[1].extra == {"vid_key": "msr9771"}
    # the csv lists video2 twice: kept once, at its first position
    assert read_msrvtt_video_list(GOLDEN / "MSRVTT_train.9k.csv") == ["video2", "video0", "video1"]
    assert [r.duration for r in read_msrvtt_test(GOLDEN / "MSRVTT_JSFUSION_test.csv")] == [0.0, 0.0, 0.0]


def test_bad_files_name_file_line_and_field(tmp_path):
    with pytest.raises(DataFormatError, match="file not found"):
        read_msrvtt_test(tmp_path / "missing.csv")
    bad = tmp_path / "test.csv"
    bad.write_text("key,video_id,sentence\nret0,video1,a\n")
    with pytest.raises(DataFormatError, match=r"test.csv:1: missing column\(s\) \['vid_key'\]"):
        read_msrvtt_test(bad)
    bad.write_text("key,vid_key,video_id,sentence\nret0,m,video1,hello\nret0,m,video2,again\n")
    with pytest.raises(DataFormatError, match=r"test.csv:3, field 'key': duplicate key 'ret0'"):
        read_msrvtt_test(bad)
    bad.write_text("key,vid_key,video_id,sentence\nret0,m,video1,  \n")
    with pytest.raises(DataFormatError, match=r"test.csv:2, field 'sentence': empty sentence"):
        read_msrvtt_test(bad)
    split = tmp_path / "train.csv"
    split.write_text("video_id\nvideo0\nvideo7\n")
    with pytest.raises(DataFormatError, match=r"train.csv:3, field 'video_id': video 'video7' has no caption"):
        read_msrvtt_train(split, GOLDEN / "MSRVTT_data.json")
    js = tmp_path / "data.json"
    js.write_text('{"sentences": [{"caption": "x", "video_id": "v", "sen_id": 1}, {"caption": "y", "video_id": "v"}]}')
    with pytest.raises(DataFormatError, match=r"field 'sentences\[1\].sen_id': missing"):
        MSRVTTCaptions(js)
    js.write_text("{oops")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        MSRVTTCaptions(js)
