"""Extraction and index building across processes: ``python -m torch.distributed.run
--nproc_per_node 2 -m lavis_c2f.cli extract|index videos ...`` with gloo on CPU and the tiny
random backbone gives the files of a one-process run; an interrupted sharded run resumes."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lavis_c2f.index import build
from lavis_c2f.index.corpus_index import CorpusIndex

BATCH = ["--index-batch-size", "2"]           # 5 videos: 3 batches, so both ranks encode parts


@pytest.fixture(scope="module")
def five_videos(videos, tmp_path_factory):
    d = tmp_path_factory.mktemp("five")
    for stem, p in videos.items():
        shutil.copy(p, d / p.name)
    for stem in ("pattern", "redblue"):       # copies under other names: 5 videos
        shutil.copy(videos[stem], d / f"{stem}_copy.mp4")
    shutil.copy(videos["redblue"].with_suffix(".srt"), d / "redblue.srt")
    return d


def _run(args, nproc=1, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lavis_c2f.cli", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "lavis_c2f.cli", *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _tree(root: Path, skip=()):
    """{relative path: bytes} of every file under root (but ``skip`` names)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def _same_index(a: Path, b: Path):
    ta, tb = _tree(a, skip={"manifest.json"}), _tree(b, skip={"manifest.json"})
    assert ta.keys() == tb.keys() and all(ta[k] == tb[k] for k in ta), \
        [k for k in ta if ta.get(k) != tb.get(k)]
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    ma.pop("created_utc"), mb.pop("created_utc")
    assert ma == mb


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume(five_videos, tmp_path):
    common = ["--backbone", "random", "--workers", "0", "--no-progress"]
    _run(["index", "videos", five_videos, "--out", tmp_path / "one" / "index", *common, *BATCH])
    r = _run(["index", "videos", five_videos, "--out", tmp_path / "two" / "index", *common, *BATCH], nproc=2)
    assert r.stdout.count("indexed 5 videos") == 1            # rank 0 reports
    one, two = tmp_path / "one", tmp_path / "two"
    # features, done markers, videos.jsonl, extract.json: the same files
    assert _tree(one / "index.features") == _tree(two / "index.features")
    assert len(list((two / "index.features" / "clip_features").glob("*.npz"))) == 5
    # the index: the same rows, frames, pre-filter and FAISS files (the manifest but its time)
    _same_index(one / "index", two / "index")
    sa, sb = (json.loads(Path(str(d / "index") + ".c2f-video.json").read_text()) for d in (one, two))
    assert sa.pop("features_dir") != sb.pop("features_dir") and sa == sb
    assert not (two / "index.parts").exists()                 # parts removed after the merge

    # a sharded extraction interrupted: two videos without files, no listing yet; `extract` on
    # 2 ranks resumes it
    out = tmp_path / "ext"
    shutil.copytree(two / "index.features", out)
    for vid in ("gray", "redblue_copy"):
        (out / "clip_features" / f"{vid}.npz").unlink()
        (out / ".done" / f"{vid}.json").unlink()
    (out / "videos.jsonl").unlink()
    (out / "clip_features" / ".gray.npz.tmp-123").write_bytes(b"half")   # a write cut short
    r = _run(["extract", five_videos, "--out", out, *common], nproc=2)
    assert r.stdout.count("2 ok, 0 failed, 3 skipped (of 5)") == 1    # rank 0 reports, in input order
    (out / "clip_features" / ".gray.npz.tmp-123").unlink()
    ext = json.loads((out / "extract.json").read_text())
    assert ext["last_run"]["skipped"] and sorted(os.path.basename(p) for p in ext["last_run"]["ok"]) == \
        ["gray.mp4", "redblue_copy.mp4"]
    ref = _tree(one / "index.features", skip={"extract.json"})
    assert _tree(out, skip={"extract.json"}) == ref


