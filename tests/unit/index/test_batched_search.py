"""Batched stage-1 search: a batch of queries gives exactly what each query gives alone."""
import numpy as np
import pytest
import torch

from lavis_c2f.ops.batching import GEMM_MIN_ROWS, padded_index
from test_corpus_index import _build, _features, _model, _queries

ANNS = [None, {"kind": "ivf", "ivf_nlist": 4, "ivf_codec": "flat"}, {"kind": "ivf", "ivf_nlist": 4, "ivf_codec": "sq8"},
        {"kind": "ivf", "ivf_nlist": 4, "ivf_codec": "pq4", "ivf_pq_m": 4, "ivf_pq_refine": 2},
        {"kind": "pq", "ivf_pq_m": 4, "ivf_pq_refine": 2}, {"kind": "hnsw", "hnsw_m": 8}]


def test_padded_index():
    assert padded_index(1).tolist() == [0] * GEMM_MIN_ROWS
    assert padded_index(3).tolist() == [0, 1, 2] + [2] * (GEMM_MIN_ROWS - 3)
    assert padded_index(20).tolist() == list(range(20))
    with pytest.raises(ValueError):
        padded_index(0)


def test_gemm_rows_do_not_depend_on_the_other_rows():
    """The premise of ops/batching: from GEMM_MIN_ROWS rows on, a row of X @ W is the same
    whatever else X holds (one row alone takes BLAS's GEMV kernel)."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(512, 512, generator=g), torch.randn(300, 512, generator=g)
    full = x @ w.t()
    for n in (GEMM_MIN_ROWS, 37, 256):
        assert torch.equal((x[:n] @ w.t()), full[:n])
    assert torch.equal((x[padded_index(1)] @ w.t())[:1], (x[padded_index(1, 300)] @ w.t())[:1])


@pytest.mark.parametrize("ann", ANNS)
def test_batch_equals_one_query_at_a_time(ann):
    m = _model()
    ix = _build(m, _features(80), ann=ann)
    q = _queries(m, q=23, seed=4)
    for k, mm in ((5, 12), (3, 80)):
        batched = ix.search(q, k=k, m=mm)
        single = [ix.search(q[i], k=k, m=mm)[0] for i in range(len(q))]
        assert batched == single                           # same videos, order and float scores
        assert all(len(r) == k for r in batched)
        cands = ix.candidates(q, mm)
        assert cands == [ix.candidates(q[i], mm)[0] for i in range(len(q))]
        assert ix.rerank(q, cands, k) == batched


def test_batched_rerank_scores_are_the_model_scores():
    m = _model()
    feats = _features(40)
    ix = _build(m, feats)
    q = _queries(m, q=6)
    emb = ix.embeddings(list(feats))
    scores = m.score(q, emb)
    pos = {v: i for i, v in enumerate(feats)}
    for qi, res in enumerate(ix.search(q, k=7, m=20)):
        for v, s in res:
            assert s == pytest.approx(float(scores[qi, pos[v]]), abs=1e-5)


def test_queries_without_candidates_and_bad_lists():
    m = _model()
    ix = _build(m, _features(30))
    q = _queries(m, q=3)
    cands = ix.candidates(q, 6)
    out = ix.rerank(q, [cands[0], [], cands[2]], 4)
    assert out[1] == [] and out[0] == ix.rerank(q[0], [cands[0]], 4)[0] and out[2] == ix.rerank(q[2], [cands[2]], 4)[0]
    with pytest.raises(ValueError, match="2 candidate lists for 3 queries"):
        ix.rerank(q, cands[:2], 4)


def test_ucofia_style_models_without_pair_scoring_search_per_query(monkeypatch):
    """A retriever without ``score_pairs`` is re-ranked query by query with ``score``."""
    m = _model()
    ix = _build(m, _features(30))
    q = _queries(m, q=5)
    want = ix.search(q, k=4, m=10)
    monkeypatch.setattr(type(m), "score_pairs", property(lambda self: (_ for _ in ()).throw(AttributeError())))
    assert not hasattr(m, "score_pairs")
    got = ix.search(q, k=4, m=10)
    assert [[v for v, _ in r] for r in got] == [[v for v, _ in r] for r in want]
    np.testing.assert_allclose([s for r in got for _, s in r], [s for r in want for _, s in r], atol=1e-5)
