"""Front ends over a Milvus locator: ``index videos --out corpus.db#videos`` then the predictor,
``lavis-c2f search`` and the HTTP service give the same ranked videos and moments as over the
FAISS index of the same videos."""
import json

import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fastapi.testclient import TestClient  # noqa: E402

from lavis_c2f import cli  # noqa: E402
from lavis_c2f.common.errors import DataFormatError  # noqa: E402
from lavis_c2f.index.milvus_index import MilvusIndex  # noqa: E402
from lavis_c2f.predictor import C2FPredictor  # noqa: E402
from lavis_c2f.serve.app import create_app  # noqa: E402

QUERIES = ["a red screen", "a blue screen", "a gray screen"]


@pytest.fixture(scope="module")
def milvus_index(video_dir, backbone, ckpts, trained_index, tmp_path_factory):
    """The videos of ``trained_index`` (same features folder: nothing extracted again) in milvus-lite."""
    from lavis_c2f.index.build import index_videos

    loc = f"{tmp_path_factory.mktemp('mv')}/corpus.db#videos"
    index_videos(video_dir, loc, backbone=backbone, retriever_checkpoint=ckpts["retriever"],
                 model_cfg=ckpts["retriever_yaml"], features_dir=trained_index + ".features", progress=False)
    return loc


def _strip(d):
    return {k: v for k, v in d.items() if k not in ("timings",)}


def test_predictor_same_videos_and_moments_on_both_backends(milvus_index, trained_index, ckpts):
    kw = dict(grounder_ckpt=ckpts["grounder"], backbone="random", device="cpu")
    pf = C2FPredictor.from_checkpoints(index=trained_index, **kw)
    pm = C2FPredictor.from_checkpoints(index=milvus_index, **kw)
    assert isinstance(pm.corpus.index, MilvusIndex) and pm.mode["stage1"] == "trained"
    assert pm.corpus.vids == pf.corpus.vids and pm.corpus.path_dir == milvus_index
    for a, b in zip(pf.search_batch(QUERIES, top_k=5), pm.search_batch(QUERIES, top_k=5)):
        da, db = _strip(a.to_dict()), _strip(b.to_dict())
        assert da["stage1"] == db["stage1"] and da["moments"] == db["moments"]
    # the index records where the videos came from
    vid = pm.corpus.vids[0]
    assert pm.corpus.index.source(vid) == pf.corpus.path(vid)


def test_search_cli_and_service_take_the_locator(milvus_index, trained_index, ckpts, capsys):
    outs = []
    for loc in (trained_index, milvus_index):
        capsys.readouterr()
        assert cli.main(["search", loc, QUERIES[0], "--grounder-ckpt", ckpts["grounder"], "--backbone", "random",
                         "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["moments"] == outs[1]["moments"] and outs[0]["stage1"] == outs[1]["stage1"]

    pm = C2FPredictor.from_checkpoints(index=milvus_index, grounder_ckpt=ckpts["grounder"], backbone="random",
                                       device="cpu")
    with TestClient(create_app(pm, source=f"index {milvus_index}")) as c:
        r = c.post("/search", json={"query": QUERIES[1], "top_k": 4})
        assert r.status_code == 200, r.text
        want = pm.search(QUERIES[1], top_k=4).to_dict()
        assert _strip(r.json()["results"][0]) == json.loads(json.dumps(_strip(want)))
        vid = pm.corpus.vids[0]
        assert c.get(f"/videos/{vid}").status_code == 200


def test_a_collection_without_corpus_cannot_be_searched(milvus_index, ckpts):
    from lavis_c2f.index.corpora import VideoIndexCorpus
    from lavis_c2f.models.checkpoint import load_retriever

    bare = milvus_index.replace("#videos", "#bare")
    MilvusIndex.create(bare, load_retriever(ckpts["retriever"], ckpts["retriever_yaml"])).save()
    with pytest.raises(DataFormatError, match="field 'corpus'"):
        VideoIndexCorpus(bare)


def test_every_front_end_sees_other_writers_and_health_survives_a_down_store(video_dir, backbone, ckpts,
                                                                             trained_index, tmp_path, monkeypatch):
    """A predictor over a live collection catches up before each search (a script or the web demo
    sees what another process's ``index remove`` / ``index add`` did, not only the service); when
    the store stops answering after a change, ``/health`` still answers 503 with its fields and the
    last video count seen."""
    from lavis_c2f.index.build import index_videos

    loc = f"{tmp_path}/corpus.db#live"
    index_videos(video_dir, loc, backbone=backbone, retriever_checkpoint=ckpts["retriever"],
                 model_cfg=ckpts["retriever_yaml"], features_dir=trained_index + ".features", progress=False)
    kw = dict(grounder_ckpt=ckpts["grounder"], backbone="random", device="cpu")
    reader, writer = C2FPredictor.from_checkpoints(index=loc, **kw), C2FPredictor.from_checkpoints(index=loc, **kw)
    n = len(reader.corpus.vids)
    best = reader.stage1(QUERIES[0], k=n)[0][0]
    assert writer.corpus.index.remove([best]) == 1
    after = reader.search(QUERIES[0], top_k=3, stage1_top_k=n)
    assert best not in [v for v, _ in after.stage1] and best not in reader.corpus.vids
    assert len(reader.corpus.vids) == n - 1

    feats = {best: writer.corpus.features(best)}
    writer.corpus.index.add_features([best], feats.__getitem__, {best: writer.corpus.duration(best)}, progress=False)
    assert reader.stage1(QUERIES[0], k=n)[0][0] == best and len(reader.corpus.vids) == n

    assert writer.corpus.index.remove([best]) == 1   # a change the reader has not listed yet ...
    assert reader.refresh()
    from lavis_c2f.common.errors import IndexUnavailableError

    def down(*a, **k):
        raise IndexUnavailableError(f"Milvus store {loc} stopped answering")

    monkeypatch.setattr(MilvusIndex, "vids", property(down))   # ... and the store goes down
    monkeypatch.setattr(reader.corpus, "refresh", down)
    with TestClient(create_app(reader), raise_server_exceptions=False) as c:
        h = c.get("/health")
        assert h.status_code == 503, h.text
        assert h.json()["status"] == "store unavailable" and h.json()["videos"] == n and "stopped answering" in h.text
