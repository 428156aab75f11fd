"""``index build --backend milvus`` across processes: 2 gloo ranks fill one collection of a
``milvus-lite server`` on 127.0.0.1, each upserting its own batches; a run that crashes mid-way
(one rank fails on a corrupt feature file, the launcher stops the other) is resumed by a re-run,
which adds nothing twice, skips what is stored and ends with the collection of one process."""
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from lavis_c2f import cli  # noqa: E402
from lavis_c2f.index.milvus_index import _GRPC_OPTIONS  # noqa: E402
from milvus_server import milvus_lite_server  # noqa: E402
from test_corpus_index import D_IN  # noqa: E402

N, BATCH = 40, 4                 # 10 batches: rank 0 takes 0, 2, .., rank 1 takes 1, 3, ..
BAD = 9 * BATCH + 1              # a video of batch 9, rank 1's last batch


@pytest.fixture()
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    feats = tmp_path / "clip_features"
    feats.mkdir()
    for i in range(N):
        np.savez(feats / f"v{i:03d}.npz", features=rng.standard_normal((int(rng.integers(1, 9)), D_IN)).astype(np.float32))
    cfg = tmp_path / "model.yaml"
    cfg.write_text(yaml.safe_dump({"model": {
        "arch": "c2f_tmass_retriever", "text_input_dim": D_IN, "video_input_dim": D_IN, "embed_dim": 8,
        "num_frames": 4, "num_heads": 1, "num_trials": 3, "pool_dropout": 0.0}}))
    common = ["--features", str(feats), "--model-cfg", str(cfg), "--no-progress",
              "--batch-size", str(BATCH)]
    return feats, common


def _torchrun(args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lavis_c2f.cli", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _rows(uri, collection):
    from pymilvus import MilvusClient

    c = MilvusClient(uri=uri, timeout=10, grpc_options=dict(_GRPC_OPTIONS))
    try:
        c.load_collection(collection)
        rows = c.query(collection, filter="", output_fields=["*"], limit=16384)
        man = c.query(collection + "_c2f_manifest", filter="", output_fields=["value"], limit=10)
    finally:
        c.close()
    return {r["vid"]: r for r in rows}, man


def _same_rows(a, b):
    assert a.keys() == b.keys()
    for v in a:
        for f, x in a[v].items():
            if f.startswith("pre_"):
                assert np.array_equal(np.asarray(x, np.float32), np.asarray(b[v][f], np.float32)), (v, f)
            else:
                assert x == b[v][f], (v, f)


@pytest.mark.slow
def test_two_ranks_fill_a_server_collection_resumably(inputs, tmp_path, capsys):
    feats, common = inputs
    with milvus_lite_server(tmp_path / "milvus_data") as uri:
        # one process: the reference collection
        assert cli.main(["index", "build", *common, "--out", f"{uri}#one"]) == 0
        assert f"{N} encoded, 0 already stored" in capsys.readouterr().out
        one, _ = _rows(uri, "one")
        # a crash mid-way: rank 1 fails on its last batch, the launcher stops rank 0
        good = (feats / f"v{BAD:03d}.npz").read_bytes()
        (feats / f"v{BAD:03d}.npz").write_bytes(b"not an npz file")
        r = _torchrun(["index", "build", *common, "--out", f"{uri}#two"])
        assert r.returncode != 0 and f"v{BAD:03d}" in r.stderr, r.stderr[-3000:]
        part, _ = _rows(uri, "two")
        assert 0 < len(part) < N and set(part) <= set(one)
        _same_rows(part, {v: one[v] for v in part})           # what was stored is already right
        # the re-run resumes: each rank upserts only its batches not stored, nothing twice
        (feats / f"v{BAD:03d}.npz").write_bytes(good)
        r = _torchrun(["index", "build", *common, "--out", f"{uri}#two"])
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count(f"indexed {N} videos into {uri}#two by 2 ranks") == 1, r.stdout
        vids = [f"v{i:03d}" for i in range(N)]
        kept = sum(BATCH for s in range(0, N, BATCH) if set(vids[s:s + BATCH]) <= set(part))
        assert kept and f"{N - kept} encoded, {kept} already stored" in r.stdout, r.stdout
        two, man = _rows(uri, "two")
        _same_rows(two, one)
        assert len(man) == 1 and f'"videos": {N}' in man[0]["value"]   # one manifest, written once, counted
        # another re-run (one process this time) encodes nothing
        capsys.readouterr()
        assert cli.main(["index", "build", *common, "--out", f"{uri}#two"]) == 0
        assert f"0 encoded, {N} already stored" in capsys.readouterr().out


def test_several_ranks_need_a_server_not_a_db_file(inputs, tmp_path, monkeypatch, capsys):
    _, common = inputs
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["index", "build", *common, "--out", f"{tmp_path}/c.db#videos"]) == 1
    err = capsys.readouterr().err
    assert "opened by one process at a time" in err and "milvus-lite server --data-dir" in err
    assert "http://127.0.0.1:19530#videos" in err and not os.path.exists(tmp_path / "c.db")
    assert cli.main(["index", "build", *common, "--out", str(tmp_path / "faiss")]) == 1
    assert "--shard I/N" in capsys.readouterr().err
