"""Retrieval ranks/recalls, the streaming accumulator and top-k helper."""
from __future__ import annotations

import numpy as np
import pytest

from lavis_c2f.evaluation.retrieval import (RetrievalAccumulator, rank_metrics, retrieval_metrics,
                                            t2v_ranks, topk_from_scores, v2t_ranks)

# rows = queries, columns = videos; ties on purpose
SIM = np.array([[0.9, 0.1, 0.5],
                [0.2, 0.2, 0.7],
                [0.3, 0.8, 0.8],
                [0.1, 0.6, 0.4]], dtype=np.float32)
GT = np.array([0, 0, 2, 1])


def test_t2v_ranks_by_hand_with_ties():
    # q1: 0.7 beats its 0.2 (the other 0.2 is a tie, not counted); q2 ties 0.8 -> rank 1
    assert t2v_ranks(SIM, GT).tolist() == [1, 2, 1, 1]


def test_v2t_ranks_best_gt_query():
    ranks, videos = v2t_ranks(SIM, GT)
    # video 0: GT queries 0 and 1, best is q0 (0.9) -> 1; video 1: q3 (0.6), q2 has 0.8 -> 2;
    # video 2: q2 (0.8) -> 1
    assert videos.tolist() == [0, 1, 2] and ranks.tolist() == [1, 2, 1]


def test_retrieval_metrics_by_hand():
    m = retrieval_metrics(SIM, GT, ks=(1, 2))
    assert m["t2v"] == {"R@1": 75.0, "R@2": 100.0, "MdR": 1.0, "MnR": 1.25, "num": 4}
    assert m["v2t"] == {"R@1": 66.67, "R@2": 100.0, "MdR": 1.0, "MnR": 1.33, "num": 3}
    assert m["num_videos_without_query"] == 0


def test_video_without_query_is_left_out_of_v2t_but_competes_in_t2v():
    sim = np.hstack([SIM, np.array([[0.95], [0.0], [0.0], [0.0]], dtype=np.float32)])
    m = retrieval_metrics(sim, GT)
    assert m["num_videos_without_query"] == 1 and m["v2t"]["num"] == 3
    assert t2v_ranks(sim, GT).tolist() == [2, 2, 1, 1]


def test_rank_metrics_defaults_and_empty():
    m = rank_metrics([1, 3, 7, 12, 60])
    assert m == {"R@1": 20.0, "R@5": 40.0, "R@10": 60.0, "R@50": 80.0, "MdR": 7.0, "MnR": 16.6, "num": 5}
    assert rank_metrics([])["R@1"] is None and rank_metrics([])["num"] == 0


def brute_force(sim, gt):
    q, v = sim.shape
    t2v = [1 + sum(sim[i, j] > sim[i, gt[i]] for j in range(v)) for i in range(q)]
    v2t = {}
    for vid in range(v):
        owners = [i for i in range(q) if gt[i] == vid]
        if owners:
            v2t[vid] = min(1 + sum(sim[k, vid] > sim[i, vid] for k in range(q)) for i in owners)
    return t2v, v2t


def test_ranks_match_brute_force_on_random_ties():
    rng = np.random.default_rng(0)
    sim = np.round(rng.normal(size=(40, 15)), 1)   # many ties
    gt = rng.integers(0, 15, size=40)
    t2v, v2t = brute_force(sim, gt)
    assert t2v_ranks(sim, gt).tolist() == t2v
    ranks, videos = v2t_ranks(sim, gt)
    assert dict(zip(videos.tolist(), ranks.tolist())) == v2t


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accumulator_equals_full_matrix(dtype):
    rng = np.random.default_rng(1)
    q, v = 300, 60
    sim = np.round(rng.normal(size=(q, v)), 2).astype(dtype)
    gt = rng.integers(0, v, size=q)
    full = retrieval_metrics(sim, gt)
    acc = RetrievalAccumulator(num_videos=v)
    bounds = np.unique(np.r_[0, rng.integers(1, q, size=7), q])
    for s, e in zip(bounds[:-1], bounds[1:]):
        acc.add(sim[s:e], gt[s:e])
    assert acc.compute() == {"t2v": full["t2v"]}          # one pass: t2v only
    for s, e in reversed(list(zip(bounds[:-1], bounds[1:]))):   # second pass, any order
        acc.add_v2t(sim[s:e])
    assert acc.compute() == full
    np.testing.assert_array_equal(acc.t2v_ranks(), t2v_ranks(sim, gt))
    ranks, videos = acc.v2t_ranks()
    ref_ranks, ref_videos = v2t_ranks(sim, gt)
    np.testing.assert_array_equal(videos, ref_videos)
    np.testing.assert_array_equal(ranks, ref_ranks)


def test_accumulator_misuse_raises():
    acc = RetrievalAccumulator(num_videos=3)
    with pytest.raises(RuntimeError, match="first pass"):
        acc.add_v2t(SIM)
    acc.add(SIM[:2], GT[:2])
    acc.add(SIM[2:], GT[2:])
    with pytest.raises(ValueError, match="columns"):
        acc.add(SIM[:, :2], GT[:1])
    with pytest.raises(ValueError, match="dtype"):
        acc.add(SIM.astype(np.float64), GT)
    acc.add_v2t(SIM[:3])
    with pytest.raises(RuntimeError, match="second pass"):
        acc.v2t_ranks()
    with pytest.raises(RuntimeError, match="add\\(\\) after add_v2t"):
        acc.add(SIM, GT)
    with pytest.raises(ValueError, match="more than"):
        acc.add_v2t(SIM)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        t2v_ranks(np.array([[np.nan, 1.0]]), [0])
    with pytest.raises(ValueError, match=r"gt_video\[1\] = 5"):
        t2v_ranks(SIM[:2], [0, 5])
    with pytest.raises(ValueError, match="shape"):
        t2v_ranks(SIM, GT[:2])
    with pytest.raises(ValueError, match="matrix"):
        t2v_ranks(SIM[0], GT[:1])


def test_topk_from_scores_ties_and_clipping():
    vids = ["a", "b", "c", "d"]
    rows = topk_from_scores(np.array([[0.1, 0.5, 0.5, 0.2], [0.4, 0.3, 0.2, 0.1]]), vids, 2)
    assert rows == [[["b", 0.5], ["c", 0.5]], [["a", 0.4], ["b", 0.3]]]
    # a tie at the k boundary keeps the lower column index
    assert topk_from_scores(np.array([0.9, 0.5, 0.7, 0.7]), vids, 2) == [["a", 0.9], ["c", 0.7]]
    assert [v for v, _ in topk_from_scores(np.array([0.1, 0.3, 0.2, 0.0]), vids, 10)] == ["b", "c", "a", "d"]
    with pytest.raises(ValueError, match="vids"):
        topk_from_scores(np.zeros((1, 3)), vids, 2)


def test_topk_matches_full_sort_on_random_data():
    rng = np.random.default_rng(2)
    sim = np.round(rng.normal(size=(20, 50)), 1)
    vids = [f"v{j}" for j in range(50)]
    for row, ranked in zip(sim, topk_from_scores(sim, vids, 7)):
        order = sorted(range(50), key=lambda j: (-row[j], j))[:7]
        assert ranked == [[vids[j], float(row[j])] for j in order]


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    assert t2v_ranks(torch.from_numpy(SIM), torch.from_numpy(GT)).tolist() == [1, 2, 1, 1]
