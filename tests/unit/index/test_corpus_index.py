"""CorpusIndex: search vs exhaustive, persistence, updates, corruption errors, shards, biases."""
import json
import os

import numpy as np
import pytest
import torch

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.index import AnnConfig, CorpusIndex, IndexFormatError, IndexMismatchError, search_shards
from lavis_c2f.models.retriever import C2FTMassRetriever, TextEmbedding

D_IN = 12


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = C2FTMassRetriever(text_input_dim=D_IN, video_input_dim=D_IN, embed_dim=8, num_frames=4, num_heads=2,
                          pool_dropout=0.0, num_trials=3, max_words=5, **kw)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 7)
        for p in m.parameters():
            if p.ndim >= 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m.eval()


def _features(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return {f"vid{i:03d}": rng.standard_normal((int(rng.integers(0, 9)), D_IN)).astype(np.float32) for i in range(n)}


def _queries(model, q=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model.encode_text(torch.randn(q, 5, D_IN, generator=g), torch.ones(q, 5),
                                 torch.randn(q, D_IN, generator=g))


def _build(model, feats, ann=None, **kw):
    durs = {v: float(len(f)) * 2.0 for v, f in feats.items()}
    return CorpusIndex.build(model, list(feats), feats.__getitem__, durs, batch_size=16, progress=False,
                             ann=ann, **kw)


def _same(a, b, tol=1e-5):
    assert [v for v, _ in a] == [v for v, _ in b]
    assert np.allclose([s for _, s in a], [s for _, s in b], atol=tol)


@pytest.mark.parametrize("ann", [None, {"kind": "ivf", "ivf_nlist": 4}, {"kind": "hnsw", "hnsw_m": 8},
                                 {"kind": "ivf", "ivf_nlist": 4, "ivf_codec": "sq8"}])
def test_rerank_equals_exhaustive_when_m_covers_corpus(ann):
    m = _model()
    feats = _features()
    ix = _build(m, feats, ann=ann)
    assert ix.ann_kind == (ann or {}).get("kind", "flat")
    q = _queries(m)
    full = ix.search(q, k=7, m=len(feats))
    exh = ix.search_exhaustive(q, k=7, block_videos=13)
    for a, b in zip(full, exh):
        _same(a, b)
    # the exhaustive ranking is the model's own score over all videos
    emb = ix.embeddings(list(feats))
    scores = m.score(q, emb)
    top = torch.topk(scores[0], 7).indices.tolist()
    assert [v for v, _ in exh[0]] == [list(feats)[i] for i in top]
    # a narrow pre-filter still returns k results, all from the corpus, with exact scores
    narrow = ix.search(q, k=3, m=5)
    assert all(len(r) == 3 for r in narrow)
    vid_pos = {v: i for i, v in enumerate(feats)}
    for qi, r in enumerate(narrow):
        for v, s in r:
            assert s == pytest.approx(float(scores[qi, vid_pos[v]]), abs=1e-5)


def test_gather_round_trips_embeddings_and_durations():
    m = _model()
    feats = _features(20)
    ix = _build(m, feats, frame_dtype="float32")
    vids = list(feats)[3:9]
    x = np.zeros((len(vids), 9, D_IN), np.float32)
    mask = np.zeros((len(vids), 9), np.float32)
    for i, v in enumerate(vids):
        x[i, : len(feats[v])] = feats[v]
        mask[i, : len(feats[v])] = 1
    want = m.encode_video(torch.from_numpy(x), torch.from_numpy(mask))
    got = ix.embeddings(vids)
    f = got.frames.shape[1]
    assert torch.allclose(got.frames, want.frames[:, :f], atol=1e-6)
    assert torch.equal(got.mask, want.mask[:, :f])
    assert ix.duration(vids[0]) == 2.0 * len(feats[vids[0]])


def test_save_load_round_trip_and_info(tmp_path):
    m = _model()
    feats = _features()
    ix = _build(m, feats)
    q = _queries(m)
    before = ix.search(q, k=5, m=20)
    out = ix.save(str(tmp_path / "ix"))
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["version"] == 1 and set(man["files"]) >= {"vids.json", "rows.npz", "ann.faiss", "seg-00000.frames"}
    ix2 = CorpusIndex.load(out, model=m)
    for a, b in zip(before, ix2.search(q, k=5, m=20)):
        _same(a, b)
    info = ix2.info()
    assert info["videos"] == 60 and info["dim"] == 8 and info["ann"]["kind"] == "flat" and info["size_bytes"] > 0
    assert info["version"] == 1 and info["frame_dtype"] == "float16"
    # saving again onto itself keeps it loadable; no temp folders are left behind
    ix2.save(out)
    assert sorted(p for p in os.listdir(tmp_path)) == ["ix"]
    assert len(CorpusIndex.load(out, model=m)) == 60


def test_add_remove_replace_compact(tmp_path):
    m = _model()
    feats = _features(40)
    ix = _build(m, feats)
    q = _queries(m)
    top = ix.search(q, k=3, m=40)[0]
    gone = [top[0][0], top[1][0]]
    assert ix.remove(gone) == 2 and len(ix) == 38 and gone[0] not in ix
    after = ix.search(q, k=5, m=40)[0]
    assert not {v for v, _ in after} & set(gone)
    with pytest.raises(KeyError):
        ix.remove(["nope"])
    assert ix.remove(["nope"], missing_ok=True) == 0
    # re-add one of them under a new id with the same features: it comes back with the same score
    x = torch.from_numpy(feats[gone[0]])[None]
    ix.add(["again"], m.encode_video(x, torch.ones(1, x.shape[1])))
    res = dict(ix.search(q, k=3, m=40)[0])
    assert res["again"] == pytest.approx(top[0][1], abs=1e-5)
    with pytest.raises(ValueError, match="already indexed"):
        ix.add(["again"], m.encode_video(x, torch.ones(1, x.shape[1])))
    ix.add(["again"], m.encode_video(torch.randn(1, 3, D_IN), torch.ones(1, 3)), replace=True)
    assert len(ix) == 39
    path = ix.save(str(tmp_path / "ix"))
    ix2 = CorpusIndex.load(path, model=m)
    ref = ix2.search_exhaustive(q, k=6)
    assert ix2.info()["removed_rows"] == 3
    ix2.compact()
    assert ix2.num_rows == 39
    for a, b in zip(ref, ix2.search_exhaustive(q, k=6)):
        _same(a, b)
    ix2.save(path)
    ix3 = CorpusIndex.load(path, model=m)
    assert ix3.info()["removed_rows"] == 0
    for a, b in zip(ref, ix3.search(q, k=6, m=100)):
        _same(a, b)


def test_auto_policy_switches_to_pq_then_ivf_when_the_corpus_grows():
    m = _model()
    feats = _features(30)
    probe = _build(m, feats)
    n_vec = probe.store.num_vectors()                  # flat_max counts vectors (videos x valid segments)
    assert 30 < n_vec <= 90
    ix = _build(m, feats, ann={"flat_max": n_vec + 5, "pq_max": 2 * n_vec, "ivf_pq_m": 4, "ivf_nlist": 4})
    assert ix.ann_kind == "flat"
    q = _queries(m)
    for kind, seed in (("pq", 5), ("ivf", 6)):
        more = _features(20, seed=seed)
        more = {f"more{seed}_{i}": f for i, f in enumerate(more.values())}
        ix.add_features(list(more), more.__getitem__, progress=False)
        assert ix.ann_kind == kind and ix.info()["ann"]["entries"] == ix.store.num_vectors()
        for a, b in zip(ix.search(q, k=4, m=len(ix)), ix.search_exhaustive(q, k=4)):
            _same(a, b)
    assert len(ix) == 70


def test_hnsw_tombstones_are_filtered_and_trigger_rebuild():
    m = _model()
    feats = _features(30)
    ix = CorpusIndex.build(m, list(feats), feats.__getitem__, batch_size=8, progress=False,
                           ann={"kind": "hnsw", "hnsw_m": 8}, rebuild_fraction=0.2)
    vids = [v for v in feats if len(feats[v]) >= 3]   # three valid segments each
    dead = ix.store.num_vectors(np.array([ix.store.row_of(v) for v in vids[:2]]))
    ix.remove(vids[:2])
    assert dead == 6 and ix.info()["ann"]["tombstones"] == 6
    q = _queries(m)
    reachable = sum(1 for f in feats.values() if len(f)) - 2   # videos without frames have no vector
    res = ix.search(q, k=30, m=30)
    assert all(len(r) == reachable and not {v for v, _ in r} & set(vids[:2]) for r in res)
    ix.remove(vids[2:10])  # well over 20% of the entries dead: rebuilt without them
    assert ix.info()["ann"]["tombstones"] == 0 and ix.info()["ann"]["entries"] == ix.store.num_vectors()


def _saved(tmp_path, m):
    ix = _build(m, _features(25))
    return ix.save(str(tmp_path / "ix"))


def test_corrupt_truncated_and_mismatched_indexes_name_the_file(tmp_path):
    m = _model()
    path = _saved(tmp_path, m)
    frames = os.path.join(path, "seg-00000.frames")
    # flipped byte: checksum error naming the file (skipped with verify=False)
    data = bytearray(open(frames, "rb").read())
    data[5] ^= 0xFF
    open(frames, "wb").write(bytes(data))
    with pytest.raises(IndexFormatError, match="seg-00000.frames.*sha256"):
        CorpusIndex.load(path, model=m)
    CorpusIndex.load(path, model=m, verify=False)
    # truncation
    open(frames, "wb").write(bytes(data[:-10]))
    with pytest.raises(IndexFormatError, match="seg-00000.frames.*truncated"):
        CorpusIndex.load(path, verify=False)
    # missing file
    os.remove(frames)
    with pytest.raises(IndexFormatError, match="seg-00000.frames.*missing"):
        CorpusIndex.load(path, verify=False)


def test_version_manifest_and_model_mismatch_errors(tmp_path):
    m = _model()
    path = _saved(tmp_path, m)
    man_p = os.path.join(path, "manifest.json")
    man = json.load(open(man_p))
    # another model (different weights) or another config
    with pytest.raises(IndexMismatchError, match="weights_hash"):
        CorpusIndex.load(path, model=_model(seed=3))
    with pytest.raises(IndexMismatchError, match="config_hash"):
        CorpusIndex.load(path, model=_model(frame_sampling="segment_mean"))
    # the same model with other inference settings is fine
    CorpusIndex.load(path, model=_model().configure_inference(inference_mode="deterministic"))
    # unknown future version
    json.dump({**man, "version": 99}, open(man_p, "w"))
    with pytest.raises(IndexFormatError, match="manifest.json.*version"):
        CorpusIndex.load(path)
    # dims that do not match the stored bytes
    json.dump({**man, "dim": 16}, open(man_p, "w"))
    with pytest.raises(IndexFormatError, match="seg-00000"):
        CorpusIndex.load(path, verify=False)
    open(man_p, "w").write("{not json")
    with pytest.raises(IndexFormatError, match="manifest.json"):
        CorpusIndex.load(path)
    os.remove(man_p)
    with pytest.raises(IndexFormatError, match="manifest"):
        CorpusIndex.load(path)
    with pytest.raises(IndexFormatError, match="not found"):
        CorpusIndex.load(str(tmp_path / "nothing"))


def test_failed_save_leaves_previous_index_intact(tmp_path, monkeypatch):
    m = _model()
    path = _saved(tmp_path, m)
    ix = CorpusIndex.load(path, model=m)
    ix.remove([ix.vids[0]])
    from lavis_c2f.index import ann as ann_mod

    def boom(self, p):
        raise OSError("disk full")

    monkeypatch.setattr(ann_mod.AnnIndex, "write", boom)
    with pytest.raises(OSError, match="disk full"):
        ix.save(path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ix"]
    assert len(CorpusIndex.load(path, model=m)) == 25


def test_shard_merge_equals_single_index():
    m = _model()
    feats = _features(50)
    vids = list(feats)
    single = _build(m, feats)
    shards = [_build(m, {v: feats[v] for v in vids[i::3]}) for i in range(3)]
    q = _queries(m, q=5)
    for a, b in zip(search_shards(shards, q, k=8, m=50), single.search(q, k=8, m=50)):
        _same(a, b)


def test_sinkhorn_biases_are_stored_and_checked(tmp_path):
    m = _model(sinkhorn=True, use_frame_sentence=True, sinkhorn_temperature=0.05)
    feats = _features(30)
    ix = _build(m, feats)
    g = torch.Generator().manual_seed(9)
    bank = TextEmbedding(torch.randn(11, 8, generator=g))
    bias = ix.compute_video_bias(bank, block_videos=7)
    assert bias.shape == (30, 2)
    emb = ix.embeddings(ix.vids)
    want = m.compute_video_bias(bank, emb)
    assert np.allclose(bias, want.numpy(), atol=1e-4)
    q = _queries(m)
    direct = m.score(q, emb, video_bias=want)
    res = ix.search(q, k=4, m=30)
    order = torch.topk(direct[0], 4).indices.tolist()
    assert [v for v, _ in res[0]] == [ix.vids[i] for i in order]
    path = ix.save(str(tmp_path / "ix"))
    ix2 = CorpusIndex.load(path, model=m)
    for a, b in zip(res, ix2.search(q, k=4, m=30)):
        _same(a, b, tol=1e-3)
    m.configure_inference(sinkhorn_temperature=0.1)
    with pytest.raises(IndexMismatchError, match="sinkhorn_temperature"):
        ix2.search(q, k=4)


def test_ann_config_validation_and_defaults():
    cfg = AnnConfig()
    assert cfg.choose_kind(100) == "flat" and cfg.choose_kind(3 * 10 ** 6) == "pq"   # configs/index/ann.yaml
    assert cfg.choose_kind(2 * 10 ** 7) == "ivf" and AnnConfig(pq_max=None).choose_kind(10 ** 9) == "pq"
    assert cfg.train_size(100) == 0 and cfg.train_size(3 * 10 ** 6) == 65536
    assert cfg.train_size(2 * 10 ** 7) == 40 * 4096 and AnnConfig(kind="ivf").train_size(100) == 100
    assert cfg.nlist_for(3 * 10 ** 5) == 2048 and cfg.nlist_for(3 * 10 ** 6) == 4096
    assert cfg.nprobe_for(4096) == 512 and cfg.nprobe_for(64) == 16 and cfg.nprobe_for(2048) == 512
    assert cfg.nprobe_for(1024) == 256 and AnnConfig(ivf_nprobe=7).nprobe_for(4096) == 7
    assert cfg.codec_for(3 * 10 ** 5) == "pq4" and cfg.codec_for(3 * 10 ** 6) == "pq4"   # configs/index/ann.yaml
    assert AnnConfig(ivf_pq_from=None).codec_for(3 * 10 ** 5) == "sq8"
    assert AnnConfig(ivf_pq_from=None, ivf_sq8_from=10 ** 6).codec_for(3 * 10 ** 5) == "flat"

    with pytest.raises(ConfigError, match="kind"):
        AnnConfig(kind="lsh")
    with pytest.raises(ConfigError, match="bogus"):
        AnnConfig.from_dict({"bogus": 1})


def test_empty_videos_anywhere_in_a_segment():
    m = _model()
    feats = {"a": np.ones((3, D_IN), np.float32), "empty_mid": np.zeros((0, D_IN), np.float32),
             "b": np.full((2, D_IN), 0.5, np.float32), "empty_last": np.zeros((0, D_IN), np.float32)}
    ix = _build(m, feats)
    emb = ix.embeddings(["empty_last", "a", "empty_mid"])
    assert emb.mask.sum(1).tolist() == [0, 3, 0] and emb.frames[0].abs().sum() == 0
    res = ix.search_exhaustive(_queries(m, q=1), k=4)[0]
    assert len(res) == 4 and all(np.isfinite(s) for _, s in res)
    assert {v for v, _ in ix.search(_queries(m, q=1), k=4)[0]} == {"a", "b"}   # no vector, no candidate
    with pytest.raises(ValueError, match="prefix"):
        from lavis_c2f.models.retriever import VideoEmbedding

        ix.add(["holey"], VideoEmbedding(torch.ones(1, 3, 8), torch.tensor([[1.0, 0, 1]]), torch.zeros(1, 8)))


@pytest.mark.parametrize("io_threads", [0, 4])
def test_parallel_pread_gather_matches_memory_map(tmp_path, io_threads):
    m = _model()
    feats = _features(80)
    ix = _build(m, feats)
    path = ix.save(str(tmp_path / "ix"))
    loaded = CorpusIndex.load(path, model=m)
    loaded.io_threads = io_threads
    rows = np.random.default_rng(0).permutation(80)[:70]
    got = loaded.gather(rows)
    loaded.store.close_fds()          # the memory-map path gives the reference
    want = loaded.gather(rows)
    assert torch.equal(got.frames, want.frames) and torch.equal(got.mask, want.mask)
    loaded.close()


def test_index_scores_with_shared_noise_when_the_model_asks_for_per_pair(caplog):
    m = _model(inference_noise="per_pair")
    feats = _features(n=20)
    with caplog.at_level("WARNING"):
        ix = _build(m, feats)
    assert m.inference_noise == "shared" and "inference_noise 'shared'" in caplog.text
    q = _queries(m)
    for a, b in zip(ix.search(q, k=5, m=len(feats)), ix.search_exhaustive(q, k=5)):
        _same(a, b)


def test_gather_with_reused_scratch_buffers_equals_fresh_reads(tmp_path):
    """The re-ranking loop reuses its read and float32 buffers (dirty from the previous query):
    every gather still equals a fresh one, padding included, and pooled is the model's rule."""
    m = _model()
    feats = _features(80)
    path = _build(m, feats).save(str(tmp_path / "ix"))
    loaded = CorpusIndex.load(path, model=m)
    rng = np.random.default_rng(3)
    scratch = {}
    for size in (70, 12, 70, 1):                     # a big batch first, so later ones reuse dirty memory
        rows = rng.permutation(80)[:size]
        got = loaded.gather(rows, scratch)
        want = loaded.gather(rows)
        assert torch.equal(got.frames, want.frames) and torch.equal(got.mask, want.mask)
        assert bool((got.frames[got.mask == 0] == 0).all())
    emb = loaded.gather(np.arange(80))
    vids = list(feats)
    enc = m.encode_video(*_padded([feats[v] for v in vids]))
    assert torch.allclose(emb.pooled, enc.pooled, atol=1e-3)          # float16 storage
    loaded.close()


def _padded(arrays):
    lmax = max(1, max(len(a) for a in arrays))
    x = torch.zeros(len(arrays), lmax, D_IN)
    mask = torch.zeros(len(arrays), lmax)
    for i, a in enumerate(arrays):
        x[i, :len(a)] = torch.from_numpy(a)
        mask[i, :len(a)] = 1
    return x, mask


@pytest.mark.parametrize("ann", [{"kind": "ivf", "ivf_nlist": 4, "ivf_nprobe": 4, "ivf_codec": "pq4"}, {"kind": "pq"}])
def test_pq4_prefilter_refines_exactly_and_round_trips(tmp_path, ann):
    """4-bit fast-scan PQ candidates (every vector's code scanned, or every IVF list probed) are
    re-scored with the stored vectors: a refine window covering every vector gives the exact
    pre-filter's candidates, in its order; saved, loaded and removed like any other kind."""
    m = _model()
    feats = _features(80)
    pq = _build(m, feats, ann={**ann, "ivf_pq_m": 4, "ivf_pq_refine": 1000})
    flat = _build(m, feats)
    info = pq.info()["ann"]
    assert info["kind"] == ann["kind"] and info["codec"] == "pq4" and info["refine"] == 1000 and info["pq_m"] == 4
    assert info["trained_on"] == pq.ann_config.train_size(pq.store.num_vectors()) > 0
    q = _queries(m, q=5, seed=2)
    assert pq.candidates(q, 20) == flat.candidates(q, 20)
    path = pq.save(str(tmp_path / "pq"))
    loaded = CorpusIndex.load(path, model=m)
    assert loaded.candidates(q, 20) == pq.candidates(q, 20)
    assert loaded.search(q, k=5, m=20) == pq.search(q, k=5, m=20)
    loaded.remove([next(iter(feats))])
    assert all(next(iter(feats)) not in c for c in loaded.candidates(q, 80))
    loaded.close()
    with pytest.raises(ConfigError, match="ivf_pq_m"):
        _build(m, feats, ann={**ann, "ivf_pq_m": 3})
    with pytest.raises(ConfigError, match="ivf_codec"):
        AnnConfig.from_dict({"ivf_codec": "pq8"})
    with pytest.raises(ConfigError, match="pq_max"):
        AnnConfig.from_dict({"pq_max": 0})


def test_pq4_nprobe_policy_and_auto_codec():
    cfg = AnnConfig()
    assert cfg.nprobe_for(2048, "pq4") == 2048 and cfg.nprobe_for(4096, "pq4") == 2048
    assert cfg.nprobe_for(2048, "sq8") == 512 and AnnConfig(ivf_nprobe=7).nprobe_for(4096, "pq4") == 7
    assert AnnConfig(ivf_pq_from=10 ** 5).codec_for(3 * 10 ** 5) == "pq4"
    assert AnnConfig(ivf_pq_from=10 ** 6).codec_for(3 * 10 ** 5) == "sq8"


def test_vectors_of_ids_across_segment_files(tmp_path):
    """The pq4 refine reads pre-filter vectors by FAISS id from every segment file (a saved one
    and the rows added after loading), in the order asked, as the float16 values stored."""
    m = _model()
    ix = _build(m, _features(30))
    path = ix.save(str(tmp_path / "ix"))
    ix.close()
    ix = CorpusIndex.load(path, model=m)
    more = {f"more{i}": f for i, f in enumerate(_features(10, seed=3).values())}
    ix.add_features(list(more), more.__getitem__, progress=False)
    rows = ix.store.alive_rows()
    vec, ids = ix.store.vectors(rows)
    assert len(set(ix.store._seg[ids // ix.store.segments_per_video].tolist())) == 2
    order = np.random.default_rng(0).permutation(len(ids))
    got = ix.store.vectors_of_ids(ids[order])
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(vec[order]))
    one = ids[ix.store._seg[ids // ix.store.segments_per_video] == 0][::-1].copy()   # one file only
    pos = {int(i): k for k, i in enumerate(ids)}
    assert torch.equal(ix.store.vectors_of_ids(one), torch.from_numpy(vec[[pos[int(i)] for i in one]]))
    assert tuple(ix.store.vectors_of_ids(np.zeros(0, np.int64)).shape) == (0, ix.store.dim)
    ix.close()


def test_warm_reads_every_saved_segment_file_once(tmp_path):
    m = _model()
    ix = _build(m, _features(30))
    assert ix.warm() == 0                               # nothing saved yet: rows live in spill files
    path = ix.save(str(tmp_path / "ix"))
    ix.close()
    ix = CorpusIndex.load(path, model=m)
    want = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith((".frames", ".prefilter")))
    q = _queries(m)
    before = ix.search(q, k=4)
    assert ix.warm() == want > 0
    assert ix.search(q, k=4) == before
    ix.close()
