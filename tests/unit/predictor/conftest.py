"""Fixtures of the predictor tests; the shared ones (videos, indexes, checkpoints, demo corpus)
are in tests/unit/conftest.py."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def trained_index(video_dir, backbone, ckpts, tmp_path_factory):
    """An index built with the tiny trained retriever (recorded in INDEX.c2f-video.json)."""
    from lavis_c2f.index.build import index_videos

    out = tmp_path_factory.mktemp("tr") / "index"
    index_videos(video_dir, out, backbone=backbone, retriever_checkpoint=ckpts["retriever"],
                 model_cfg=ckpts["retriever_yaml"], progress=False)
    return str(out)
