import numpy as np
import pytest

from lavis_c2f.models.refiner.keyframes import (candidate_times, kmeans, select_key_frames,
                                                thumbnail_features, uniform_key_frames)


def blobs(seed=0, sizes=(5, 7, 4), d=6, spread=0.05):
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[: len(sizes)] * 10
    return np.concatenate([c + spread * rng.standard_normal((n, d)) for c, n in zip(centres, sizes)])


def test_candidate_times():
    np.testing.assert_allclose(candidate_times(10, 20, 5), [11, 13, 15, 17, 19])
    with pytest.raises(ValueError):
        candidate_times(5, 4, 3)
    with pytest.raises(ValueError):
        candidate_times(0, 1, 0)


def test_kmeans_is_deterministic_and_finds_blobs():
    x = blobs()
    c1, l1 = kmeans(x, 3, seed=3)
    c2, l2 = kmeans(x, 3, seed=3)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(c1, c2)
    assert len(set(l1[:5])) == len(set(l1[5:12])) == len(set(l1[12:])) == 1
    assert len(set(l1)) == 3


def test_select_one_frame_per_event_sorted():
    x = blobs()
    idx = select_key_frames(x, 3, seed=0)
    assert idx.dtype == np.int64 and list(idx) == sorted(idx)
    assert np.digitize(idx, [5, 12]).tolist() == [0, 1, 2]  # one frame per event
    # each chosen frame is the one nearest its blob's mean
    for i, (a, b) in zip(idx, ((0, 5), (5, 12), (12, 16))):
        mean = x[a:b].mean(0)
        assert i == a + int(np.argmin(((x[a:b] - mean) ** 2).sum(1)))


def test_select_is_deterministic_under_seed_and_returns_n():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 8))
    a = select_key_frames(x, 12, seed=7)
    b = select_key_frames(x, 12, seed=7)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 12 and len(set(a.tolist())) == 12 and np.all(np.diff(a) > 0)


def test_fewer_frames_than_clusters():
    x = np.random.default_rng(0).standard_normal((5, 4))
    np.testing.assert_array_equal(select_key_frames(x, 12), np.arange(5))
    np.testing.assert_array_equal(select_key_frames(x[:0].reshape(0, 4), 3), np.arange(0))


def test_identical_frames_still_give_n_distinct_sorted():
    x = np.ones((10, 3))
    idx = select_key_frames(x, 4, seed=0)
    assert len(idx) == 4 and len(set(idx.tolist())) == 4 and list(idx) == sorted(idx)


def test_bad_inputs():
    with pytest.raises(ValueError):
        select_key_frames(np.zeros(5), 2)
    with pytest.raises(ValueError):
        select_key_frames(np.zeros((5, 2)), 0)
    with pytest.raises(ValueError):
        kmeans(np.full((4, 2), np.nan), 2)


def test_uniform_key_frames():
    np.testing.assert_array_equal(uniform_key_frames(10, 5), [1, 3, 5, 7, 9])
    np.testing.assert_array_equal(uniform_key_frames(3, 5), [0, 1, 2])


def test_thumbnail_features():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (3, 20, 30, 3), dtype=np.uint8)
    f = thumbnail_features(frames, size=4)
    assert f.shape == (3, 48)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-6)
    # brightness shift does not change the features
    np.testing.assert_allclose(thumbnail_features(frames.astype(float) * 0.5 + 20, 4), f, atol=1e-6)
    with pytest.raises(ValueError):
        thumbnail_features(np.zeros((2, 5, 5)))
