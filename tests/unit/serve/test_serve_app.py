"""The search service in process (FastAPI's TestClient): bodies, validation (422 naming the
field), 404, the OpenAPI page served without a CDN, and internal errors (500, logged, no
traceback in the body). The real server process is tested in test_serve_process.py."""
import json
import logging

import pytest
from fastapi.testclient import TestClient

from lavis_c2f.predictor import C2FPredictor
from lavis_c2f.serve.app import create_app
from lavis_c2f.serve.schemas import SERVE_DEFAULTS


@pytest.fixture(scope="module")
def predictor(zs_index, ckpts):
    return C2FPredictor.from_checkpoints(grounder_ckpt=ckpts["grounder"], backbone="random", index=zs_index,
                                         device="cpu")


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, source="test index"), raise_server_exceptions=False) as c:
        yield c


def _strip(d):
    return {k: v for k, v in d.items() if k != "timings"}


def test_search_one_query_equals_the_engine(client, predictor):
    r = client.post("/search", json={"query": "a red screen", "top_k": 4, "stage1_top_k": 2})
    assert r.status_code == 200, r.text
    (got,) = r.json()["results"]
    want = predictor.search("a red screen", top_k=4, stage1_top_k=2).to_dict()
    assert _strip(got) == json.loads(json.dumps(_strip(want)))
    assert got["mode"] == {"stage1": "zero-shot", "stage2": "trained", "stage3": "off"}
    assert 1 <= len(got["moments"]) <= 4 and len(got["stage1"]) == 2
    assert set(got["timings"]) >= {"stage1_s", "stage2_s", "total_s"}


def test_search_list_is_one_engine_batch_in_order(client, predictor):
    qs = ["a blue screen", "a  gray   screen", "a red screen"]
    r = client.post("/search", json={"query": qs, "top_k": 3})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [g["query"] for g in got] == ["a blue screen", "a gray screen", "a red screen"]
    want = [_strip(x.to_dict()) for x in predictor.search_batch(qs, top_k=3)]
    assert [_strip(g) for g in got] == json.loads(json.dumps(want))
    # a batch gives what each query gives alone
    for g, q in zip(got, qs):
        assert _strip(g) == json.loads(json.dumps(_strip(predictor.search(q, top_k=3).to_dict())))


def test_search_without_grounding_is_stage1(client, predictor):
    r = client.post("/search", json={"query": ["a red screen", "gray"], "top_k": 2, "ground": False})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [g["moments"] for g in got] == [[], []]
    assert got[0]["mode"]["stage2"] == "off"
    assert [[v, pytest.approx(s)] for v, s in got[0]["stage1"]] == [[v, s] for v, s in predictor.stage1("a red screen", 2)]
    assert len(got[1]["stage1"]) == 2


@pytest.mark.parametrize("body, field, words", [
    ({"query": ""}, "query", "empty"),
    ({"query": "   "}, "query", "empty"),
    ({"query": ["ok", " "]}, "query", "empty (item 1)"),
    ({"query": []}, "query", "give 1 to"),
    ({"query": ["q"] * (SERVE_DEFAULTS["max_queries"] + 1)}, "query", "give 1 to"),
    ({"query": 3}, "query", "a query is a string"),
    ({"query": "x" * (SERVE_DEFAULTS["max_query_chars"] + 1)}, "query", "longer than"),
    ({}, "query", "Field required"),
    ({"query": "q", "top_k": 0}, "top_k", "greater than or equal to 1"),
    ({"query": "q", "top_k": SERVE_DEFAULTS["max_top_k"] + 1}, "top_k", "less than or equal to"),
    ({"query": "q", "top_k": "many"}, "top_k", "valid integer"),
    ({"query": "q", "stage1_top_k": -1}, "stage1_top_k", "greater than or equal to 1"),
    ({"query": "q", "topk": 3}, "topk", "unknown field (the fields are query, top_k, stage1_top_k, ground, refine)"),
    ({"query": "q", "refine": True}, "refine", "stage 3 is not configured"),
])
def test_bad_requests_answer_422_naming_the_field(client, body, field, words):
    r = client.post("/search", json=body)
    assert r.status_code == 422, r.text
    d = r.json()
    assert d["error"] == "invalid request"
    assert d["message"].startswith(f"{field}: ") and words in d["message"], d["message"]
    assert d["detail"][0]["field"] == field


def test_invalid_json_and_wrong_method(client):
    r = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["message"]
    r = client.get("/search")
    assert r.status_code == 405 and r.json()["error"] == "method not allowed"


