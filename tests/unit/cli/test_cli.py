"""The lavis-c2f dispatcher: sub-commands, the index shorthand, error exit codes."""
from __future__ import annotations

import pytest

from lavis_c2f import cli


def test_every_area_registers_its_commands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("make-demo-corpus", "convert", "vocab", "index", "extract", "search", "annotate",
                 "merge-stage1", "tune-fusion", "quickstart", "eval", "demo"):
        assert name in sub.choices, name


def test_index_shorthand_for_video_folders(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    assert cli.expand_shorthands(["index", str(videos), "--out", "x"]) == ["index", "videos", str(videos),
                                                                           "--out", "x"]
    assert cli.expand_shorthands(["-v", "index", str(videos)])[:3] == ["-v", "index", "videos"]
    # sub-commands and non-directories are left alone
    assert cli.expand_shorthands(["index", "info", str(videos)]) == ["index", "info", str(videos)]
    assert cli.expand_shorthands(["index", str(tmp_path / "nope")]) == ["index", str(tmp_path / "nope")]
    assert cli.expand_shorthands(["search", str(videos)]) == ["search", str(videos)]


def test_bad_input_is_an_error_message_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    code = cli.main(["merge-stage1", "--stage1", str(missing), "--ann", str(missing), "--top-k", "5",
                     "--out", str(tmp_path / "o.jsonl")])
    assert code == 1
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "Traceback" not in err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
