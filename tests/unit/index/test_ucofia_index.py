"""A corpus index of UCoFiA videos: patch tokens stored (float16 by default) through the model's
video-terms hook, SK-norm biases computed once at build and stored, search = exact UCoFiA scores."""
import numpy as np
import pytest
import torch

from lavis_c2f.index import CorpusIndex
from lavis_c2f.models.retriever import UCoFiAVideo

from ucofia_helpers import F, K, random_texts, random_videos, tiny_ucofia


@pytest.fixture(scope="module")
def corpus():
    model = tiny_ucofia()
    videos = random_videos(40)
    vids = [f"v{i:02d}" for i in range(40)]
    return model, videos, vids


def same(a, b):
    for ra, rb in zip(a, b):
        assert [v for v, _ in ra] == [v for v, _ in rb]
        np.testing.assert_allclose([s for _, s in ra], [s for _, s in rb], rtol=1e-5, atol=1e-5)


def _index(model, videos, vids, **kw):
    ix = CorpusIndex.for_model(model, **kw)
    ix.add(vids, videos)
    ix.compute_video_bias(random_texts(12, seed=5))
    return ix


def test_search_is_exact_ucofia_with_the_stored_sk_norm_bias(corpus, tmp_path):
    model, videos, vids = corpus
    ix = _index(model, videos, vids, frame_dtype="float32")
    assert ix.max_frames == 2 + F * (1 + K)
    bank = random_texts(12, seed=5)
    with torch.no_grad():
        bias = model.sinkhorn_video_bias(model.level_logits(bank, videos))                  # (3, V), once
        ref = model.ucofia_scores(random_texts(3), videos, video_bias=bias)
    torch.testing.assert_close(torch.from_numpy(ix._bias), bias.t(), rtol=1e-6, atol=1e-6)
    queries = random_texts(3)
    hits = ix.search(queries, k=5, m=len(vids))
    for q, row in enumerate(hits):
        order = torch.argsort(-ref[q], stable=True)[:5]
        assert [v for v, _ in row] == [vids[i] for i in order]
        np.testing.assert_allclose([s for _, s in row], ref[q, order].numpy(), rtol=1e-5, atol=1e-5)
    same(ix.search_exhaustive(queries, k=5, block_videos=7), hits)
    # stored and reloaded: same biases, same results (frames memory-mapped)
    ix.save(str(tmp_path / "ix"))
    back = CorpusIndex.load(str(tmp_path / "ix"), model=model)
    same(back.search(queries, k=5, m=len(vids)), hits)


def test_float16_patch_rows_and_the_gathered_embedding(corpus):
    model, videos, vids = corpus
    ix = _index(model, videos, vids)                                                     # float16 rows
    got = ix.embeddings(vids[:5])
    assert isinstance(got, UCoFiAVideo)
    torch.testing.assert_close(got.mask, videos.mask[:5])
    torch.testing.assert_close(got.patches, videos.patches[:5], rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(got.frames, videos.frames[:5], rtol=1e-3, atol=1e-2)
    q = random_texts(2)
    with torch.no_grad():
        exact = model.score(q, videos, video_bias=torch.from_numpy(ix._bias))
    for i, row in enumerate(ix.search(q, k=3, m=len(vids))):
        np.testing.assert_allclose([s for _, s in row], sorted(exact[i].numpy(), reverse=True)[:3], rtol=1e-2)


def test_prefilter_is_the_video_sentence_direction(corpus):
    model, videos, vids = corpus
    ix = _index(model, videos, vids, prefilter_segments=2)
    q = random_texts(2)
    with torch.no_grad():
        vs = model.level_logits(q, videos)[0]                 # s (t Wg)(v Wg1)^T
    pre = model.prefilter_query(q) @ model.prefilter_vectors(videos).t()
    scale = float(model.clip.logit_scale.detach().exp())
    torch.testing.assert_close(scale * pre, vs, rtol=1e-4, atol=1e-4)
    assert ix.store.num_vectors() == len(vids)              # one vector per video, the 2nd segment empty
    top = [v for v, _ in ix.search(q[:1], k=1, m=1)[0]]
    assert top == [vids[int(torch.argmax(vs[0]))]]


def test_milvus_backend_stores_the_video_terms_and_scores_alike(corpus, tmp_path):
    """UCoFiA's frames + patch tokens go through the same video-terms hook into a Milvus
    collection (one FLOAT_VECTOR of the stored rows); both backends give the same ranking without
    stored SK-norm biases (zero bias) and with the biases of one query bank."""
    pytest.importorskip("milvus_lite")
    from lavis_c2f.index.milvus_index import MilvusIndex

    model, videos, vids = corpus
    fx = CorpusIndex.for_model(model)
    fx.add(vids, videos)
    mx = MilvusIndex.create(f"{tmp_path}/u.db#ucofia", model)
    mx.add(vids, videos)
    assert mx.max_frames == fx.max_frames == 2 + F * (1 + K)
    q = random_texts(3, seed=9)
    same(fx.search(q, k=6, m=len(vids)), mx.search(q, k=6, m=len(vids)))
    assert fx.candidates(q, 10) == mx.candidates(q, 10)
    # with the SK-norm biases of one query bank stored in each: the same biases, the same scores
    bank = random_texts(12, seed=5)
    np.testing.assert_allclose(mx.compute_video_bias(bank, block_videos=16), fx.compute_video_bias(bank),
                               rtol=1e-6, atol=1e-6)
    same(fx.search(q, k=6, m=len(vids)), mx.search(q, k=6, m=len(vids)))
