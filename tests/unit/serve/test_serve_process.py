"""``lavis-c2f serve`` as a real server process on localhost, called by a real HTTP client.

The server is started without INDEX, so it serves the latest quickstart run under
``--quickstart-root`` (a copy of the small demo run of tests/unit/conftest.py). A bounded load
test (200 requests, 16 at a time) checks that every answer arrives and equals the engine's
direct result, and prints the time per request (no timing assertion). Then a broken feature
file makes the search fail inside the server: 500 without traceback, logged with its id.
"""
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lavis_c2f.common.io import read_jsonl
from lavis_c2f.predictor import C2FPredictor

N_REQUESTS, CONCURRENCY = 200, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("qs_root")
    run = root / "20260101-000000"
    shutil.copytree(demo["run"], run)
    port = _free_port()
    log = (root / "server.log").open("w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lavis_c2f.cli", "serve", "--quickstart-root", str(root),
                             "--port", str(port), "--device", "cpu", "--no-access-log"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the server did not answer /health within 180 s")
        time.sleep(0.3)
    yield {"url": url, "run": run, "proc": proc, "log": root / "server.log"}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()


def _strip(d):
    return {k: v for k, v in d.items() if k != "timings"}


def test_load_every_answer_correct_and_none_lost(server, capsys):
    h = httpx.get(server["url"] + "/health").json()
    assert h["corpus"] == f"quickstart run {server['run']}" and h["videos"] == 12
    assert h["mode"] == {"stage1": "trained", "stage2": "trained", "stage3": "off"}

    # the engine's direct results (same run, same code path; one thread like the server)
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        direct = C2FPredictor.for_demo_corpus(server["run"], device="cpu")
        texts = sorted({r["query"] for r in read_jsonl(server["run"] / "corpus" / "annotations" / "val.jsonl")})[:12]
        bodies = []
        for i in range(N_REQUESTS):
            if i % 10 == 9:   # every tenth request a list of three queries (one engine batch)
                bodies.append({"query": [texts[(i + j) % len(texts)] for j in range(3)], "top_k": 5})
            else:
                bodies.append({"query": texts[i % len(texts)], "top_k": (1, 5, 10)[i % 3], "stage1_top_k": 4})
        want = {}
        for b in bodies:
            key = json.dumps(b, sort_keys=True)
            if key not in want:
                qs = b["query"] if isinstance(b["query"], list) else [b["query"]]
                res = direct.search_batch(qs, top_k=b["top_k"], stage1_top_k=b.get("stage1_top_k"))
                want[key] = json.loads(json.dumps([_strip(r.to_dict()) for r in res]))
    finally:
        torch.set_num_threads(threads)

    def call(body):
        t0 = time.perf_counter()
        r = client.post("/search", json=body)
        return body, r, time.perf_counter() - t0

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    t0 = time.perf_counter()
    with httpx.Client(base_url=server["url"], timeout=120, limits=limits) as client, \
            ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(pool.map(call, bodies))
    wall = time.perf_counter() - t0

    assert len(answers) == N_REQUESTS
    bad = [(b, r.status_code, r.text[:200]) for b, r, _ in answers if r.status_code != 200]
    assert not bad, bad[:3]
    wrong = [b for b, r, _ in answers if [_strip(x) for x in r.json()["results"]] != want[json.dumps(b, sort_keys=True)]]
    assert not wrong, f"{len(wrong)} answers differ from the engine's, e.g. {wrong[0]}"
    assert all(len(r.json()["results"][0]["moments"]) >= 1 for _, r, _ in answers)

    lat = sorted(t for _, _, t in answers)
    server_s = [x["timings"]["total_s"] for _, r, _ in answers for x in r.json()["results"][:1]]
    with capsys.disabled():
        print(f"\n[serve load test] {N_REQUESTS} requests, {CONCURRENCY} concurrent, all correct, none lost: "
              f"{wall:.2f} s wall, {N_REQUESTS / wall:.1f} requests/s; time per request (client) "
              f"mean {statistics.mean(lat) * 1e3:.1f} ms, p50 {lat[len(lat) // 2] * 1e3:.1f} ms, "
              f"p95 {lat[int(len(lat) * 0.95)] * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms; engine time per "
              f"request (server) mean {statistics.mean(server_s) * 1e3:.1f} ms")


def test_bad_request_over_http(server):
    r = httpx.post(server["url"] + "/search", json={"query": "x", "top_k": 0})
    assert r.status_code == 422 and r.json()["message"].startswith("top_k: ")
    r = httpx.post(server["url"] + "/search", json={"query": "x", "topk": 3})
    assert r.status_code == 422 and r.json()["message"].startswith("topk: unknown field")
    vid = httpx.get(server["url"] + "/health").json() and sorted(
        json.loads((server["run"] / "corpus" / "corpus.json").read_text())["durations"])[0]
    v = httpx.get(server["url"] + f"/videos/{vid}").json()
    assert v["vid"] == vid and v["duration"] > 0 and v["path"] is None


def test_internal_error_over_http_then_clean_shutdown(server):
    # runs last in this module: the served corpus's feature files are broken on purpose
    for f in (server["run"] / "corpus" / "clip_features").glob("*.npz"):
        f.write_bytes(b"not an npz file")
    r = httpx.post(server["url"] + "/search", json={"query": "a chef washes the bucket"})
    assert r.status_code == 500, r.text
    d = r.json()
    assert d["error"] == "internal server error" and "Traceback" not in r.text and "npz" not in r.text
    assert httpx.get(server["url"] + "/health").status_code == 200   # still serving
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) in (0, -signal.SIGTERM)   # uvicorn re-raises the signal after a graceful shutdown
    log = server["log"].read_text()
    assert "Finished server process" in log
    assert f"request id {d['request_id']}" in log and "Traceback" in log
