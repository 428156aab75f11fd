"""The query side of the Milvus backend as a long-running service needs it (embedded milvus-lite;
the same code against a ``milvus-lite server`` and two replicas: tests/unit/serve/test_serve_replicas_milvus.py):
a collection released by the store (a restarted server holds its collections released) is
loaded again by the next read; one attach rule for both backends."""
import re

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from lavis_c2f.index import CorpusIndex, IndexMismatchError  # noqa: E402
from lavis_c2f.index.base import StageOneBase  # noqa: E402
from lavis_c2f.index.milvus_index import MilvusIndex  # noqa: E402
from test_corpus_index import D_IN, _model  # noqa: E402  (the tiny retriever of the FAISS index tests)
from test_milvus_index import _queries  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    rng = np.random.default_rng(3)
    feats = {f"v{i:03d}": rng.standard_normal((int(rng.integers(1, 7)), D_IN)).astype(np.float32) for i in range(60)}
    m = _model()
    mx = MilvusIndex.create(f"{tmp_path_factory.mktemp('mvs')}/corpus.db#videos", m)
    mx.add_features(list(feats), feats.__getitem__, progress=False)
    mx.save()
    return {"index": mx, "model": m, "feats": feats}


def test_a_released_collection_is_loaded_again_by_the_next_read(small, caplog):
    mx, q = small["index"], _queries(small["model"], q=3)
    want = mx.search(q, k=5, m=20)
    mx.client.release_collection(mx.locator.collection)      # what a restarted server holds
    with caplog.at_level("WARNING", "lavis_c2f.index.milvus_index"):
        assert mx.search(q, k=5, m=20) == want
    assert any("loading videos again" in r.getMessage() for r in caplog.records)
    mx.client.release_collection(mx.locator.collection)
    assert len(mx) == 60 and mx.vids == sorted(small["feats"]) and mx.duration("v001") is None


def test_one_attach_rule_for_both_backends(small, tmp_path):
    mx, m = small["index"], small["model"]
    fx = CorpusIndex.build(m, list(small["feats"]), small["feats"].__getitem__, progress=False, work_dir=str(tmp_path))
    for index, where in ((mx, f"{mx.locator} (manifest)"), (fx, "index")):
        assert isinstance(index, StageOneBase) and type(index).attach is StageOneBase.attach
        other = _model(seed=7)
        with pytest.raises(IndexMismatchError, match="^" + re.escape(where) + r": model\.weights_hash"):
            index.attach(other)
        index.model = None
        with pytest.raises(RuntimeError, match="no model attached to the index " + re.escape(where)):
            index.search(_queries(m, q=1), k=1)
        assert index.attach(m) is index and index.model is m