def test_parts_are_reused_when_their_key_matches_and_merge_like_one_build(zs_index, backbone, tmp_path):
    """The part files of a build across ranks, in one process: written once, kept by a rerun
    (resume), rewritten when what they depend on changes; merged, they equal add_features."""
    from lavis_c2f.common.errors import DataFormatError
    from lavis_c2f.data.features import NpzDirStore
    from lavis_c2f.video.extract import read_videos_jsonl

    feats = zs_index + ".features"
    rows = [r for r in read_videos_jsonl(feats) if r["status"] == "ok"]
    vids = [r["vid"] for r in rows]
    durs = {r["vid"]: r["duration"] for r in rows}
    store = NpzDirStore(os.path.join(feats, "clip_features"), field="features")
    load = lambda v: np.asarray(store.get(v), np.float32)  # noqa: E731
    model, _ = build._retriever_for(backbone, backbone.dim, "models/c2f_tmass_default.yaml", None)
    parts = tmp_path / "idx.parts"
    cols = (0, backbone.dim)
    batches = build._encode_parts(CorpusIndex.for_model(model), rows, load, cols, str(parts), 2, progress=False)
    assert batches == [vids[:2], vids[2:]] and len(list(parts.glob("batch-*.npz"))) == 2
    stamp = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.npz")}
    build._encode_parts(CorpusIndex.for_model(model), rows, load, cols, str(parts), 2, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.npz")} == stamp          # resumed: kept
    key = build._read_key(str(parts / "batch-000000.npz"))
    changed = [dict(r, n_clips=r["n_clips"] + 1) if r["vid"] == vids[0] else r for r in rows]
    build._encode_parts(CorpusIndex.for_model(model), changed, load, cols, str(parts), 2, progress=False)
    assert build._read_key(str(parts / "batch-000000.npz")) != key                        # stale: re-encoded
    assert (parts / "batch-000001.npz").stat().st_mtime_ns == stamp["batch-000001.npz"]

    merged = CorpusIndex.for_model(model)
    merged.add_row_batches(build._read_part(str(parts), b, chunk, durs) for b, chunk in enumerate(batches))
    direct = CorpusIndex.for_model(model)
    direct.add_features(vids, load, durs, batch_size=2, progress=False)
    _same_index(Path(merged.save(str(tmp_path / "merged"))), Path(direct.save(str(tmp_path / "direct"))))
    with pytest.raises(DataFormatError, match="holds other videos than batch 1"):
        build._read_part(str(parts), 1, vids[:1], durs)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["db", "server"])
def test_two_ranks_into_a_milvus_collection_equal_one_faiss_build(five_videos, tmp_path, store):
    """``index videos --out LOCATOR`` on 2 ranks: into milvus-lite ``corpus.db`` rank 0 upserts the
    merged parts; into a ``milvus-lite server`` each rank upserts its own batches. The stored rows
    equal a one-process FAISS build's; the sidecar is in the manifest; no parts are left."""
    pytest.importorskip("milvus_lite")
    from lavis_c2f.index.locator import open_index
    from milvus_server import milvus_lite_server

    common = ["--backbone", "random", "--workers", "0", "--no-progress"]
    one = tmp_path / "one" / "index"
    _run(["index", "videos", five_videos, "--out", one, *common, *BATCH])
    db = tmp_path / "mv" / "corpus.db"
    with contextlib.ExitStack() as stack:
        loc = f"{db}#videos" if store == "db" else \
            stack.enter_context(milvus_lite_server(tmp_path / "milvus_data")) + "#videos"
        r = _run(["index", "videos", five_videos, "--out", loc, "--features-dir", str(one) + ".features",
                  *common, *BATCH], nproc=2)
        assert r.stdout.count("indexed 5 videos") == 1
        fx, mx = CorpusIndex.load(str(one)), open_index(loc)
        assert mx.vids == sorted(fx.vids)
        ea, eb = fx.store.gather([fx.store.row_of(v) for v in mx.vids]), mx.embeddings(mx.vids)
        assert np.array_equal(ea.frames.numpy(), eb.frames.numpy()) and np.array_equal(ea.mask.numpy(), eb.mask.numpy())
        side = json.loads(Path(str(one) + ".c2f-video.json").read_text())
        assert mx.manifest["corpus"] == side and mx.manifest["counts"] == {"videos": 5}
        assert not Path(str(db) + ".parts").exists() and mx.source(mx.vids[0]).endswith(".mp4")
        assert not (Path(str(one) + ".features") / ("index" + build.PARTS_SUFFIX)).exists()
        mx.close()
