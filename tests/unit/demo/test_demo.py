"""The web demo's pure parts (no server, no browser): error messages, sources, uploads, the
``lavis-c2f demo`` argument checks and the Streamlit command, thumbnails. The page itself is
tested in a real browser by ``tests/browser``."""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.demo import cli as demo_cli
from lavis_c2f.demo import sources as src
from lavis_c2f.demo.messages import UserError, check_query, describe_error
from lavis_c2f.pipeline.quickstart_run import QuickstartRun

# =========================================================================== messages


def test_check_query_collapses_white_space_and_rejects_empty_queries():
    assert check_query("  a  man\topens\n the door ") == "a man opens the door"
    for empty in ("", "   \n\t", None):
        with pytest.raises(UserError, match="query box is empty"):
            check_query(empty)


def test_describe_error_expected_errors_are_shown_as_they_are():
    from lavis_c2f.video.decode import VideoDecodeError

    msg, expected = describe_error(VideoDecodeError("/tmp/up/abc/broken.mp4", "no video stream"))
    assert (msg, expected) == ("Cannot read the video broken.mp4: no video stream", True)
    assert describe_error(UserError("Choose video files first.")) == ("Choose video files first.", True)
    assert describe_error(ValueError("the query is empty")) == ("Type a query first: the query box is empty.", True)
    assert describe_error(KeyError("unknown video 'v9'")) == ("unknown video 'v9'", True)
    assert describe_error(ConfigError("run.top_k must be >= 1")) == ("run.top_k must be >= 1", True)
    assert describe_error(DataFormatError("corpus.json: field 'videos' missing")) == \
        ("corpus.json: field 'videos' missing", True)
    assert describe_error(FileNotFoundError("index folder not found: /x")) == ("index folder not found: /x", True)
    assert describe_error(ValueError("top_k must be >= 1, got 0")) == ("top_k must be >= 1, got 0", True)


def test_describe_error_unexpected_errors_name_the_type_and_point_at_the_log():
    msg, expected = describe_error(RuntimeError("CUDA error: device-side assert\nmore lines"))
    assert not expected
    assert msg.startswith("Unexpected error (RuntimeError: CUDA error: device-side assert)")
    assert "more lines" not in msg and "server's log" in msg
    msg, expected = describe_error(ZeroDivisionError())
    assert (msg.startswith("Unexpected error (ZeroDivisionError)"), expected) == (True, False)
    msg, expected = describe_error(MemoryError())
    assert "Out of memory" in msg and not expected


# =========================================================================== quickstart runs


def _fake_run(root, name: str, *, corpus: bool = True, ckpts: bool = True) -> str:
    run = os.path.join(str(root), name)
    os.makedirs(os.path.join(run, "corpus"))
    paths = {}
    for stage in ("stage1", "stage2"):
        paths[stage] = os.path.join(run, f"{stage}.pth")
        if ckpts:
            with open(paths[stage], "wb") as f:
                f.write(b"x")
    if corpus:
        with open(os.path.join(run, "corpus", "corpus.json"), "w", encoding="utf-8") as f:
            f.write("{}")
    with open(os.path.join(run, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"checkpoints": paths}, f)
    return run


def _finished(run):
    return QuickstartRun(run).finished_checkpoints()


def _latest(root):
    run = QuickstartRun.latest(root)
    return None if run is None else str(run.path)


def test_quickstart_checkpoints_of_finished_and_unfinished_runs(tmp_path):
    run = _fake_run(tmp_path, "done")
    assert _finished(run) == {"stage1": os.path.join(run, "stage1.pth"), "stage2": os.path.join(run, "stage2.pth")}
    assert _finished(_fake_run(tmp_path, "no_corpus", corpus=False)) is None
    assert _finished(_fake_run(tmp_path, "ckpts_gone", ckpts=False)) is None
    assert _finished(str(tmp_path / "missing")) is None
    bad = _fake_run(tmp_path, "bad_summary")
    (tmp_path / "bad_summary" / "summary.json").write_text("[1, 2", encoding="utf-8")
    assert _finished(bad) is None
    (tmp_path / "bad_summary" / "summary.json").write_text("[1, 2]", encoding="utf-8")  # not an object
    assert _finished(bad) is None


def test_find_quickstart_run_takes_the_latest_finished_run(tmp_path):
    assert _latest(str(tmp_path / "nothing_here")) is None
    assert _latest(str(tmp_path)) is None
    old = _fake_run(tmp_path, "a_old")
    new = _fake_run(tmp_path, "b_new")
    unfinished = _fake_run(tmp_path, "c_unfinished", corpus=False)
    os.utime(os.path.join(old, "summary.json"), (1_000_000, 1_000_000))
    os.utime(os.path.join(new, "summary.json"), (2_000_000, 2_000_000))
    os.utime(os.path.join(unfinished, "summary.json"), (3_000_000, 3_000_000))
    assert _latest(str(tmp_path)) == new
    os.utime(os.path.join(old, "summary.json"), (4_000_000, 4_000_000))
    assert _latest(str(tmp_path)) == old


