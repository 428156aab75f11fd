"""The refiner's caption layer over lavis_c2f.video.captions (shared parser)."""
import pytest

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.models.refiner.srt import Caption, clean_captions, clean_text, load_captions, merge_repeats

GOOD = """1
00:00:05,500 --> 00:00:07,000
{\\an8}so we start

2
00:00:01,500 --> 00:00:03,000
Hello <i>there</i>
second line

3
00:00:08,000 --> 00:00:09,000
<b> </b>
"""

MALFORMED = GOOD + """
4
00:00:10,000 -> 00:00:11,000
bad arrow

5
00:00:12,000 --> 00:00:11,000
ends before it starts

6
00:00:13,000 --> 00:00:14,000
kept
"""


def test_caption_type_is_the_shared_one():
    from lavis_c2f.video import captions as shared

    assert Caption is shared.Caption


def test_load_cleans_sorts_and_drops_empty(tmp_path):
    p = tmp_path / "v.srt"
    p.write_text(GOOD, encoding="utf-8")
    assert load_captions(p) == [Caption(1.5, 3.0, "Hello there second line"), Caption(5.5, 7.0, "so we start")]


def test_lenient_skips_malformed_cues_strict_names_file_and_line(tmp_path):
    p = tmp_path / "bad.srt"
    p.write_text(MALFORMED, encoding="utf-8")
    assert [c.text for c in load_captions(p)] == ["Hello there second line", "so we start", "kept"]
    with pytest.raises(DataFormatError) as e:
        load_captions(p, strict=True)
    assert e.value.path == str(p) and e.value.line == 14  # the cue whose timing line is bad


def test_garbage_and_missing_files(tmp_path):
    p = tmp_path / "g.srt"
    p.write_bytes(b"\x00\x01 garbage\n\nmore garbage --> \n\xff\xfe")
    assert load_captions(p) == []
    with pytest.raises(DataFormatError, match="not found"):
        load_captions(tmp_path / "none.srt")


def test_clean_helpers_and_merge_repeats():
    assert clean_text("a <font color=red>b</font>\n  c") == "a b c"
    assert clean_captions([Caption(2, 3, "b"), Caption(0, 1, " <i></i> "), Caption(0, 1, "a")]) == \
        [Caption(0, 1, "a"), Caption(2, 3, "b")]
    caps = [Caption(0, 1, "a"), Caption(1, 2, "a"), Caption(2.5, 3, "a"), Caption(3, 4, "b")]
    assert merge_repeats(caps) == [Caption(0, 2, "a"), Caption(2.5, 3, "a"), Caption(3, 4, "b")]
    assert merge_repeats(caps, gap=0.5)[0] == Caption(0, 3, "a")
