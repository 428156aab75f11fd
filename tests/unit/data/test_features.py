"""Feature stores (npz / hdf5 / webdataset), conversion, loaders."""
from __future__ import annotations

import os
import pickle
import tarfile
import time

import numpy as np
import pytest
import torch

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.data.features import (FeatureNotFoundError, Hdf5Store, NpzDirStore, TextFeatureLoader,
                                     VideoFeatureLoader, WdsStore, combine_video_streams, convert_store,
                                     open_store, save_npz_deterministic, tef_columns, write_wds_shards)


def _video_dir(tmp_path, n=5, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    root = tmp_path / "clip_features"
    root.mkdir()
    data = {}
    for i in range(n):
        vid = f"vid_{i}.0_{i + 150}.0"  # QVHighlights-like ids with dots
        arr = rng.standard_normal((3 + i, dim)).astype(np.float32)
        np.savez(root / f"{vid}.npz", features=arr)
        data[vid] = arr
    return root, data


def _text_dir(tmp_path, n=4, dim=6, seed=1):
    rng = np.random.default_rng(seed)
    root = tmp_path / "clip_text_features"
    root.mkdir()
    data = {}
    for q in range(n):
        tok = rng.standard_normal((2 + q, dim)).astype(np.float32)
        pooled = rng.standard_normal(dim).astype(np.float32)
        np.savez(root / f"qid{q}.npz", last_hidden_state=tok, pooler_output=pooled)
        data[q] = (tok, pooled)
    return root, data


# --------------------------------------------------------------------------- npz folder


def test_npz_store_basics(tmp_path):
    root, data = _video_dir(tmp_path)
    with NpzDirStore(root) as store:
        assert len(store) == 5 and store.keys() == sorted(data)
        vid = "vid_2.0_152.0"
        assert vid in store and "nope" not in store and 3 not in store
        got = store.get(vid)
        assert got.dtype == np.float32 and np.array_equal(got, data[vid])
        assert store.num_rows(vid) == 5
        with pytest.raises(KeyError) as ei:
            store.get("vid_2.0_152.1")
        msg = str(ei.value)
        assert isinstance(ei.value, FeatureNotFoundError)
        assert str(root) in msg and "'vid_2.0_152.1'" in msg and "closest key: 'vid_2.0_152.0'" in msg


def test_npz_store_is_lazy_and_cache(tmp_path):
    root, data = _video_dir(tmp_path, n=2)
    vid = sorted(data)[0]
    lazy = NpzDirStore(root)
    cached = NpzDirStore(root, cache_size=1)
    assert np.array_equal(cached.get(vid), data[vid])
    np.savez(root / f"{vid}.npz", features=np.ones((2, 8), np.float32))
    assert np.array_equal(lazy.get(vid), np.ones((2, 8)))        # reads the file at access time
    assert np.array_equal(cached.get(vid), data[vid])             # served from the LRU cache
    cached.get(sorted(data)[1])                                   # evicts the first key
    assert np.array_equal(cached.get(vid), np.ones((2, 8)))


def test_npz_store_fields_and_npy(tmp_path):
    root, data = _text_dir(tmp_path)
    store = NpzDirStore(root, field="last_hidden_state")
    assert store.keys() == ["qid0", "qid1", "qid2", "qid3"]
    assert np.array_equal(store.get("qid1"), data[1][0])
    assert np.array_equal(store.get("qid1", "pooler_output"), data[1][1])
    assert set(store.get_all("qid1")) == {"last_hidden_state", "pooler_output"}
    with pytest.raises(DataFormatError, match="no field 'pooled'"):
        store.get("qid1", "pooled")
    prefixed = NpzDirStore(root, field="pooler_output", key_format="qid{key}.npz")
    assert prefixed.keys() == ["0", "1", "2", "3"]
    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "a.npy", np.arange(6, dtype=np.float64).reshape(3, 2))
    s = open_store(str(npy))
    assert isinstance(s, NpzDirStore) and s.key_format == "{key}.npy"
    assert s.get("a").dtype == np.float32 and s.num_rows("a") == 3
    assert s.get("a", "anything").shape == (3, 2)  # a plain array answers every field


