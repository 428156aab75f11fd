"""c2f_video_retrieval: exact sharded metrics, block-size and Sinkhorn-bank invariance, outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from c2f_task_helpers import build_splits, make_corpus, tiny_retriever


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = make_corpus(tmp_path_factory.mktemp("corpus") / "demo")
    return build_splits(root, "video_retrieval")


def _task(splits, **options):
    from lavis_c2f.tasks.video_retrieval import VideoRetrievalTask

    task = VideoRetrievalTask(**options)
    task.show_progress = False
    task.datasets = {"c2f_demo": splits}
    return task


def test_sharded_metrics_equal_full_matrix():
    from lavis_c2f.evaluation.retrieval import retrieval_metrics
    from lavis_c2f.tasks.video_retrieval import ShardedRetrievalMetrics

    rng = np.random.default_rng(0)
    q, v = 37, 11
    sim = rng.integers(0, 6, size=(q, v)).astype(np.float32)   # many ties
    gt = rng.integers(0, v - 1, size=q)                          # video v-1 is nobody's GT
    acc = ShardedRetrievalMetrics(v, (1, 5, 10, 50))
    blocks = [(0, 5), (5, 6), (6, 20), (20, 37)]
    for a, b in blocks:
        acc.add(sim[a:b], gt[a:b])
    acc.sync()
    for a, b in reversed(blocks):
        acc.add_v2t(sim[a:b])
    got = acc.compute()
    ref = retrieval_metrics(sim, gt, (1, 5, 10, 50))
    assert got["t2v"] == ref["t2v"] and got["v2t"] == ref["v2t"]
    assert got["num_videos_without_query"] == ref["num_videos_without_query"] == 1
    with pytest.raises(RuntimeError):
        ShardedRetrievalMetrics(v).add_v2t(sim)


def test_evaluation_is_exact_and_block_invariant(splits, tmp_path):
    from lavis_c2f.evaluation.retrieval import retrieval_metrics
    from lavis_c2f.models.retriever.embeddings import TextEmbedding

    ds = splits["train"]
    model = tiny_retriever()
    small = _task(splits, query_block_size=1, video_block_size=3, stage1_top_k=4, eval_cache_mb=0)
    big = _task(splits, query_block_size=64, video_block_size=64, stage1_top_k=4)
    a = small.evaluation(model, None, dataset=ds)
    b = big.evaluation(model, None, dataset=ds)
    assert a["metrics"] == b["metrics"] and a["baseline"] == b["baseline"]
    assert [r["qid"] for r in a["rows"]] == [r.qid for r in ds.queries]
    for ra, rb in zip(a["rows"], b["rows"]):
        assert [v for v, _ in ra["ranked_vids"]] == [v for v, _ in rb["ranked_vids"]]
        np.testing.assert_allclose([s for _, s in ra["ranked_vids"]], [s for _, s in rb["ranked_vids"]], rtol=1e-5, atol=1e-6)
    # the same numbers as the full (Q, V) matrix through the reference metric function
    with torch.no_grad():
        vb = ds.video_batch(list(range(ds.num_videos)))
        video = model.encode_video(vb["src_vid"], vb["src_vid_mask"])
        qb = ds.query_batch(list(range(len(ds))))
        text = model.encode_text(qb["src_txt"], qb["src_txt_mask"], qb["txt_pooled"])
        sim = model.score(text, video).numpy()
    ref = retrieval_metrics(sim, qb["gt_video_index"].numpy(), (1, 4, 5, 10, 50))
    for d in ("t2v", "v2t"):
        for k in ("R@1", "R@5", "R@10", "MdR", "MnR"):
            assert b["metrics"][d][k] == ref[d][k], (d, k)
    # top-K rows are the matrix's best columns
    vids = ds.videos
    for qi in (0, len(ds) - 1):
        order = np.argsort(-sim[qi], kind="stable")[:4]
        assert [v for v, _ in b["rows"][qi]["ranked_vids"]] == [vids[j] for j in order]


def test_sinkhorn_uses_a_fixed_bank(splits):
    model = tiny_retriever(sinkhorn=True)
    ds = splits["val"]
    r1 = _task(splits, query_block_size=1, stage1_top_k=3).evaluation(model, None, dataset=ds)
    r2 = _task(splits, query_block_size=50, stage1_top_k=3).evaluation(model, None, dataset=ds)
    assert r1["metrics"] == r2["metrics"] and r1["sinkhorn_bank"] == "train"
    for ra, rb in zip(r1["rows"], r2["rows"]):
        assert [v for v, _ in ra["ranked_vids"]] == [v for v, _ in rb["ranked_vids"]]
    # the bias really enters the scores: the eval-split bank gives other scores
    r3 = _task(splits, sinkhorn_bank="eval", stage1_top_k=3).evaluation(model, None, dataset=ds)
    s1 = [s for r in r1["rows"] for _, s in r["ranked_vids"]]
    s3 = [s for r in r3["rows"] for _, s in r["ranked_vids"]]
    assert not np.allclose(s1, s3)
    from lavis_c2f.common.errors import ConfigError

    with pytest.raises(ConfigError, match="sinkhorn_bank"):
        _task({"val": ds}).evaluation(model, None, dataset=ds)


def test_after_evaluation_writes_ranks_and_metrics(splits, tmp_path):
    from lavis_c2f.common.errors import ConfigError

    ds = splits["test"]
    task = _task(splits, stage1_top_k=5)
    res = task.evaluation(tiny_retriever(), None, dataset=ds)
    out = task.after_evaluation(res, "test", "best", dataset=ds, result_dir=str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "test_best_ranks.jsonl").read_text().splitlines()]
    assert len(rows) == len(ds)
    assert set(rows[0]) == {"qid", "query", "ranked_vids"}
    assert all(len(r["ranked_vids"]) == min(5, ds.num_videos) for r in rows)
    assert all(isinstance(v, str) and isinstance(s, float) for r in rows for v, s in r["ranked_vids"])
    assert all(r["ranked_vids"][i][1] >= r["ranked_vids"][i + 1][1] for r in rows for i in range(len(r["ranked_vids"]) - 1))
    metrics = json.loads((tmp_path / "test_best_metrics.json").read_text())
    assert metrics["agg_metric"] == "t2v_rsum"
    assert out["agg_metrics"] == pytest.approx(out["t2v_R@1"] + out["t2v_R@5"] + out["t2v_R@10"], abs=0.011)
    assert "baseline_t2v_R@1" in out and "v2t_MdR" in out and "t2v_R@5" in out
    assert not list(tmp_path.glob(".*.tmp"))                          # atomic writes leave no temp files
    with pytest.raises(ConfigError, match="agg_metric"):
        _task(splits, agg_metric="t2v_R@2").after_evaluation(res, "test", 0, dataset=ds, result_dir=str(tmp_path))


def test_baseline_slice_and_options():
    from lavis_c2f.common.errors import ConfigError
    from lavis_c2f.tasks.video_retrieval import VideoRetrievalTask

    for bad in ({"stage1_top_k": 0}, {"sinkhorn_bank": "test"}, {"baseline_video_columns": [4, 2]},
                {"baseline": "yes"}, {"query_block_size": 1.5}, {"nope": 1}):
        with pytest.raises(ConfigError):
            VideoRetrievalTask(**bad)
    t = VideoRetrievalTask(baseline_video_columns=[2, 6])
    assert tuple(t._baseline_cols(torch.zeros(1, 3, 10)).shape) == (1, 3, 4)
    with pytest.raises(ConfigError, match="exceed"):
        VideoRetrievalTask(baseline_video_columns=[2, 16])._baseline_cols(torch.zeros(1, 3, 10))


def test_per_pair_noise_and_dsl_are_block_invariant_and_exact(splits):
    from lavis_c2f.evaluation.retrieval import dual_softmax, rank_metrics, t2v_ranks

    ds = splits["val"]
    model = tiny_retriever(inference_noise="per_pair")
    a = _task(splits, query_block_size=1, video_block_size=2, stage1_top_k=3, eval_cache_mb=0,
              dsl=True).evaluation(model, None, dataset=ds)
    b = _task(splits, query_block_size=64, stage1_top_k=3, dsl=True).evaluation(model, None, dataset=ds)
    assert a["metrics"] == b["metrics"] and a["dsl"] == b["dsl"]
    with torch.no_grad():                         # the whole matrix at once, text ids = query positions
        vb = ds.video_batch(list(range(ds.num_videos)))
        qb = ds.query_batch(list(range(len(ds))))
        sim = model.score(model.encode_text_batch(qb), model.encode_video_batch(vb)).numpy()
    gt = qb["gt_video_index"].numpy()
    ks = (1, 3, 5, 10, 50)
    assert b["metrics"]["t2v"] == rank_metrics(t2v_ranks(sim, gt), ks)
    assert b["dsl"]["t2v"] == rank_metrics(t2v_ranks(dual_softmax(sim), gt), ks)
    shared = _task(splits, stage1_top_k=3).evaluation(model.configure_inference(inference_noise="shared"), None,
                                                      dataset=ds)
    assert shared["dsl"] is None
    s_pp = [s for r in b["rows"] for _, s in r["ranked_vids"]]
    s_sh = [s for r in shared["rows"] for _, s in r["ranked_vids"]]
    assert not np.allclose(s_pp, s_sh)
