"""Corpus extraction (layout, per-file errors, resumability, wds, workers), CLI and index_videos."""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import pytest

from lavis_c2f.data.features import NpzDirStore, WdsStore
from lavis_c2f.video.backbones import RandomBackbone
from lavis_c2f.video.extract import assign_vids, extract_corpus, read_videos_jsonl, write_query_features


@pytest.fixture()
def video_dir(tmp_path, media):
    d = tmp_path / "videos"
    (d / "sub").mkdir(parents=True)
    for name in ("id30", "rot90", "vfr", "empty", "notvideo", "audio_only", "trunc_fs"):
        shutil.copy(media[name], d / f"{name}.mp4")
    shutil.copy(media["full_fs"], d / "sub" / "full.mp4")
    (d / "notes.txt").write_text("not listed: not a video extension")
    return d


OK = {"id30", "rot90", "vfr", "full"}
BAD = {"empty": "empty file", "notvideo": "not a readable media file", "audio_only": "audio-only",
       "trunc_fs": "truncated"}


def test_extract_layout_errors_and_resume(video_dir, tmp_path, capsys):
    out = tmp_path / "out"
    bb = RandomBackbone(dim=8)
    res = extract_corpus(video_dir, out, bb, clip_length=1.0, frames_per_clip=2, workers=0, progress=False)
    by = {r["vid"]: r for r in res.rows}
    assert set(by) == OK | set(BAD)
    for vid in OK:
        assert by[vid]["status"] == "ok" and by[vid]["error"] is None
        feats = np.load(out / "clip_features" / f"{vid}.npz")["features"]
        assert feats.shape == (by[vid]["n_clips"], 8) and feats.dtype == np.float32
    assert by["id30"]["n_clips"] == 3 and by["full"]["n_clips"] == 8
    for vid, needle in BAD.items():
        assert by[vid]["status"] == "failed" and needle in by[vid]["error"]
        assert not (out / "clip_features" / f"{vid}.npz").exists()
    text = capsys.readouterr().out
    assert "4 ok, 4 failed" in text and "FAILED" in text
    rows = read_videos_jsonl(out)
    assert [r["vid"] for r in rows] == sorted(by) and all("source" not in r for r in rows)
    meta = json.loads((out / "extract.json").read_text())
    assert meta["backbone"]["weights_id"] == bb.weights_id and meta["videos_ok"] == 4
    # the store opens like any Moment-DETR feature folder
    store = NpzDirStore(out / "clip_features")
    assert set(store.keys()) == OK

    # rerun: finished videos are skipped, failed ones retried
    before = os.stat(out / "clip_features" / "id30.npz").st_mtime_ns
    res2 = extract_corpus(video_dir, out, bb, clip_length=1.0, frames_per_clip=2, workers=0, progress=False)
    assert len(res2.summary.skipped) == 4 and len(res2.summary.failed) == 4 and not res2.summary.ok
    assert os.stat(out / "clip_features" / "id30.npz").st_mtime_ns == before
    # other settings or a changed source file -> re-extracted
    res3 = extract_corpus(video_dir, out, bb, clip_length=2.0, frames_per_clip=1, workers=0, progress=False,
                          print_summary=False)
    assert len(res3.summary.ok) == 4 and not res3.summary.skipped
    os.utime(video_dir / "id30.mp4", ns=(1, 1))
    res4 = extract_corpus(video_dir, out, bb, clip_length=2.0, frames_per_clip=1, workers=0, progress=False,
                          print_summary=False)
    assert res4.summary.ok == [str(video_dir / "id30.mp4")]


def test_workers_give_the_same_features(video_dir, tmp_path):
    bb = RandomBackbone(dim=8)
    a = extract_corpus(video_dir, tmp_path / "a", bb, workers=0, progress=False, print_summary=False)
    b = extract_corpus(video_dir, tmp_path / "b", bb, workers=2, progress=False, print_summary=False)
    assert [(r["vid"], r["status"]) for r in a.rows] == [(r["vid"], r["status"]) for r in b.rows]
    for vid in OK:
        np.testing.assert_array_equal(np.load(tmp_path / "a" / "clip_features" / f"{vid}.npz")["features"],
                                      np.load(tmp_path / "b" / "clip_features" / f"{vid}.npz")["features"])


