"""Demo corpus: determinism, layout, rerun semantics and learnability."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.demo_corpus import (SPLITS, DemoCorpusExistsError, DemoCorpusParams, generate_demo_corpus,
                                        make_demo_corpus)
from lavis_c2f.data.features import NpzDirStore
from lavis_c2f.data.readers import read_qvh_jsonl

SMALL = dict(n_videos=24, video_dim=32, text_dim=24, latent_dim=16)


def _all_files(root: Path):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_runs_identical_bytes(tmp_path):
    a = make_demo_corpus(tmp_path / "a", **SMALL)
    b = make_demo_corpus(tmp_path / "b", **SMALL)
    assert a["generated"] and b["generated"]
    fa, fb = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    assert a["content"]["sha256"] == b["content"]["sha256"]
    c = make_demo_corpus(tmp_path / "c", **{**SMALL, "seed": 1})
    assert c["content"]["sha256"] != a["content"]["sha256"]


def test_layout_and_annotations(tmp_path):
    root = tmp_path / "demo"
    meta = make_demo_corpus(root, **SMALL)
    assert (root / "README.md").read_text().startswith("# lavis-c2f demo corpus")
    assert json.loads((root / "corpus.json").read_text())["params"] == DemoCorpusParams(**SMALL).to_dict()
    vstore = NpzDirStore(root / "clip_features")
    tstore = NpzDirStore(root / "clip_text_features", field="last_hidden_state")
    vids_by_split = {}
    for split in SPLITS:
        recs = read_qvh_jsonl(root / "annotations" / f"{split}.jsonl", require_windows=True)
        assert len(recs) == meta["splits"][split]["n_queries"] > 0
        vids_by_split[split] = {r.vid for r in recs}
        for r in recs:
            L = vstore.num_rows(r.vid)
            assert r.duration == L * 2.0 and 30 <= r.duration <= 150
            assert vstore.get(r.vid).shape == (L, 32)
            assert 1 <= len(r.relevant_windows) <= 3
            ids = [c for st, ed in r.relevant_windows for c in range(int(st // 2), int(ed // 2))]
            assert r.relevant_clip_ids == ids
            assert all(len(s) == 3 and all(0 <= v <= 4 for v in s) for s in r.saliency_scores)
            tok = tstore.get(f"qid{r.qid}")
            assert tok.shape == (len(r.query.replace(".", "").split()) + 2, 24)
            assert tstore.get(f"qid{r.qid}", "pooler_output").shape == (24,)
    # splits are by video
    assert not (vids_by_split["train"] & vids_by_split["val"]) and not (vids_by_split["val"] & vids_by_split["test"])
    assert sum(len(v) for v in vids_by_split.values()) == 24 == len(vstore)
    qids = [r.qid for s in SPLITS for r in read_qvh_jsonl(root / "annotations" / f"{s}.jsonl")]
    assert sorted(qids) == list(range(len(qids))) == sorted(int(k[3:]) for k in tstore.keys())


def test_rerun_is_noop_and_param_change_needs_force(tmp_path):
    root = tmp_path / "demo"
    make_demo_corpus(root, **SMALL)
    stamp = (root / "corpus.json").stat().st_mtime_ns
    again = make_demo_corpus(root, **SMALL)
    assert again["generated"] is False and (root / "corpus.json").stat().st_mtime_ns == stamp
    with pytest.raises(DemoCorpusExistsError, match=r"parameters \['n_videos'\]"):
        make_demo_corpus(root, **{**SMALL, "n_videos": 12})
    forced = make_demo_corpus(root, force=True, **{**SMALL, "n_videos": 12})
    assert forced["generated"] and len(NpzDirStore(root / "clip_features")) == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("not a corpus")
    with pytest.raises(DemoCorpusExistsError, match="not a demo corpus"):
        make_demo_corpus(other, **SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_demo_corpus(empty, **SMALL)["generated"]


def test_bad_params():
    from lavis_c2f.common.errors import ConfigError

    with pytest.raises(ConfigError, match="distractor_rate"):
        DemoCorpusParams(distractor_rate=2.0)
    with pytest.raises(ConfigError, match="demo corpus parameters: unknown key"):
        DemoCorpusParams.from_dict({"n_video": 3})


def test_cli_make_demo_corpus(tmp_path, capsys):
    from lavis_c2f.cli import main

    out = tmp_path / "cli"
    args = ["make-demo-corpus", str(out), "--n-videos", "9", "--video-dim", "8", "--text-dim", "8",
            "--param", "latent_dim=4", "--param", "queries_per_video=[1,2]"]
    assert main(args) == 0
    assert "demo corpus written" in capsys.readouterr().out
    assert main(args) == 0 and "already complete" in capsys.readouterr().out
    assert main(args[:2]) == 1 and "--force" in capsys.readouterr().err
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["params"]["queries_per_video"] == [1, 2] and meta["video_dim"] == 8


def _l2(x):
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-5)


def _retrieval_metrics(data, split, text_map, video_center):
    """R@1 of the GT video among the split's videos (video score = max clip cosine) and the
    fraction of queries whose best clip in the GT video lies inside a GT window."""
    recs = data.records[split]
    vids = sorted({r.vid for r in recs})
    clips = [(_l2(data.video_features[v]) - video_center) for v in vids]
    owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(clips)])
    allc = _l2(np.concatenate(clips))
    q = _l2(text_map(np.stack([_l2(data.text_pooled[r.qid]) for r in recs])))
    sims = q @ allc.T  # (Q, total clips)
    r1 = hit = 0
    for i, r in enumerate(recs):
        per_video = np.array([sims[i, owner == j].max() for j in range(len(vids))])
        gt = vids.index(r.vid)
        r1 += int(np.argmax(per_video) == gt)
        hit += int(np.argmax(sims[i, owner == gt]) in set(r.relevant_clip_ids))
    return r1 / len(recs), hit / len(recs), 1.0 / len(vids)


def test_learnable_least_squares_beats_raw_cosine():
    """A ridge map fitted on train (pooled text -> mean GT clip feature) finds the GT video and
    GT clips of val queries far above chance; the raw cross-modal cosine does not."""
    data = generate_demo_corpus(DemoCorpusParams())  # the default corpus, in memory (~1.5 s)
    tr = data.records["train"]
    T = np.stack([_l2(data.text_pooled[r.qid]) for r in tr])
    V = np.stack([_l2(data.video_features[r.vid])[r.relevant_clip_ids].mean(0) for r in tr])
    tm, vm = T.mean(0), V.mean(0)
    W = np.linalg.solve((T - tm).T @ (T - tm) + 1.0 * np.eye(T.shape[1]), (T - tm).T @ (V - vm))
    ls_r1, ls_hit, chance = _retrieval_metrics(data, "val", lambda t: (t - tm) @ W, vm)
    raw_r1, raw_hit, _ = _retrieval_metrics(data, "val", lambda t: t, 0.0)
    assert ls_r1 > 0.6 and ls_hit > 0.8
    assert raw_r1 < 0.1 and raw_hit < 0.35
    assert ls_r1 > 10 * chance and raw_r1 < 3 * chance + 0.02


def test_split_sizes_by_video_and_error_without_training_videos():
    assert DemoCorpusParams().split_sizes() == (210, 45, 45)
    # fractions are normalised, so they may be counts
    assert DemoCorpusParams(n_videos=480, split_fractions=(210, 45, 225)).split_sizes() == (210, 45, 225)
    with pytest.raises(ConfigError, match="no training video"):
        DemoCorpusParams(n_videos=4, split_fractions=(0.01, 0.5, 0.5)).split_sizes()
