import pytest

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.models.refiner.srt import Caption, load_captions, merge_repeats, parse_srt, parse_time_line

GOOD = """1
00:00:01,500 --> 00:00:03,000
Hello <i>there</i>
second line

2
00:01:02.25 --> 00:01:04,000 X1:10 X2:20
{\\an8}so we start

3
01:00:00,000 --> 01:00:01,000
late
"""


def test_parse_valid_file():
    out = parse_srt(GOOD)
    assert out.n_skipped == 0
    assert out.captions == [Caption(1.5, 3.0, "Hello there second line"),
                            Caption(62.25, 64.0, "so we start"),
                            Caption(3600.0, 3601.0, "late")]


def test_bom_crlf_missing_index_and_sorting():
    text = "\ufeff00:00:05,000 --> 00:00:06,000\r\nB\r\n\r\n3\r\n00:00:01,000 --> 00:00:02,000\r\nA\r\n"
    caps = parse_srt(text).captions
    assert [c.text for c in caps] == ["A", "B"]
    assert caps[0].start == 1.0 and caps[1].end == 6.0


def test_time_line_parsing():
    assert parse_time_line("00:00:01,5 --> 00:00:02,250") == (1.5, 2.25)
    assert parse_time_line("0:0:1 --> 0:0:2") == (1.0, 2.0)
    assert parse_time_line("00:61:00,000 --> 00:62:00,000") is None
    assert parse_time_line("not a time") is None


MALFORMED = """1
00:00:01,000 -> 00:00:02,000
bad arrow

2
00:00:05,000 --> 00:00:04,000
ends before it starts

3
00:00:06,000 --> 00:00:07,000
<i></i>

4
00:00:08,000 --> 00:00:09,000
kept
"""


def test_lenient_skips_and_counts_malformed_blocks():
    out = parse_srt(MALFORMED, source="x.srt")
    assert out.captions == [Caption(8.0, 9.0, "kept")]
    assert out.n_skipped == 3
    assert out.problems[0].startswith("x.srt:2:")


@pytest.mark.parametrize("text,line,field", [
    ("1\n00:00:01,000 -> 00:00:02,000\nbad\n", 2, "time"),
    ("1\n00:00:05,000 --> 00:00:04,000\nx\n", 2, "time"),
    ("\n\n1\n00:00:01,000 --> 00:00:02,000\n<b> </b>\n", 3, "text"),
])
def test_strict_names_file_line_field(text, line, field):
    with pytest.raises(DataFormatError) as e:
        parse_srt(text, source="bad.srt", strict=True)
    assert e.value.path == "bad.srt" and e.value.line == line and e.value.field == field
    assert "bad.srt" in str(e.value)


def test_garbage_and_empty_files_do_not_crash():
    assert parse_srt("").captions == []
    out = parse_srt("\x00\x01 garbage\n\nmore garbage --> \n")
    assert out.captions == [] and out.n_skipped == 2


def test_load_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="not found"):
        load_captions(tmp_path / "none.srt")
    p = tmp_path / "v.srt"
    p.write_bytes(GOOD.encode("utf-8") + b"\n4\n00:00:09,000 --> 00:00:10,000\n\xff\xfe ok\n")
    assert len(load_captions(p)) == 4


def test_merge_repeats():
    caps = [Caption(0, 1, "a"), Caption(1, 2, "a"), Caption(2.5, 3, "a"), Caption(3, 4, "b")]
    assert merge_repeats(caps) == [Caption(0, 2, "a"), Caption(2.5, 3, "a"), Caption(3, 4, "b")]
    assert merge_repeats(caps, gap=0.5)[0] == Caption(0, 3, "a")
