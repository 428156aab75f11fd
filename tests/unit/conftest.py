"""Session fixtures shared by the predictor and search tests (helpers in predictor_helpers.py).

Session-scoped and lazy: nothing is built unless a test asks for it.
"""
from __future__ import annotations

import pytest

from predictor_helpers import make_demo, make_videos, random_backbone, save_tiny_grounder, save_tiny_retriever


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """{stem: path} of the generated clips, in one folder."""
    return make_videos(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="session")
def video_dir(videos):
    return next(iter(videos.values())).parent


@pytest.fixture(scope="session")
def backbone():
    return random_backbone()


@pytest.fixture(scope="session")
def zs_index(video_dir, backbone, tmp_path_factory):
    """An index of the clips built without a retriever checkpoint (zero-shot searches)."""
    from lavis_c2f.index.build import index_videos

    out = tmp_path_factory.mktemp("zs") / "index"
    index_videos(video_dir, out, backbone=backbone, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    r = save_tiny_retriever(d)
    return {"retriever": r["ckpt"], "retriever_yaml": r["yaml"], "grounder": save_tiny_grounder(d / "qd.pth")}


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"))
