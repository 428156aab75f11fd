"""The Milvus backend (embedded milvus-lite): same answers as the FAISS backend, upserts by video
id, add / remove, and the clear errors (unreachable URI, missing collection, manifest or width
mismatch, unknown video id)."""
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from lavis_c2f import cli  # noqa: E402
from lavis_c2f.common.errors import ConfigError, IndexUnavailableError  # noqa: E402
from lavis_c2f.index import CorpusIndex, IndexFormatError, IndexMismatchError, StageOneIndex  # noqa: E402
from lavis_c2f.index.locator import backend_of, locator_text, open_index  # noqa: E402
from lavis_c2f.index.milvus_index import MANIFEST_SUFFIX, MilvusIndex, parse_milvus_locator  # noqa: E402
from lavis_c2f.models.retriever import C2FTMassRetriever  # noqa: E402
from test_corpus_index import D_IN, _model  # noqa: E402  (the tiny retriever of the FAISS index tests)

N_VIDEOS = 2000


def _features(n, seed=0):
    rng = np.random.default_rng(seed)
    # lengths 0..8: empty videos (no pre-filter vector) and videos with fewer frames than segments
    return {f"vid{i:05d}": rng.standard_normal((int(rng.integers(0, 9)), D_IN)).astype(np.float32) for i in range(n)}


