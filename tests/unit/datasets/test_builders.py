"""Dataset builders through the LAVIS registry and LAVIS's Config."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.demo_corpus import make_demo_corpus
from lavis_c2f.datasets.moment_retrieval import MomentRetrievalDataset
from lavis_c2f.datasets.video_retrieval import VideoRetrievalDataset

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
TINY = dict(n_videos=12, video_dim=16, text_dim=12, latent_dim=8)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "corpus"
    make_demo_corpus(root, **TINY)
    return root


def _demo_cfg(root, **changes):
    cls = registry.get_builder_class("c2f_demo")
    cfg = OmegaConf.load(cls.default_config_path()).datasets.c2f_demo
    cfg.data_root = str(root)
    for k, v in changes.items():
        cfg[k] = v
    return cfg


def test_all_builders_registered_with_absolute_yaml():
    for name in ("c2f_qvh", "c2f_charades_sta", "c2f_tacos", "c2f_demo"):
        cls = registry.get_builder_class(name)
        p = cls.default_config_path(type="default")
        assert os.path.isabs(p) and os.path.isfile(p)
        node = OmegaConf.load(p).datasets
        assert list(node.keys()) == [name]
    with pytest.raises(ConfigError, match="unknown dataset config type"):
        registry.get_builder_class("c2f_qvh").default_config_path(type="nope")
    with pytest.raises(KeyError, match="c2f_demo"):
        registry.get_builder_class("c2f_dmeo")


def test_demo_builder_moment_retrieval(tiny_corpus):
    builder = registry.get_builder_class("c2f_demo")(_demo_cfg(tiny_corpus))
    ds = builder.build_datasets()
    assert set(ds) == {"train", "val", "test"}
    assert all(isinstance(d, MomentRetrievalDataset) for d in ds.values())
    train = ds["train"]
    batch = train.collater([train[i] for i in range(3)])
    assert batch["src_vid"].shape[-1] == 16 + 2 and batch["src_txt"].shape[-1] == 12
    assert batch["has_labels"].all() and batch["saliency_pos_labels"].shape == (3, 2)
    assert all(s.shape[1] == 2 and (s >= 0).all() and (s <= 1).all() for s in batch["span_labels"])
    # the same through a DataLoader with LAVIS-style collater
    loader = torch.utils.data.DataLoader(ds["val"], batch_size=4, collate_fn=ds["val"].collater)
    first = next(iter(loader))
    assert first["src_vid_mask"].shape[0] == min(4, len(ds["val"]))


def test_demo_builder_video_retrieval_and_splits(tiny_corpus):
    cfg = _demo_cfg(tiny_corpus, dataset_type="video_retrieval", splits=["val"])
    ds = registry.get_builder_class("c2f_demo")(cfg).build_datasets()
    assert list(ds) == ["val"]
    val = ds["val"]
    assert isinstance(val, VideoRetrievalDataset)
    q = val.queries[0]
    assert val.videos[val.gt_video_index(q.qid)] == q.vid
    vb = val.video_batch(list(range(val.num_videos)))
    assert vb["src_vid"].shape[-1] == 16  # no TEF for stage 1
    qb = val.query_batch([0, 1])
    assert qb["txt_pooled"].shape == (2, 12)


def test_demo_builder_via_lavis_config(tiny_corpus, tmp_path):
    """LAVIS's Config merges our (absolute) default YAML with the user's overrides."""
    from lavis.common.config import Config

    user = OmegaConf.create({"datasets": {"c2f_demo": {"data_root": str(tiny_corpus), "max_v_l": 10}}})
    merged = Config.build_dataset_config(user)
    node = merged.datasets.c2f_demo
    assert node.max_v_l == 10 and node.clip_length == 2.0
    ds = registry.get_builder_class("c2f_demo")(node).build_datasets()
    assert ds["train"][0]["video_feat"].shape[0] <= 10


def test_demo_builder_auto_generates(tmp_path, monkeypatch):
    root = tmp_path / "auto"
    monkeypatch.setenv("C2F_DEMO_ROOT", str(root))
    cls = registry.get_builder_class("c2f_demo")
    cfg = OmegaConf.load(cls.default_config_path()).datasets.c2f_demo
    cfg.demo_params = dict(TINY, n_videos=6)
    ds = cls(cfg).build_datasets()  # data_root comes from $C2F_DEMO_ROOT
    assert (root / "corpus.json").is_file() and len(ds["train"]) > 0
    cfg.demo_params = dict(TINY, n_videos=7)
    with pytest.raises(ConfigError, match="other parameters"):
        cls(cfg).build_datasets()
    cfg.demo_params = {}
    assert len(cls(cfg).build_datasets()["val"]) == len(ds["val"])  # uses the existing corpus
    cfg.auto_generate = False
    cfg.data_root = str(tmp_path / "none")
    with pytest.raises(ConfigError, match="no demo corpus"):
        cls(cfg).build_datasets()


def test_unknown_and_bad_keys(tiny_corpus):
    cls = registry.get_builder_class("c2f_demo")
    with pytest.raises(ConfigError, match=r"datasets.c2f_demo: unknown key\(s\) 'max_vl' \(did you mean 'max_v_l'\?\)"):
        cls(_demo_cfg(tiny_corpus, max_vl=3))
    with pytest.raises(ConfigError, match="vis_processor"):
        cls(_demo_cfg(tiny_corpus, vis_processor={"train": {"name": "x"}}))
    cfg = _demo_cfg(tiny_corpus)
    cfg.annotations.train.fromat = "qvh"
    with pytest.raises(ConfigError, match="datasets.c2f_demo.annotations.train: unknown key"):
        cls(cfg)
    with pytest.raises(ConfigError, match="dataset_type"):
        cls(_demo_cfg(tiny_corpus, dataset_type="grounding"))
    with pytest.raises(ConfigError, match="clip_length"):
        cls(_demo_cfg(tiny_corpus, clip_length=0))
    with pytest.raises(ConfigError, match="qid_format"):
        cfg = _demo_cfg(tiny_corpus)
        cfg.text_features.qid_format = "q"
        cls(cfg)
    with pytest.raises(ConfigError, match="splits"):
        cls(_demo_cfg(tiny_corpus, splits=["dev"]))
    # the charades builder does not take the demo-only keys
    ch = registry.get_builder_class("c2f_charades_sta")
    node = OmegaConf.load(ch.default_config_path()).datasets.c2f_charades_sta
    node.auto_generate = True
    with pytest.raises(ConfigError, match="auto_generate"):
        ch(node)


def test_missing_files_name_file_and_key(tiny_corpus, tmp_path):
    cls = registry.get_builder_class("c2f_demo")
    cfg = _demo_cfg(tiny_corpus)
    cfg.annotations.val.path = "annotations/nope.jsonl"
    with pytest.raises(ConfigError) as ei:
        cls(cfg).build_datasets()
    msg = str(ei.value)
    assert "datasets.c2f_demo.annotations.val.path" in msg and str(tiny_corpus / "annotations/nope.jsonl") in msg
    cfg = _demo_cfg(tiny_corpus)
    cfg.video_features[0].path = "no_features"
    with pytest.raises(ConfigError) as ei:
        cls(cfg).build_datasets()
    assert "datasets.c2f_demo.video_features[0].path" in str(ei.value) and "no_features" in str(ei.value)
    cfg = _demo_cfg(tiny_corpus)
    cfg.text_features.path = str(tmp_path / "nothing_here")
    with pytest.raises(ConfigError, match="text_features.path"):
        cls(cfg).build_datasets()


def _require_shared(rel):
    p = (SHARED / rel).resolve()
    if not p.exists():
        pytest.skip(f"../shared not found: {p}")
    return p


def _fake_clip_store(root: Path, vids, n_clips=75, dim=8):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for v in vids:
        np.savez(root / f"{v}.npz", features=rng.standard_normal((n_clips, dim)).astype(np.float32))


def test_qvh_builder_on_real_annotations(tmp_path):
    """c2f_qvh reads the real annotation files; features are a small fake store."""
    src = _require_shared("qvhighlights")
    root = tmp_path / "qvh"
    root.mkdir()
    for s in ("train", "val", "test"):
        shutil.copy(src / f"highlight_{s}_release.jsonl", root)
    _fake_clip_store(root / "features" / "clip_features", ["NUsG9BgSes0_210.0_360.0"])
    (root / "features" / "clip_text_features").mkdir()
    np.savez(root / "features" / "clip_text_features" / "qid2579.npz",
             last_hidden_state=np.ones((14, 4), np.float32), pooler_output=np.ones(4, np.float32))
    cls = registry.get_builder_class("c2f_qvh")
    cfg = OmegaConf.load(cls.default_config_path()).datasets.c2f_qvh
    cfg.data_root = str(root)
    cfg.video_features = [{"type": "npz", "path": "features/clip_features"}]
    ds = cls(cfg).build_datasets()
    assert {k: len(v) for k, v in ds.items()} == {"train": 7218, "val": 1550, "test": 1542}
    s = ds["val"][0]
    assert s["qid"] == 2579 and s["video_feat"].shape == (75, 10) and s["has_labels"]
    assert s["saliency_all_labels"][41].item() == 4  # [1, 1, 2]
    with pytest.raises(KeyError, match="clip_features"):
        ds["val"][1]  # no features for that video in the fake store


def test_charades_and_tacos_builders_on_real_annotations(tmp_path):
    src = _require_shared("charades_sta")
    root = tmp_path / "cha"
    root.mkdir()
    shutil.copy(src / "charades_sta_test.txt", root)
    vids = sorted({line.split()[0] for line in (root / "charades_sta_test.txt").read_text().splitlines()})
    _fake_clip_store(root / "features" / "clip_features", vids, n_clips=30, dim=4)
    (root / "features" / "clip_text_features").mkdir()
    cls = registry.get_builder_class("c2f_charades_sta")
    cfg = OmegaConf.load(cls.default_config_path()).datasets.c2f_charades_sta
    cfg.data_root = str(root)
    cfg.annotations = {"test": cfg.annotations.test}
    cfg.video_features = [{"type": "npz", "path": "features/clip_features"}]
    cfg.reader.on_error = "skip"  # fake 30 s features: windows starting after 30 s are skipped
    b = cls(cfg)
    recs = b.read_split("test")
    assert len(recs) + recs.report.n_skipped == 3720 and recs.report.n_clamped > 0
    assert 0 < recs.report.n_skipped < 100
    assert all(r.duration == 30.0 for r in recs)  # 30 clips x clip_length 1 s
    ds = b.build_datasets()
    assert len(ds["test"]) == len(recs)

    tsrc = _require_shared("tacos")
    troot = tmp_path / "tacos"
    troot.mkdir()
    for s in ("train", "val", "test"):
        shutil.copy(tsrc / f"{s}.json", troot)
    (troot / "features" / "clip_features").mkdir(parents=True)
    (troot / "features" / "clip_text_features").mkdir()
    tcls = registry.get_builder_class("c2f_tacos")
    tcfg = OmegaConf.load(tcls.default_config_path()).datasets.c2f_tacos
    tcfg.data_root = str(troot)
    tds = tcls(tcfg).build_datasets()
    assert {k: len(v) for k, v in tds.items()} == {"train": 9790, "val": 4436, "test": 4001}
    assert tds["train"].vis_processor.max_len is None and tds["train"].text_processor.max_len == 100
