"""The index sidecar records the backbone settings and an absolute retriever path."""
from __future__ import annotations

import json
import os

import pytest


def test_index_remembers_backbone_config_and_absolute_checkpoint(video_dir, ckpts, tmp_path, monkeypatch):
    from lavis_c2f.common.errors import ConfigError
    from lavis_c2f.predictor import C2FPredictor
    from lavis_c2f.index.build import index_videos

    out = tmp_path / "idx"
    # a relative checkpoint path, as a user types it
    monkeypatch.chdir(os.path.dirname(ckpts["retriever"]))
    index_videos(video_dir, out, backbone="random", backbone_config={"dim": 16, "seed": 3},
                 retriever_checkpoint=os.path.basename(ckpts["retriever"]), model_cfg=ckpts["retriever_yaml"],
                 progress=False)
    side = json.loads((tmp_path / "idx.c2f-video.json").read_text())
    assert side["backbone_config"] == {"dim": 16, "seed": 3}
    assert os.path.isabs(side["retriever_checkpoint"]) and os.path.isfile(side["retriever_checkpoint"])
    monkeypatch.chdir(tmp_path)
    # no backbone_cfg given: the index's own settings rebuild the same encoder
    pred = C2FPredictor.from_checkpoints(index=str(out), backbone="random", device="cpu")
    assert len(pred.search("a red screen", top_k=3)) > 0
    # other settings -> another encoder: refused
    with pytest.raises(ConfigError, match="backbone"):
        C2FPredictor.from_checkpoints(index=str(out), backbone="random", backbone_cfg={"dim": 16, "seed": 4},
                                      device="cpu")