def test_open_store_specs(tmp_path):
    root, _ = _video_dir(tmp_path, n=1)
    assert isinstance(open_store({"type": "npz", "path": str(root)}), NpzDirStore)
    rel = open_store({"path": "clip_features"}, base=tmp_path)
    assert rel.path == str(root)
    with pytest.raises(ConfigError, match="unknown key"):
        open_store({"type": "npz", "path": str(root), "fields": "x"})
    with pytest.raises(ConfigError, match="unknown store type"):
        open_store({"type": "zarr", "path": str(root)})
    with pytest.raises(ConfigError, match="missing key 'path'"):
        open_store({"type": "npz"})
    with pytest.raises(DataFormatError, match="not found"):
        open_store({"type": "npz", "path": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="key_format"):
        NpzDirStore(root, key_format="{key}.txt")


# --------------------------------------------------------------------------- hdf5


def test_hdf5_store_and_pickle(tmp_path):
    import h5py

    p = tmp_path / "clip.h5"
    rng = np.random.default_rng(0)
    with h5py.File(p, "w") as f:
        f.create_dataset("v1", data=rng.standard_normal((4, 3)))
        g = f.create_group("qid7")
        g.create_dataset("last_hidden_state", data=np.ones((2, 3)))
        g.create_dataset("pooler_output", data=np.zeros(3))
    store = open_store(str(p))
    assert isinstance(store, Hdf5Store) and store.keys() == ["qid7", "v1"]
    assert store.get("v1").dtype == np.float32 and store.num_rows("v1") == 4
    assert np.array_equal(store.get("qid7", "pooler_output"), np.zeros(3))
    with pytest.raises(KeyError, match="clip.h5"):
        store.get("v2")
    clone = pickle.loads(pickle.dumps(store))  # the handle is not pickled; reopened lazily
    assert clone._h5 is None and np.array_equal(clone.get("v1"), store.get("v1"))
    store.close()
    assert np.array_equal(store.get("v1"), clone.get("v1"))  # reopens after close


class _KeysDataset(torch.utils.data.Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        return torch.from_numpy(self.store.get(self.store.keys()[i]))


def test_hdf5_store_in_forked_workers(tmp_path):
    import h5py

    p = tmp_path / "s.h5"
    with h5py.File(p, "w") as f:
        for i in range(6):
            f.create_dataset(f"k{i}", data=np.full((2, 2), i, np.float32))
    store = Hdf5Store(p)
    store.get("k0")  # opened in the parent before the workers fork
    loader = torch.utils.data.DataLoader(_KeysDataset(store), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork")
    vals = torch.cat([b[:, 0, 0] for b in loader]).tolist()
    assert vals == [0, 1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- webdataset


def test_wds_write_and_random_access(tmp_path):
    rng = np.random.default_rng(3)
    items = [(f"v{i}.5", rng.standard_normal((i + 1, 4)).astype(np.float32)) for i in range(7)]
    items.append(("q9", {"last_hidden_state": np.ones((2, 4), np.float32), "pooler_output": np.zeros(4, np.float32)}))
    paths = write_wds_shards(items, str(tmp_path / "shards" / "s-%04d.tar"), maxcount=3)
    assert [os.path.basename(p) for p in paths] == ["s-0000.tar", "s-0001.tar", "s-0002.tar"]
    with tarfile.open(paths[0]) as tf:
        assert tf.getnames() == ["v0.5.npy", "v1.5.npy", "v2.5.npy"]
    store = WdsStore(str(tmp_path / "shards" / "s-{0000..0002}.tar"))
    assert sorted(store.keys()) == sorted(k for k, _ in items)
    for k, v in reversed(items[:-1]):  # random (reverse) order
        assert np.array_equal(store.get(k), v)
    assert np.array_equal(store.get("q9", "pooler_output"), np.zeros(4))
    with pytest.raises(KeyError, match="closest key: 'v1.5'"):
        store.get("v1.6")
    for p in paths:
        assert os.path.isfile(p + ".c2f-index.json")
    # bytes are deterministic
    again = write_wds_shards(items, str(tmp_path / "again" / "s-%04d.tar"), maxcount=3)
    assert all(open(a, "rb").read() == open(b, "rb").read() for a, b in zip(paths, again))
    clone = pickle.loads(pickle.dumps(store))
    assert np.array_equal(clone.get("v3.5"), items[3][1])


def test_wds_index_cache_invalidated(tmp_path):
    shard_dir = tmp_path / "wds"
    p = write_wds_shards([("a", np.zeros((1, 2), np.float32))], str(shard_dir / "x-%02d.tar"))[0]
    assert WdsStore(str(shard_dir)).get("a").shape == (1, 2)
    idx = p + ".c2f-index.json"
    first = os.path.getmtime(idx)
    time.sleep(0.01)
    write_wds_shards([("a", np.ones((3, 2), np.float32)), ("b", np.ones((1, 2), np.float32))],
                     str(shard_dir / "x-%02d.tar"))
    store = WdsStore(str(shard_dir))
    assert store.keys() == ["a", "b"] and store.get("a").shape == (3, 2)
    assert os.path.getmtime(idx) >= first
    # a cache that matches size/mtime is used as is
    assert WdsStore([p]).keys() == ["a", "b"]


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("chain", [("wds", "hdf5", "npz"), ("hdf5", "wds", "npz")])
def test_convert_round_trip_all_formats(tmp_path, chain):
    vroot, vdata = _video_dir(tmp_path)
    troot, tdata = _text_dir(tmp_path)
    for src_root, field in ((vroot, "features"), (troot, "last_hidden_state")):
        src = {"type": "npz", "path": str(src_root), "field": field}
        for i, t in enumerate(chain):
            ext = ".h5" if t == "hdf5" else ""
            dst = {"type": t, "path": str(tmp_path / f"{src_root.name}_{i}_{t}{ext}")}
            if t == "wds":
                dst["maxcount"] = 2
            store = convert_store(src, dst, progress=False)
            assert store.type_name == t
            src = store
        orig = open_store({"type": "npz", "path": str(src_root), "field": field})
        assert src.keys() == orig.keys()
        for k in orig.keys():
            a, b = orig.get_all(k), src.get_all(k)
            assert set(a) == set(b) and all(np.array_equal(a[f], b[f]) for f in a)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_convert_refuses_existing_and_is_atomic(tmp_path):
    vroot, _ = _video_dir(tmp_path, n=3)
    dst = {"type": "npz", "path": str(tmp_path / "out")}
    convert_store(str(vroot), dst, progress=False)
    with pytest.raises(FileExistsError):
        convert_store(str(vroot), dst, progress=False)
    # a failing conversion leaves neither output nor temp files
    with pytest.raises(KeyError):
        convert_store(str(vroot), {"type": "hdf5", "path": str(tmp_path / "bad.h5")},
                      keys=["vid_0.0_150.0", "missing"], progress=False)
    assert not (tmp_path / "bad.h5").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    convert_store(str(vroot), dst, overwrite=True, progress=False)
    assert len(NpzDirStore(tmp_path / "out")) == 3


def test_convert_cli(tmp_path):
    from lavis_c2f.cli import main

    vroot, data = _video_dir(tmp_path, n=3)
    out = tmp_path / "v.h5"
    assert main(["convert", "--src", str(vroot), "--dst", str(out), "--no-progress"]) == 0
    assert main(["convert", "--src", str(out), "--dst",
                 '{"type": "wds", "path": "%s", "maxcount": 2}' % (tmp_path / "w"), "--no-progress"]) == 0
    s = open_store(str(tmp_path / "w"))
    assert isinstance(s, WdsStore) and len(s.shards) == 2
    assert all(np.array_equal(s.get(k), v) for k, v in data.items())
    assert main(["convert", "--src", str(vroot), "--dst", str(out), "--no-progress"]) == 1  # exists


def test_save_npz_deterministic(tmp_path):
    arrs = {"a": np.arange(5, dtype=np.float32), "b": np.ones((2, 2), np.float32)}
    import zipfile

    save_npz_deterministic(tmp_path / "x.npz", arrs)
    save_npz_deterministic(tmp_path / "y.npz", arrs)
    assert (tmp_path / "x.npz").read_bytes() == (tmp_path / "y.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "x.npz") as zf:  # no wall-clock timestamps inside
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    with np.load(tmp_path / "x.npz") as z:
        assert np.array_equal(z["b"], arrs["b"])


# --------------------------------------------------------------------------- loaders


def _hand_l2(x):
    return x / (np.sqrt((x.astype(np.float64) ** 2).sum(-1, keepdims=True)) + 1e-5)


def test_video_loader_matches_hand_computation(tmp_path):
    rng = np.random.default_rng(5)
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    s1.mkdir(), s2.mkdir()
    a = rng.standard_normal((6, 4)).astype(np.float32) * 3
    b = rng.standard_normal((5, 3)).astype(np.float32)  # one clip shorter: cut to 5
    np.savez(s1 / "v.npz", features=a)
    np.savez(s2 / "v.npz", features=b)
    loader = VideoFeatureLoader([NpzDirStore(s1), NpzDirStore(s2)], normalize=True, max_len=None, use_tef=True)
    out = loader.load("v")
    L = 5
    expect = np.concatenate([_hand_l2(a[:L]), _hand_l2(b[:L]),
                             np.arange(L)[:, None] / L + np.array([[0.0, 1.0 / L]])], axis=1)
    assert out.shape == (5, 4 + 3 + 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[:, -2:], [[0, .2], [.2, .4], [.4, .6], [.6, .8], [.8, 1.0]], atol=1e-7)
    # truncation happens before the TEF: TEF is computed from the kept length
    short = VideoFeatureLoader([NpzDirStore(s1), NpzDirStore(s2)], max_len=2).load("v")
    np.testing.assert_allclose(short[:, -2:], [[0, .5], [.5, 1.0]], atol=1e-7)
    np.testing.assert_allclose(short[:, :7], expect[:2, :7], atol=1e-6)
    raw = VideoFeatureLoader([NpzDirStore(s1)], normalize=False, use_tef=False).load("v")
    assert np.array_equal(raw, a)
    assert "v" in loader and "w" not in loader
    with pytest.raises(KeyError):
        loader.load("w")


def test_tef_and_combine_edge_cases():
    np.testing.assert_allclose(tef_columns(1), [[0.0, 1.0]])
    assert tef_columns(0).shape == (0, 2)
    z = combine_video_streams([np.zeros((3, 2), np.float32)])  # zero vectors stay zero (eps)
    assert np.array_equal(z[:, :2], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="must be"):
        combine_video_streams([np.zeros(3)])


def test_text_loader(tmp_path):
    root, data = _text_dir(tmp_path)
    loader = TextFeatureLoader(NpzDirStore(root, field="last_hidden_state"), field="last_hidden_state",
                               max_len=3, normalize=True)
    tok = loader.load(3)
    assert tok.shape == (3, 6)
    np.testing.assert_allclose(tok, _hand_l2(data[3][0][:3]), atol=1e-6)
    pooled = loader.load(2, field="pooler_output")
    np.testing.assert_allclose(pooled, _hand_l2(data[2][1]), atol=1e-6)
    assert 1 in loader and 9 not in loader
    with pytest.raises(KeyError, match="qid9"):
        loader.load(9)
