"""Fixtures of the search / annotate CLI tests; the helpers are shared with tests/unit/predictor."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "predictor"))

from predictor_helpers import make_demo, make_videos, save_tiny_grounder, save_tiny_retriever  # noqa: E402


@pytest.fixture()
def cli(monkeypatch, capsys):
    """``run(*argv) -> (exit code, stdout, stderr)`` of ``lavis-c2f`` with the search commands
    registered (lavis_c2f.cli.COMMAND_MODULES gets them if it does not list them yet)."""
    import lavis_c2f.cli as main_cli

    if "lavis_c2f.search.cli" not in main_cli.COMMAND_MODULES:
        monkeypatch.setattr(main_cli, "COMMAND_MODULES", main_cli.COMMAND_MODULES + ["lavis_c2f.search.cli"])

    def run(*argv):
        capsys.readouterr()
        code = main_cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    return make_videos(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="session")
def video_dir(videos):
    return next(iter(videos.values())).parent


@pytest.fixture(scope="session")
def zs_index(video_dir, tmp_path_factory):
    from lavis_c2f.video.backbones import build_backbone
    from lavis_c2f.video.extract import index_videos

    out = tmp_path_factory.mktemp("zs") / "index"
    index_videos(video_dir, out, backbone=build_backbone("random"), progress=False)
    return str(out)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    r = save_tiny_retriever(d)
    return {"retriever": r["ckpt"], "retriever_yaml": r["yaml"], "grounder": save_tiny_grounder(d / "qd.pth")}


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"))