def test_quickstart_steps_are_recorded_in_the_run_directory(tmp_path, capsys):
    """The demo follows a running quickstart through RUN/progress.json, not its printed banners."""
    from lavis_c2f.pipeline.quickstart import _Steps

    run = QuickstartRun(tmp_path / "run")
    run.path.mkdir()
    assert run.progress() is None
    steps = _Steps(8, run)
    steps.start("training stage 1 (T-MASS)")
    assert run.progress() == (1, 8, "training stage 1 (T-MASS)")
    steps.start("tuning the fusion")
    assert run.progress() == (2, 8, "tuning the fusion")
    assert len(capsys.readouterr().out.splitlines()) == 3   # the banners are still printed for people
    for bad in ('{"step": 0, "steps": 3, "name": "x"}', '{"step": 4, "steps": 3, "name": "x"}', "[1, 2]", "{"):
        run.progress_file.write_text(bad, encoding="utf-8")
        assert run.progress() is None, bad


# =========================================================================== uploads and settings


def test_save_upload_writes_once_under_a_content_hash_with_a_safe_name(tmp_path):
    folder = tmp_path / "uploads"
    p1 = src.save_upload(b"video bytes", "My clip (1).mp4", str(folder))
    assert os.path.dirname(os.path.dirname(p1)) == str(folder)
    assert os.path.basename(p1) == "My_clip_1_.mp4"
    with open(p1, "rb") as f:
        assert f.read() == b"video bytes"
    mtime = os.path.getmtime(p1)
    assert src.save_upload(b"video bytes", "My clip (1).mp4", str(folder)) == p1   # same content: same file
    assert os.path.getmtime(p1) == mtime
    p2 = src.save_upload(b"other bytes", "My clip (1).mp4", str(folder))
    assert p2 != p1 and os.path.dirname(p2) != os.path.dirname(p1)
    escaped = src.save_upload(b"x", "../../etc/passwd", str(folder))
    assert os.path.realpath(escaped).startswith(os.path.realpath(str(folder)) + os.sep)
    assert os.path.basename(escaped) == "passwd"
    assert os.path.basename(src.save_upload(b"y", "...", str(folder))) == "video"
    leftovers = [n for _, _, names in os.walk(folder) for n in names if n.endswith(".tmp")]
    assert leftovers == []


def test_settings_from_argv_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = src.settings_from_argv(["--index", "idx", "--backbone", "random", "--workdir", "w", "--device", "cpu"])
    assert s.index == str(tmp_path / "idx") and s.workdir == str(tmp_path / "w")
    assert s.quickstart_root == str(tmp_path / src.QUICKSTART_DIR)
    assert (s.backbone, s.device, s.run_dir) == ("random", "cpu", None)
    assert src.settings_from_argv([]).workdir == src.default_workdir()
    # Milvus locators: a *.db path is made absolute with its collection, a server URI is kept
    assert src.settings_from_argv(["--index", "c.db#videos"]).index == f"{tmp_path}/c.db#videos"
    assert src.settings_from_argv(["--index", "http://h:19530#v"]).index == "http://h:19530#v"
    with pytest.raises(SystemExit):
        src.settings_from_argv(["--backbone", "resnet"])


def test_backbone_config_needs_local_clip_weights_only_for_clip_backbones():
    assert src.DemoSettings().backbone_config("offline") == {}
    assert src.DemoSettings(clip_path="/w/clip").backbone_config("clip_hf") == {"clip_path": "/w/clip"}
    assert src.DemoSettings(clip_path="/w/c.pth").backbone_config("clip_lavis") == {"checkpoint": "/w/c.pth"}
    with pytest.raises(ConfigError, match="needs --clip-path"):
        src.DemoSettings().backbone_config("clip_hf")
    with pytest.raises(ConfigError, match="not random"):
        src.DemoSettings(clip_path="/w/clip").backbone_config("random")


def test_iter_moment_lines_formats_times_as_mm_ss():
    moments = [SimpleNamespace(rank=1, vid="v1", start=4.6, end=65.4, score=0.9, stage1_score=0.5,
                               stage2_score=0.7, path="/videos/v1.mp4"),
               SimpleNamespace(rank=2, vid="v2", start=0.0, end=3725.0, score=0.1, stage1_score=None,
                               stage2_score=None, path=None)]
    lines = list(src.iter_moment_lines(moments))
    assert [(m["start_hms"], m["end_hms"], m["length_s"]) for m in lines] == [("00:05", "01:05", 60.8),
                                                                            ("00:00", "1:02:05", 3725.0)]
    assert lines[0]["path"] == "/videos/v1.mp4" and lines[1]["stage1"] is None