def test_wds_store_and_resume(video_dir, tmp_path):
    out = tmp_path / "w"
    bb = RandomBackbone(dim=4)
    os.remove(video_dir / "vfr.mp4")
    extract_corpus(video_dir, out, bb, store="wds", workers=0, progress=False, print_summary=False)
    s = WdsStore(out / "clip_features")
    assert set(s.keys()) == OK - {"vfr"}
    first = {k: s.get(k) for k in s.keys()}
    s.close()
    shutil.copy(video_dir / "id30.mp4", video_dir / "vfr.mp4")   # a new video
    res = extract_corpus(video_dir, out, bb, store="wds", workers=0, progress=False, print_summary=False)
    assert res.summary.ok == [str(video_dir / "vfr.mp4")] and len(res.summary.skipped) == 3
    s = WdsStore(out / "clip_features")
    assert set(s.keys()) == OK
    for k, v in first.items():
        np.testing.assert_array_equal(s.get(k), v)
    np.testing.assert_array_equal(s.get("vfr"), first["id30"])
    s.close()
    assert not any(n.endswith(".npy") for n in os.listdir(out / ".staging"))


def test_assign_vids_disambiguates_stems(tmp_path):
    paths = [str(tmp_path / "a.mp4"), str(tmp_path / "x" / "a.mkv"), str(tmp_path / "b.mp4")]
    assert assign_vids(paths, str(tmp_path)) == {paths[0]: "a", paths[1]: "x__a", paths[2]: "b"}


def test_empty_folder_and_bad_settings(tmp_path, video_dir):
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="no video files"):
        extract_corpus(tmp_path / "none", tmp_path / "o", RandomBackbone())
    from lavis_c2f.common.errors import ConfigError

    with pytest.raises(ConfigError):
        extract_corpus(video_dir, tmp_path / "o", RandomBackbone(), store="hdf5")


def test_query_features_layout(tmp_path):
    paths = write_query_features(RandomBackbone(dim=6), [(3, "a red ball"), ("7", "go")], tmp_path)
    with np.load(paths[0]) as z:
        assert z["last_hidden_state"].shape == (3, 6) and z["pooler_output"].shape == (6,)
    assert os.path.basename(paths[1]) == "qid7.npz"


def _parser():
    from lavis_c2f.index import cli as index_cli
    from lavis_c2f.video import cli

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    cli.register(sub)
    index_cli.register(sub)
    return ap


def test_cli_extract_exit_codes(video_dir, tmp_path):
    ap = _parser()
    a = ap.parse_args(["extract", str(video_dir), "--out", str(tmp_path / "c"), "--backbone", "random",
                       "--workers", "0", "--no-progress", "--clip-length", "1"])
    assert a.func(a) == 0
    assert json.loads((tmp_path / "c" / "extract.json").read_text())["clip_length"] == 1.0
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(video_dir / "empty.mp4", bad / "e.mp4")
    a = ap.parse_args(["extract", str(bad), "--out", str(tmp_path / "d"), "--backbone", "random", "--no-progress"])
    assert a.func(a) == 1
    from lavis_c2f.common.errors import ConfigError

    a = ap.parse_args(["extract", str(bad), "--out", str(tmp_path / "d"), "--backbone", "clip_hf"])
    with pytest.raises(ConfigError, match="--clip-path"):
        a.func(a)


def test_index_videos_builds_a_searchable_index(video_dir, tmp_path):
    ap = _parser()
    out = tmp_path / "idx"
    a = ap.parse_args(["index", "videos", str(video_dir), "--out", str(out), "--backbone", "random",
                       "--workers", "0", "--no-progress", "--model-cfg", "models/c2f_tmass_demo.yaml"])
    assert a.func(a) == 0
    from lavis_c2f.index.corpus_index import CorpusIndex

    idx = CorpusIndex.load(str(out))
    assert set(idx.vids) == OK
    side = json.loads((tmp_path / "idx.c2f-video.json").read_text())
    assert side["backbone"]["name"] == "c2f_feature_random" and side["videos"] == 4
    assert (tmp_path / "idx.features" / "clip_features" / "id30.npz").is_file()
    with pytest.raises(FileExistsError):
        a.func(a)