def test_health_and_videos(client, predictor):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["videos"] == 3 and h["corpus"] == "test index"
    assert h["mode"] == predictor.mode and "ZERO-SHOT" in h["mode_description"]
    v = client.get("/videos/redblue").json()
    assert v["vid"] == "redblue" and v["duration"] == pytest.approx(14.0, abs=0.2)
    assert v["clip_length"] == predictor.corpus.clip_length and v["n_clips"] == predictor.corpus.n_clips("redblue")
    assert v["path"].endswith("redblue.mp4") and v["n_captions"] == 2
    r = client.get("/videos/nope")
    assert r.status_code == 404 and r.json() == {"error": "not found",
                                                 "message": "video 'nope' is not in the video index"}


def test_openapi_page_is_served_locally(client):
    spec = client.get("/openapi.json").json()
    assert {"/search", "/health", "/videos/{vid}"} <= set(spec["paths"])
    assert "422" in spec["paths"]["/search"]["post"]["responses"]
    props = spec["components"]["schemas"]["SearchRequest"]["properties"]
    assert props["top_k"]["maximum"] == SERVE_DEFAULTS["max_top_k"]
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text and "cdn" not in page.text.lower()
    js = [s for s in page.text.split('"') if s.endswith("swagger-ui-bundle.js")][0]
    assert client.get(js).status_code == 200
    assert client.get("/", follow_redirects=False).headers["location"] == "/docs"


def test_internal_error_is_500_without_traceback_and_logged(predictor, monkeypatch, caplog):
    app = create_app(predictor)

    def boom(*a, **k):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(predictor, "search_batch", boom)
    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level(logging.ERROR, "lavis_c2f.serve.app"):
        r = c.post("/search", json={"query": "a red screen"})
        assert c.get("/health").status_code == 200   # the service keeps answering
    assert r.status_code == 500
    d = r.json()
    assert d["error"] == "internal server error" and d["request_id"] in d["message"]
    assert "Traceback" not in r.text and "secret" not in r.text and "RuntimeError" not in r.text
    rec = [x for x in caplog.records if d["request_id"] in x.getMessage()]
    assert rec and rec[0].exc_info and "secret internal detail" in str(rec[0].exc_info[1])


def test_unreachable_store_is_503_naming_it(predictor, monkeypatch):
    """An index store that does not answer (IndexUnavailableError, e.g. a stopped Milvus server)
    gives 503 naming the store, with Retry-After, on /search, /health and /videos; the next
    request tries again (the real store: test_serve_replicas_milvus.py)."""
    from lavis_c2f.common.errors import IndexUnavailableError

    app = create_app(predictor)
    down = {"on": True}
    msg = "Milvus store http://10.0.0.7:19530 stopped answering (timeout 3 s): Deadline Exceeded"

    def refresh():
        if down["on"]:
            raise IndexUnavailableError(msg)
        return False

    monkeypatch.setattr(predictor.corpus, "refresh", refresh)
    vid = predictor.corpus.vids[0]
    with TestClient(app, raise_server_exceptions=False) as c:
        for r in (c.post("/search", json={"query": "a red screen"}),
                  c.post("/search", json={"query": "a red screen", "ground": False}), c.get(f"/videos/{vid}")):
            assert r.status_code == 503, r.text
            assert r.json() == {"error": "index store unavailable", "message": msg}
            assert r.headers["retry-after"] == str(SERVE_DEFAULTS["store_retry_after_s"])
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "store unavailable" and h.json()["message"] == msg
        assert h.json()["videos"] == len(predictor.corpus.vids)
        down["on"] = False
        assert c.post("/search", json={"query": "a red screen"}).status_code == 200
        assert c.get("/health").json()["status"] == "ok"


def test_app_needs_a_corpus(ckpts):
    p = C2FPredictor.from_checkpoints(grounder_ckpt=ckpts["grounder"], backbone="random", device="cpu")
    with pytest.raises(ValueError, match="needs a predictor with a corpus"):
        create_app(p)


def _cli(capsys, *argv):
    import lavis_c2f.cli as main_cli

    capsys.readouterr()
    code = main_cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_errors_are_one_line(capsys, tmp_path, zs_index):
    code, _, err = _cli(capsys, "serve", "--quickstart-root", tmp_path / "none", "--port", "8765")
    assert code == 1 and "no INDEX given and no finished quickstart run under" in err and "Traceback" not in err
    code, _, err = _cli(capsys, "serve", zs_index, "--port", "0")
    assert code == 1 and "--port must be in 1..65535" in err
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        code, _, err = _cli(capsys, "serve", zs_index, "--port", s.getsockname()[1])
    assert code == 1 and "cannot serve on 127.0.0.1:" in err and "choose another --port" in err
    code, _, err = _cli(capsys, "serve", zs_index, "--refine")
    assert code == 1 and "--refine needs --refiner-cfg" in err