def test_link_or_copy_and_new_index_dir(tmp_path):
    video_dir, index = src.new_index_dir(str(tmp_path))
    assert os.path.isdir(video_dir) and os.path.dirname(video_dir) == os.path.dirname(index)
    f = tmp_path / "a.mp4"
    f.write_bytes(b"abc")
    dst = src.link_or_copy(str(f), video_dir)
    assert dst == os.path.join(video_dir, "a.mp4") and open(dst, "rb").read() == b"abc"
    assert src.link_or_copy(str(f), video_dir) == dst


# =========================================================================== lavis-c2f demo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["demo", *argv])


def test_demo_is_a_lavis_c2f_command():
    from lavis_c2f import cli

    args = cli.build_parser().parse_args(["demo", "--port", "8502"])
    assert args.func is demo_cli.cmd_demo and args.port == 8502 and args.host == "127.0.0.1"


def test_check_args_rejects_what_would_only_fail_in_the_page(tmp_path):
    port = str(_free_port())
    with pytest.raises(ConfigError, match="not both"):
        demo_cli.check_args(_args("--index", "i", "--run-dir", "r", "--port", port))
    with pytest.raises(FileNotFoundError, match="index folder not found"):
        demo_cli.check_args(_args("--index", str(tmp_path / "nope"), "--port", port))
    (tmp_path / "corpus_dir").mkdir()
    (tmp_path / "corpus_dir" / "corpus.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError, match="is a demo corpus: use --run-dir"):
        demo_cli.check_args(_args("--index", str(tmp_path / "corpus_dir"), "--port", port))
    (tmp_path / "idx").mkdir()
    with pytest.raises(ConfigError, match=r"no idx\.c2f-video\.json beside it"):
        demo_cli.check_args(_args("--index", str(tmp_path / "idx"), "--port", port))
    with pytest.raises(FileNotFoundError, match="quickstart run directory not found"):
        demo_cli.check_args(_args("--run-dir", str(tmp_path / "no_run"), "--port", port))
    unfinished = _fake_run(tmp_path, "unfinished", ckpts=False)
    with pytest.raises(ConfigError, match="not a finished quickstart run"):
        demo_cli.check_args(_args("--run-dir", unfinished, "--port", port))
    with pytest.raises(FileNotFoundError, match="--grounder-ckpt: not found"):
        demo_cli.check_args(_args("--grounder-ckpt", str(tmp_path / "g.pth"), "--port", port))
    with pytest.raises(ConfigError, match="--clip-path needs --backbone clip_hf or clip_lavis"):
        demo_cli.check_args(_args("--clip-path", str(tmp_path), "--port", port))
    with pytest.raises(ConfigError, match="--backbone clip_hf needs --clip-path"):
        demo_cli.check_args(_args("--backbone", "clip_hf", "--port", port))
    with pytest.raises(ConfigError, match="--port must be in 1..65535"):
        demo_cli.check_args(_args("--port", "70000"))
    demo_cli.check_args(_args("--run-dir", _fake_run(tmp_path, "done"), "--port", port))   # fine


def test_check_args_names_a_busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve on 127.0.0.1:{busy}.*choose another --port"):
            demo_cli.check_args(_args("--port", str(busy)))


def test_streamlit_command_is_local_headless_and_without_telemetry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmd = demo_cli.streamlit_command(_args("--port", "8600", "--run-dir", "run", "--backbone", "random"))
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and cmd[4] == demo_cli.APP
    assert os.path.isfile(cmd[4])
    sep = cmd.index("--")
    opts = dict(o[2:].split("=", 1) for o in cmd[5:sep])
    assert opts["browser.gatherUsageStats"] == "false" and opts["server.headless"] == "true"
    assert opts["server.address"] == "127.0.0.1" and opts["server.port"] == "8600"
    assert opts["server.fileWatcherType"] == "none"
    for key, value in opts.items():   # no option points at anything outside this machine
        assert "://" not in value and not value.startswith("//"), (key, value)
    assert cmd[sep + 1:] == ["--run-dir", str(tmp_path / "run"), "--backbone", "random", "--device", "auto"]
    # the app parses exactly these arguments
    s = src.settings_from_argv(cmd[sep + 1:])
    assert (s.run_dir, s.backbone) == (str(tmp_path / "run"), "random")


def test_quickstart_args_reach_the_app_checked(tmp_path, monkeypatch):
    """--quickstart-args: parsed against 'lavis-c2f quickstart' on the terminal, passed to the app
    in one '='-joined argument (its value starts with '--'), and parsed back to the same tuple."""
    monkeypatch.chdir(tmp_path)
    args = _args("--port", str(_free_port()), "--quickstart-args", "--n-videos 40 --skip-untrained")
    demo_cli.check_args(args)
    cmd = demo_cli.streamlit_command(args)
    tail = cmd[cmd.index("--") + 1:]
    assert "--quickstart-args=--n-videos 40 --skip-untrained" in tail
    assert src.settings_from_argv(tail).quickstart_args == ("--n-videos", "40", "--skip-untrained")
    assert src.settings_from_argv([]).quickstart_args == ()
    for bad, match in (("--out elsewhere", "leave out --out"), ("--n-videos forty", "invalid int value: 'forty'"),
                       ("--bogus 1", "unrecognized arguments: --bogus 1"), ("'open", "No closing quotation")):
        with pytest.raises(ConfigError, match=match):
            demo_cli.check_args(_args("--port", str(_free_port()), f"--quickstart-args={bad}"))


def test_streamlit_options_exist_in_the_pinned_streamlit():
    config = pytest.importorskip("streamlit.config", reason="streamlit is not installed")
    known = config.get_config_options()
    for key in list(demo_cli.STREAMLIT_OPTIONS) + ["server.address", "server.port", "browser.serverAddress",
                                                   "browser.serverPort"]:
        assert key in known, key
    # nothing in the defaults the demo keeps points at a remote asset
    for key in ("theme.font", "theme.headingFont", "theme.codeFont", "theme.fontFaces", "client.showSidebarNavigation"):
        if key in known:
            value = known[key].default_val
            assert not (isinstance(value, str) and "://" in value), (key, value)


def test_print_command_prints_and_exits(capsys):
    from lavis_c2f import cli

    port = _free_port()
    assert cli.main(["demo", "--port", str(port), "--print-command"]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and "starting" not in out    # only the command, ready to paste
    assert f"--server.port={port}" in out and "--browser.gatherUsageStats=false" in out


def test_bad_demo_arguments_are_one_line_errors(tmp_path, capsys):
    from lavis_c2f.demo.__main__ import main

    assert main(["--index", str(tmp_path / "nope"), "--port", str(_free_port())]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lavis-c2f demo: error: index folder not found") and "Traceback" not in err


# =========================================================================== thumbnails


def test_saliency_thumbnail_draws_the_curve_and_shades_the_window():
    from lavis_c2f.demo.thumbs import BACKGROUND, CURVE, WINDOW, saliency_thumbnail

    img = saliency_thumbnail([0.1, 0.5, 0.9, 0.2], clip_length=2.0, duration=8.0, window=[4.0, 6.0],
                             size=(100, 40))
    assert img.shape == (40, 100, 3) and img.dtype == np.uint8
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert {CURVE, WINDOW, BACKGROUND} <= colours
    shaded = np.where((img == WINDOW).all(axis=2).any(axis=0))[0]
    assert 45 <= shaded.min() and shaded.max() <= 76   # 4-6 s of 8 s on ~94 drawable pixels
    assert WINDOW not in {tuple(c) for c in saliency_thumbnail([1.0], 2.0, 2.0, None, (20, 20)).reshape(-1, 3)}
    with pytest.raises(ValueError, match="non-empty"):
        saliency_thumbnail([], 2.0, 8.0)
    with pytest.raises(ValueError, match="finite"):
        saliency_thumbnail([0.1, float("nan")], 2.0, 8.0)
    with pytest.raises(ValueError, match="positive"):
        saliency_thumbnail([0.1], 0.0, 8.0)
    with pytest.raises(ValueError, match="at least 8x8"):
        saliency_thumbnail([0.1], 1.0, 8.0, size=(4, 40))


def test_frame_at_decodes_the_frame_at_a_time(shared_dir, tmp_path):
    from lavis_c2f.demo.thumbs import frame_at
    from lavis_c2f.video.decode import VideoDecodeError

    video = shared_dir / "data" / "media" / "charades_sample.mp4"
    if not video.is_file():
        pytest.skip(f"not found: {video}")
    frame = frame_at(video, 5.0, height=48)
    assert frame.shape[0] == 48 and frame.shape[2] == 3 and frame.dtype == np.uint8 and frame.std() > 0
    assert frame_at(video, 0.0, height=48).shape == frame.shape
    with pytest.raises(ValueError, match="finite number"):
        frame_at(video, -1.0)
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video", encoding="utf-8")
    with pytest.raises(VideoDecodeError):
        frame_at(broken, 1.0)


def test_upload_encoding_reports_progress_in_clips(shared_dir):
    video = shared_dir / "data" / "media" / "charades_sample.mp4"
    if not video.is_file():
        pytest.skip(f"not found: {video}")
    p = src.video_predictor(src.DemoSettings(backbone="random", device="cpu"))
    calls = []
    encoded = p.encode_video(video, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (encoded.n_clips, encoded.n_clips)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert np.array_equal(encoded.features, p.encode_video(video).features)   # same features with or without