def _queries(model, q=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model.encode_text(torch.randn(q, 5, D_IN, generator=g), torch.ones(q, 5), torch.randn(q, D_IN, generator=g))


def _durations(feats):
    return {v: float(len(f)) * 2.0 for v, f in feats.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The same ~2000 videos in a FAISS index (flat, exact) and a milvus-lite collection (FLAT)."""
    root = tmp_path_factory.mktemp("milvus")
    m = _model()
    feats = _features(N_VIDEOS)
    fx = CorpusIndex.build(m, list(feats), feats.__getitem__, _durations(feats), batch_size=256, progress=False,
                           work_dir=str(root))
    loc = f"{root}/corpus.db#videos"
    mx = MilvusIndex.create(loc, m)
    mx.add_features(list(feats), feats.__getitem__, _durations(feats), batch_size=256, progress=False)
    mx.save()
    return {"root": root, "model": m, "feats": feats, "faiss": fx, "milvus": mx, "loc": loc}


def test_exact_prefilter_gives_the_same_ranked_videos_and_scores_as_faiss(built):
    fx, mx, m = built["faiss"], built["milvus"], built["model"]
    assert fx.ann_kind == "flat" and mx.ann["kind"] == "flat" and len(mx) == len(fx) == N_VIDEOS
    q = _queries(m)
    # the pre-filter itself: the same candidates in the same order
    assert mx.candidates(q, 64) == fx.candidates(q, 64)
    for m_cand in (64, N_VIDEOS):
        a, b = fx.search(q, k=10, m=m_cand), mx.search(q, k=10, m=m_cand)
        for ra, rb in zip(a, b):
            assert [v for v, _ in ra] == [v for v, _ in rb]
            assert np.allclose([s for _, s in ra], [s for _, s in rb], atol=1e-6)
    # re-ranking everything equals FAISS's exhaustive search
    exh = fx.search_exhaustive(q[:2], k=5)
    assert [[v for v, _ in r] for r in mx.search(q[:2], k=5, m=N_VIDEOS)] == [[v for v, _ in r] for r in exh]
    # the stored rows read back as the FAISS index's (float16 precision, zero-padded alike)
    vids = list(built["feats"])[:40]
    ea, eb = fx.embeddings(vids), mx.embeddings(vids)
    assert torch.equal(ea.mask, eb.mask) and torch.allclose(ea.frames, eb.frames) and torch.allclose(ea.pooled, eb.pooled)
    assert mx.duration(vids[3]) == fx.duration(vids[3])


def test_reopen_upsert_add_remove(built):
    m, feats, loc = built["model"], built["feats"], built["loc"]
    mx = open_index(loc, m)
    assert isinstance(mx, MilvusIndex) and isinstance(mx, StageOneIndex) and mx.info()["videos"] == N_VIDEOS
    # a re-run of the build (same model and options) resumes: upserts add nothing twice
    again = MilvusIndex.create(loc, m)
    sub = {v: feats[v] for v in list(feats)[:50]}
    again.add_features(list(sub), sub.__getitem__, _durations(sub), progress=False)
    again.save()
    assert len(again) == N_VIDEOS
    # remove / add back
    gone = list(feats)[:3]
    assert mx.remove(gone) == 3 and len(mx) == N_VIDEOS - 3 and gone[0] not in mx
    with pytest.raises(KeyError, match="vid00000"):
        mx.remove([gone[0]])
    assert mx.remove([gone[0], "nope"], missing_ok=True) == 0
    back = {v: feats[v] for v in gone}
    mx.add_features(gone, back.__getitem__, _durations(back), progress=False)
    assert len(mx) == N_VIDEOS and mx.present(gone + ["nope"]) == set(gone)
    # build options of a resumed collection must match
    with pytest.raises(IndexMismatchError, match="prefilter_segments"):
        MilvusIndex.create(loc, m, prefilter_segments=2)


def test_unknown_video_id_is_named(built):
    mx, m = built["milvus"], built["model"]
    q = _queries(m, 1)
    with pytest.raises(KeyError, match="'no-such-video'"):
        mx.rerank(q, [["vid00001", "no-such-video"]], k=2)
    with pytest.raises(KeyError, match="'no-such-video'"):
        mx.duration("no-such-video")
    assert "no-such-video" not in mx


def test_manifest_and_width_mismatches_name_the_field(built):
    loc = built["loc"]
    with pytest.raises(IndexMismatchError, match="model.weights_hash"):
        open_index(loc, _model(seed=3))
    wide = C2FTMassRetriever(text_input_dim=D_IN, video_input_dim=D_IN, embed_dim=16, num_frames=4, num_heads=2)
    with pytest.raises(IndexMismatchError, match=r"model\.config_hash"):
        open_index(loc, wide)
    mx = open_index(loc)                  # inspection without a model
    with pytest.raises(IndexMismatchError, match="'frames' holds 4 x 8"):
        mx.add_rows(["x"], np.zeros((2, 16), np.float32), np.array([2]), np.zeros((1, 3, 16), np.float32))
    # a collection whose vector field does not have the manifest's width
    other = parse_milvus_locator(loc.replace("#videos", "#narrow"))
    MilvusIndex.create(other, built["model"]).close()
    man = dict(mx.manifest)
    man["dim"] = 16
    mx.client.upsert(other.collection + MANIFEST_SUFFIX, [{"key": "manifest", "value": json.dumps(man), "v": [0.0, 0.0]}])
    with pytest.raises(IndexFormatError, match="field 'pre_0'.*8-d vectors"):
        open_index(other)
    # another format version
    man["dim"], man["version"] = 8, 99
    mx.client.upsert(other.collection + MANIFEST_SUFFIX, [{"key": "manifest", "value": json.dumps(man), "v": [0.0, 0.0]}])
    with pytest.raises(IndexFormatError, match="field 'version'"):
        open_index(other)


def test_missing_collection_manifest_and_file(built, tmp_path):
    root = built["root"]
    with pytest.raises(IndexFormatError, match="collection 'absent' does not exist.*videos"):
        open_index(f"{root}/corpus.db#absent")
    built["milvus"].client.create_collection("bare", dimension=4)
    with pytest.raises(IndexFormatError, match="no lavis-c2f manifest"):
        open_index(f"{root}/corpus.db", collection="bare")
    with pytest.raises(IndexFormatError, match="not found"):
        open_index(tmp_path / "none.db")
    with pytest.raises(ConfigError, match="collection name"):
        parse_milvus_locator("x.db#1bad")
    with pytest.raises(ConfigError, match="given twice|names collection"):
        parse_milvus_locator("x.db#a", collection="b")


def test_unreachable_uri_is_named_within_the_timeout():
    with socket.socket() as s:            # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(IndexUnavailableError, match=f"127.0.0.1:{port}.*unreachable"):
        open_index(uri + "#videos", timeout=2.0)
    assert time.monotonic() - t0 < 10.0
    # a server that accepts the connection but never answers: given up after the timeout
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(IndexUnavailableError, match=r"unreachable \(gave up after .* timeout 1.5 s\)"):
            open_index(uri, timeout=1.5)
        assert 1.0 < time.monotonic() - t0 < 10.0


def test_locators_pick_the_backend(tmp_path):
    assert backend_of(tmp_path / "index") == "faiss"
    assert backend_of("corpus.db") == backend_of("http://h:19530#c") == backend_of("https://h#c") == "milvus"
    assert locator_text("corpus.db").endswith("/corpus.db#c2f_index")
    assert locator_text("http://h:19530", "c") == "http://h:19530#c"


def test_cli_build_rerun_info_search_remove(built, tmp_path, capsys):
    """``index build --backend milvus`` twice (the re-run upserts), ``info``, ``search`` equal to
    the FAISS index's, ``add`` / ``remove``."""
    import yaml

    rng = np.random.default_rng(0)
    feats = tmp_path / "clip_features"
    feats.mkdir()
    vids = [f"v{i}" for i in range(25)]
    for v in vids:
        np.savez(feats / f"{v}.npz", features=rng.standard_normal((int(rng.integers(3, 10)), D_IN)).astype(np.float32))
    q = tmp_path / "qid0.npz"
    np.savez(q, last_hidden_state=rng.standard_normal((6, D_IN)).astype(np.float32),
             pooler_output=rng.standard_normal(D_IN).astype(np.float32))
    cfg = tmp_path / "model.yaml"
    cfg.write_text(yaml.safe_dump({"model": {
        "arch": "c2f_tmass_retriever", "text_input_dim": D_IN, "video_input_dim": D_IN, "embed_dim": 8,
        "num_frames": 4, "num_heads": 1, "num_trials": 3, "pool_dropout": 0.0}}))
    db, fdir = str(tmp_path / "c.db"), str(tmp_path / "faiss")
    common = ["--features", str(feats), "--model-cfg", str(cfg), "--no-progress", "--clip-length", "2"]
    for _ in range(2):
        assert cli.main(["index", "build", *common, "--out", db, "--backend", "milvus", "--limit", "20"]) == 0
        assert "indexed 20 videos into" in capsys.readouterr().out
    assert cli.main(["index", "info", db, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["videos"] == 20 and info["backend"] == "milvus" and info["ann"]["kind"] == "flat"
    assert cli.main(["index", "build", *common, "--out", fdir, "--limit", "20"]) == 0
    capsys.readouterr()
    outs = []
    for loc in (fdir, db):
        assert cli.main(["index", "search", loc, "--query-features", str(q), "--model-cfg", str(cfg), "-k", "5",
                         "-m", "20"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert [v for v, _ in outs[0]["ranked_vids"]] == [v for v, _ in outs[1]["ranked_vids"]]
    assert cli.main(["index", "add", db, *common]) == 0
    assert "added 5 videos; 25 videos" in capsys.readouterr().out
    assert cli.main(["index", "remove", db, "v0", "v1"]) == 0
    assert "23 videos left" in capsys.readouterr().out
    assert cli.main(["index", "remove", db, "nope"]) == 1
    assert "'nope' is not in the index" in capsys.readouterr().err
    assert cli.main(["index", "build", *common, "--out", fdir + "2", "--backend", "milvus"]) == 1
    assert "names a faiss index" in capsys.readouterr().err


def test_sinkhorn_biases_are_stored_and_score_as_faiss(tmp_path):
    """UCoFiA-style per-video Sinkhorn biases (``--sinkhorn-bank``) in the Milvus bias collection:
    the same numbers as the FAISS index's, the same ranked videos and scores, kept on reopening,
    dropped (zero) for a re-upserted video and checked against the model's settings."""
    from lavis_c2f.models.retriever import TextEmbedding

    m = _model(sinkhorn=True, use_frame_sentence=True, sinkhorn_temperature=0.05)
    feats = {v: f for v, f in _features(80, seed=3).items() if len(f)}
    fx = CorpusIndex.build(m, list(feats), feats.__getitem__, _durations(feats), batch_size=32, progress=False)
    loc = f"{tmp_path}/sk.db#sk"
    mx = MilvusIndex.create(loc, m)
    mx.add_features(list(feats), feats.__getitem__, _durations(feats), batch_size=32, progress=False)
    bank = TextEmbedding(torch.randn(11, 8, generator=torch.Generator().manual_seed(9)))
    bf = fx.compute_video_bias(bank, block_videos=7)
    bm = mx.compute_video_bias(bank, block_videos=9)
    assert bm.shape == (len(feats), 2) and fx.vids == mx.vids
    np.testing.assert_allclose(bm, bf, rtol=1e-6, atol=1e-6)
    mx.save()
    q = _queries(m)
    want = fx.search(q, k=8, m=len(feats))
    zero = CorpusIndex.build(m, list(feats), feats.__getitem__, _durations(feats), batch_size=32, progress=False)
    assert [r[0] for r in zero.search(q, k=8, m=len(feats))] != [r[0] for r in want]  # the bias matters here
    mx.close()
    back = open_index(loc, m)
    assert back.info()["video_bias"] == ["video_sentence", "frame_sentence"]
    for n_cand in (len(feats), 20):
        for ra, rb in zip(fx.search(q, k=8, m=n_cand), back.search(q, k=8, m=n_cand)):
            assert [v for v, _ in rb] == [v for v, _ in ra]
            np.testing.assert_allclose([s for _, s in rb], [s for _, s in ra], rtol=1e-5, atol=1e-6)
    # a re-upserted video scores with zero bias, as one re-added to the FAISS index
    v0 = back.vids[0]
    back.add_features([v0], feats.__getitem__, progress=False)
    fx.remove([v0])
    fx.add_features([v0], feats.__getitem__, progress=False)
    for ra, rb in zip(fx.search(q, k=8, m=len(feats)), back.search(q, k=8, m=len(feats))):
        assert [v for v, _ in ra] == [v for v, _ in rb]
    assert float(back._bias_for([v0]).abs().sum()) == 0.0
    m.configure_inference(sinkhorn_temperature=0.1)
    with pytest.raises(IndexMismatchError, match="sinkhorn_temperature"):
        back.search(q, k=4)
    m.configure_inference(sinkhorn_temperature=0.05)
    back.close()


@pytest.mark.parametrize("frame_dtype", ["float16", "float32"])
def test_frames_are_compact_text_split_over_fields(tmp_path, monkeypatch, frame_dtype):
    """The stored rows go into ``frames_c`` VARCHAR fields (float16 / float32 bytes, base64, only
    the valid rows); rows longer than one field are cut over several and read back whole."""
    from lavis_c2f.index import milvus_index

    monkeypatch.setattr(milvus_index, "_FRAME_CHARS", 16)         # 4 x 8 float16 values: 88 characters
    m = _model()
    feats = _features(30, seed=5)
    mx = MilvusIndex.create(f"{tmp_path}/f.db#f", m, frame_dtype=frame_dtype)
    want_fields = -(-(4 * -(-4 * 8 * np.dtype(frame_dtype).itemsize // 3)) // 16)
    assert mx.manifest["frame_fields"] == want_fields > 1
    mx.add_features(list(feats), feats.__getitem__, progress=False)
    fx = CorpusIndex.build(m, list(feats), feats.__getitem__, batch_size=64, progress=False, frame_dtype=frame_dtype)
    ea, eb = fx.embeddings(list(feats)), mx.embeddings(list(feats))
    assert torch.equal(ea.mask, eb.mask) and torch.equal(ea.frames, eb.frames)
    row = mx.client.get("f", ids=["vid00001"], output_fields=["*"])[0]
    assert all(isinstance(row[f"frames_{c}"], str) for c in range(want_fields))
    q = _queries(m)
    assert [[v for v, _ in r] for r in fx.search(q, k=5, m=30)] == [[v for v, _ in r] for r in mx.search(q, k=5, m=30)]
    mx.close()


def test_cli_build_with_a_sinkhorn_bank_scores_as_faiss(tmp_path, capsys):
    """``index build --sinkhorn-bank`` into a FAISS folder and a Milvus collection: both store the
    biases, and ``index search`` ranks alike."""
    import yaml

    rng = np.random.default_rng(1)
    feats, bank = tmp_path / "clip_features", tmp_path / "bank"
    feats.mkdir()
    bank.mkdir()
    for i in range(30):
        np.savez(feats / f"v{i}.npz", features=rng.standard_normal((int(rng.integers(3, 10)), D_IN)).astype(np.float32))
    for i in range(9):
        np.savez(bank / f"qid{i}.npz", last_hidden_state=rng.standard_normal((5, D_IN)).astype(np.float32),
                 pooler_output=rng.standard_normal(D_IN).astype(np.float32))
    cfg = tmp_path / "model.yaml"
    cfg.write_text(yaml.safe_dump({"model": {
        "arch": "c2f_tmass_retriever", "text_input_dim": D_IN, "video_input_dim": D_IN, "embed_dim": 8,
        "num_frames": 4, "num_heads": 1, "num_trials": 3, "pool_dropout": 0.0, "sinkhorn": True,
        "use_frame_sentence": True, "sinkhorn_temperature": 0.05}}))
    common = ["--features", str(feats), "--model-cfg", str(cfg), "--no-progress", "--sinkhorn-bank", str(bank)]
    db, fdir = str(tmp_path / "sk.db"), str(tmp_path / "faiss")
    outs = []
    for loc in (fdir, db):
        assert cli.main(["index", "build", *common, "--out", loc]) == 0
        capsys.readouterr()
        assert cli.main(["index", "info", loc, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["video_bias"] == ["video_sentence", "frame_sentence"]
        assert cli.main(["index", "search", loc, "--query-features", str(bank / "qid0.npz"), "--model-cfg", str(cfg),
                         "-k", "8", "-m", "30"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert [v for v, _ in outs[0]["ranked_vids"]] == [v for v, _ in outs[1]["ranked_vids"]]
    np.testing.assert_allclose([s for _, s in outs[0]["ranked_vids"]], [s for _, s in outs[1]["ranked_vids"]],
                               rtol=1e-5, atol=1e-6)


def test_close_releases_the_embedded_store_for_another_process(tmp_path):
    """milvus-lite's in-process server holds the ``*.db`` folder's LOCK while it runs: closing the
    last open index of a process stops it, so another process (a service, a second build) can open
    the store while this one goes on; while one index is still open, the other process is refused."""
    m, feats = _model(), _features(20)
    loc = f"{tmp_path}/corpus.db#videos"
    first = MilvusIndex.create(loc, m)
    first.add_features(list(feats), feats.__getitem__, _durations(feats), progress=False)
    first.save()
    second = MilvusIndex.open(loc, m)
    code = (f"from lavis_c2f.index.milvus_index import MilvusIndex; i = MilvusIndex.open({loc!r}); "
            "print(len(i)); i.close()")

    def other_process():
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)

    first.close()
    held = other_process()
    assert held.returncode != 0 and "is open in another process" in held.stderr and "LOCK" in held.stderr, \
        held.stdout + held.stderr
    second.close()
    second.close()  # closing twice does nothing
    free = other_process()
    assert free.returncode == 0 and free.stdout.split()[-1] == str(len(feats)), free.stdout + free.stderr
    assert len(MilvusIndex.open(loc, m)) == len(feats)  # and this process opens it again
