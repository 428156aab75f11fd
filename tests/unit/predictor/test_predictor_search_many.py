"""C2FPredictor.search_many: batched stage 1 and stage 2, results equal to one-by-one search."""
import numpy as np
import pytest

from lavis_c2f.models.grounder import load_grounder
from lavis_c2f.models.grounder.predictor import GrounderPredictor
from lavis_c2f.predictor import C2FPredictor

QUERIES = ["a red screen", "a gray screen", "a blue pattern moving", "a red screen", "black"]


@pytest.fixture(scope="module")
def trained(trained_index, ckpts):
    return C2FPredictor.from_checkpoints(grounder_ckpt=ckpts["grounder"], backbone="random", index=trained_index,
                                         device="cpu")


@pytest.fixture(scope="module")
def zero_shot(zs_index):
    return C2FPredictor.from_checkpoints(backbone="random", index=zs_index, device="cpu")


def _same(a, b):
    assert a.query == b.query and a.mode == b.mode
    assert [v for v, _ in a.stage1] == [v for v, _ in b.stage1]
    np.testing.assert_allclose([s for _, s in a.stage1], [s for _, s in b.stage1], rtol=0, atol=0)
    assert [(m.vid, m.rank) for m in a] == [(m.vid, m.rank) for m in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose([x.start, x.end, x.score, x.stage2_score], [y.start, y.end, y.score, y.stage2_score],
                                   rtol=1e-5, atol=1e-6)
    assert set(a.details) == set(b.details)
    for vid in a.details:
        np.testing.assert_allclose(a.details[vid].saliency, b.details[vid].saliency, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["trained", "zero_shot"])
@pytest.mark.parametrize("batch_size", [2, 256])
def test_search_many_equals_one_by_one(request, mode, batch_size):
    p = request.getfixturevalue(mode)
    many = p.search_many(QUERIES, top_k=4, stage1_top_k=3, batch_size=batch_size)
    assert len(many) == len(QUERIES)
    for i, (q, res) in enumerate(zip(QUERIES, many)):
        _same(res, p.search(q, top_k=4, stage1_top_k=3))
        start = i - i % batch_size
        assert res.timings["batch_queries"] == min(batch_size, len(QUERIES) - start)


def test_search_many_batches_stage1_and_stage2(trained, monkeypatch):
    """One index search and one grounder call for the whole batch (all (query, video) pairs)."""
    searches, grounded = [], []
    index = trained.engine.stage1.index
    orig_search, orig_pairs = type(index).search, GrounderPredictor.predict_pairs

    def spy_search(self, text_emb, *a, **kw):
        searches.append(len(text_emb))
        return orig_search(self, text_emb, *a, **kw)

    def spy_pairs(self, qs, vids, durs):
        grounded.append(len({id(q) for q in qs}))
        return orig_pairs(self, qs, vids, durs)

    monkeypatch.setattr(type(index), "search", spy_search)
    monkeypatch.setattr(GrounderPredictor, "predict_pairs", spy_pairs)
    trained.search_many(QUERIES[:3], stage1_top_k=3)
    assert searches == [3] and len(grounded) == 1 and grounded[0] == 3


def test_search_many_input_errors(trained):
    with pytest.raises(TypeError, match="list of query strings"):
        trained.search_many("a red screen")
    with pytest.raises(ValueError, match="query is empty"):
        trained.search_many(["a red screen", "   "])
    with pytest.raises(ValueError, match="top_k"):
        trained.search_many(["x"], top_k=0)
    assert trained.search_many([]) == []


def test_predict_pairs_equals_predict_many(ckpts, videos):
    grounder, _ = load_grounder(ckpts["grounder"], None, "cpu", False)
    gp = GrounderPredictor(grounder, clip_length=2.0)
    rng = np.random.default_rng(0)
    q1, q2 = rng.standard_normal((3, 16)).astype(np.float32), rng.standard_normal((7, 16)).astype(np.float32)
    vids = [rng.standard_normal((n, 16)).astype(np.float32) for n in (2, 4, 3)]
    got = gp.predict_pairs([q1, q2, q1, q2], [vids[0], vids[1], vids[2], vids[0]], [4.0, 8.0, 6.0, 4.0])
    want = gp.predict_many(q1, [vids[0], vids[2]], [4.0, 6.0]) + gp.predict_many(q2, [vids[1], vids[0]], [8.0, 4.0])
    for g, w in zip([got[0], got[2], got[1], got[3]], want):
        np.testing.assert_allclose(np.asarray(g["windows"]), np.asarray(w["windows"]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g["saliency"], w["saliency"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one of each per pair"):
        gp.predict_pairs([q1], vids, [1.0, 1.0, 1.0])
