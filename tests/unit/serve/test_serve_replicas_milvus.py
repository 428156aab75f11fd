"""Several ``lavis-c2f serve`` replicas over one Milvus store (a ``milvus-lite server`` process on
127.0.0.1), called over HTTP like a load balancer would.

One module, in order (each step leaves the store and the replicas as the next one needs them):

1. a bounded concurrent load (300 requests, 16 at a time) on one replica, then spread over both:
   every answer equals the in-process search, none is lost; the test prints requests/s and the
   client latency p50 / p95 of both runs (no timing assertion);
2. ``index videos`` (a video added) and ``index remove`` made by this process while the replicas
   run: both see each change at their next request, without a restart;
3. one replica killed mid-load: requests to it fail at the client and are sent to the other,
   which answers every one correctly;
4. the store hung (SIGSTOP): a search answers 503 naming the store within ``--index-timeout``;
   resumed (SIGCONT): searches succeed;
5. the store stopped: searches and ``/health`` answer 503 naming the store, no traceback; the
   store restarted on the same data: searches succeed again (the replica reconnects and loads the
   collection the restarted server holds released).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from milvus_server import MilvusLiteServer, free_port, stop_process, wait_until  # noqa: E402
from predictor_helpers import ffmpeg  # noqa: E402

pytestmark = pytest.mark.slow

N_REQUESTS, CONCURRENCY = 300, 16
INDEX_TIMEOUT_S = 3.0
COLLECTION = "videos"
QUERIES = ["a red screen", "a blue screen", "a gray screen", "a green field", "a yellow wall", "a test pattern",
           "red then blue", "something moves"]
# extra colour clips (name, ffmpeg colour, seconds): the corpus is the 3 fixture clips and these
EXTRA = [("green", "green", 7), ("yellow", "yellow", 9)]
ADDED = ("white", "white", 6)


def _clip(folder: Path, name: str, colour: str, seconds: int) -> None:
    ffmpeg("-f", "lavfi", "-i", f"color=c={colour}:size=64x48:rate=10:d={seconds}", "-c:v", "libx264",
           "-pix_fmt", "yuv420p", str(folder / f"{name}.mp4"))


class Replica:
    """One ``lavis-c2f serve LOCATOR`` process on a free port."""

    def __init__(self, name: str, locator: str, grounder: str, log_dir: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"replica-{name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lavis_c2f.cli", "serve", locator, "--grounder-ckpt", grounder,
                 "--backbone", "random", "--device", "cpu", "--port", str(self.port), "--no-access-log",
                 "--index-timeout", str(INDEX_TIMEOUT_S)], stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self) -> None:
        wait_until(lambda: _healthy(self.url), self.proc, f"replica {self.name}", self.log_path, 180)

    def stop(self) -> None:
        stop_process(self.proc)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def cluster(videos, backbone, ckpts, tmp_path_factory):
    """A milvus-lite server holding an index of 5 videos, and two replicas serving it."""
    from lavis_c2f.index.build import index_videos

    root = tmp_path_factory.mktemp("replicas")
    vdir = root / "videos"
    vdir.mkdir()
    for p in videos.values():
        shutil.copy(p, vdir / p.name)
        if p.with_suffix(".srt").exists():
            shutil.copy(p.with_suffix(".srt"), vdir / p.with_suffix(".srt").name)
    for spec in EXTRA:
        _clip(vdir, *spec)
    store = MilvusLiteServer(root / "milvus-data", root / "milvus.log")
    replicas = []
    try:
        store.start()
        loc = f"{store.uri}#{COLLECTION}"
        features = root / "features"
        build = dict(backbone=backbone, retriever_checkpoint=ckpts["retriever"], model_cfg=ckpts["retriever_yaml"],
                     features_dir=str(features), progress=False)
        index_videos(vdir, loc, **build)
        replicas = [Replica(n, loc, ckpts["grounder"], root) for n in ("a", "b")]
        for r in replicas:
            r.wait_ready()
        yield {"store": store, "loc": loc, "replicas": replicas, "root": root, "vdir": vdir, "build": build,
               "grounder": ckpts["grounder"]}
    finally:
        for r in replicas:
            r.stop()
        store.stop()


def _strip(d):
    return {k: v for k, v in d.items() if k != "timings"}


def _predictor(cluster):
    """The in-process engine over the same store (one thread, like the replicas)."""
    from lavis_c2f.predictor import C2FPredictor

    return C2FPredictor.from_checkpoints(index=cluster["loc"], grounder_ckpt=cluster["grounder"], backbone="random",
                                         device="cpu")


def _bodies(n):
    out = []
    for i in range(n):
        if i % 10 == 9:   # every tenth request a list of three queries (one engine batch)
            out.append({"query": [QUERIES[(i + j) % len(QUERIES)] for j in range(3)], "top_k": 5})
        elif i % 10 == 4:  # stage 1 only
            out.append({"query": QUERIES[i % len(QUERIES)], "top_k": 3, "ground": False})
        else:
            out.append({"query": QUERIES[i % len(QUERIES)], "top_k": (1, 5, 10)[i % 3], "stage1_top_k": 3})
    return out


def _key(body):
    return json.dumps(body, sort_keys=True)


def _expected(predictor, bodies):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = {}
        for b in bodies:
            if _key(b) in want:
                continue
            qs = b["query"] if isinstance(b["query"], list) else [b["query"]]
            if b.get("ground", True) is False:
                ranked = predictor.stage1_batch(qs, b["top_k"])
                want[_key(b)] = [[[v, float(s)] for v, s in r] for r in ranked]
            else:
                res = predictor.search_batch(qs, top_k=b["top_k"], stage1_top_k=b.get("stage1_top_k"))
                want[_key(b)] = json.loads(json.dumps([_strip(r.to_dict()) for r in res]))
        return want
    finally:
        torch.set_num_threads(threads)


def _got(body, answer):
    res = answer.json()["results"]
    return [r["stage1"] for r in res] if body.get("ground", True) is False else [_strip(r) for r in res]


def _run_load(bodies, urls, on_progress=None):
    """Send ``bodies`` 16 at a time, request i to ``urls[i % len(urls)]``; a request whose replica
    fails at the transport level (connection refused or dropped) is sent to the next replica.
    Returns [(body, response, seconds, replicas tried)], the wall time."""
    clients = {u: httpx.Client(base_url=u, timeout=120,
                               limits=httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY))
               for u in urls}
    done = [0]
    lock = threading.Lock()

    def call(i_body):
        i, body = i_body
        tried = []
        t0 = time.perf_counter()
        for j in range(len(urls)):
            u = urls[(i + j) % len(urls)]
            tried.append(u)
            try:
                r = clients[u].post("/search", json=body)
                break
            except httpx.TransportError:
                r = None
        with lock:
            done[0] += 1
            n = done[0]
        if on_progress is not None:
            on_progress(n)
        return body, r, time.perf_counter() - t0, tried

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            out = list(pool.map(call, enumerate(bodies)))
    finally:
        for c in clients.values():
            c.close()
    return out, time.perf_counter() - t0


def _check_all_correct(answers, want):
    assert len(answers) == N_REQUESTS
    lost = [b for b, r, _, _ in answers if r is None]
    assert not lost, f"{len(lost)} requests got no answer from any replica"
    bad = [(b, r.status_code, r.text[:200]) for b, r, _, _ in answers if r.status_code != 200]
    assert not bad, bad[:3]
    wrong = [b for b, r, _, _ in answers if _got(b, r) != want[_key(b)]]
    assert not wrong, f"{len(wrong)} answers differ from the in-process search, e.g. {wrong[0]}"


def _summary(label, answers, wall):
    lat = sorted(t for _, _, t, _ in answers)
    return (f"{label}: {len(answers)} requests, {CONCURRENCY} concurrent, {wall:.2f} s wall, "
            f"{len(answers) / wall:.1f} requests/s; client latency p50 {lat[len(lat) // 2] * 1e3:.0f} ms, "
            f"p95 {lat[int(len(lat) * 0.95)] * 1e3:.0f} ms")


def test_load_over_one_and_two_replicas(cluster, capsys):
    a, b = cluster["replicas"]
    for r in (a, b):
        h = httpx.get(r.url + "/health").json()
        assert h["status"] == "ok" and h["videos"] == 5 and h["corpus"] == f"index {cluster['loc']}"
    bodies = _bodies(N_REQUESTS)
    want = _expected(_predictor(cluster), bodies)
    one, wall1 = _run_load(bodies, [a.url])
    _check_all_correct(one, want)
    two, wall2 = _run_load(bodies, [a.url, b.url])
    _check_all_correct(two, want)
    assert {t[0] for _, _, _, t in two} == {a.url, b.url}
    assert all(len(t) == 1 for _, _, _, t in one + two)   # nothing re-routed: both replicas answered all
    with capsys.disabled():
        print(f"\n[serve replicas over milvus-lite server] {_summary('one replica', one, wall1)}\n"
              f"[serve replicas over milvus-lite server] {_summary('two replicas', two, wall2)}")


def test_replicas_see_videos_added_and_removed_by_another_process(cluster):
    from lavis_c2f import cli
    from lavis_c2f.index.build import index_videos

    replicas = cluster["replicas"]
    query = {"query": "a white screen", "top_k": 10, "ground": False}
    _clip(cluster["vdir"], *ADDED)
    index_videos(cluster["vdir"], cluster["loc"], **cluster["build"])     # resumes: extracts and adds the new clip
    want = _predictor(cluster)
    assert "white" in want.corpus.vids and len(want.corpus.vids) == 6
    grounded = {"query": "a white screen", "top_k": 5, "stage1_top_k": 6}
    expected = json.loads(json.dumps(_strip(want.search_batch([grounded["query"]], top_k=5, stage1_top_k=6)[0]
                                            .to_dict())))
    for r in replicas:
        ans = httpx.post(r.url + "/search", json=query).json()["results"][0]
        assert "white" in {v for v, _ in ans["stage1"]} and len(ans["stage1"]) == 6
        got = httpx.post(r.url + "/search", json=grounded)
        assert got.status_code == 200, got.text
        assert _strip(got.json()["results"][0]) == expected      # the new video is grounded too
        assert httpx.get(r.url + "/health").json()["videos"] == 6
        assert httpx.get(r.url + "/videos/white").json()["duration"] > 0

    assert cli.main(["index", "remove", cluster["loc"], "white"]) == 0
    for r in replicas:
        ans = httpx.post(r.url + "/search", json=query).json()["results"][0]
        assert "white" not in {v for v, _ in ans["stage1"]} and len(ans["stage1"]) == 5
        assert httpx.get(r.url + "/health").json()["videos"] == 5
        assert httpx.get(r.url + "/videos/white").status_code == 404


def test_killing_one_replica_mid_load_loses_nothing(cluster):
    a, b = cluster["replicas"]
    bodies = _bodies(N_REQUESTS)
    want = _expected(_predictor(cluster), bodies)
    killed = threading.Event()

    def kill_b_at_a_third(n):
        if n >= N_REQUESTS // 3 and not killed.is_set():
            killed.set()
            b.proc.kill()

    answers, _ = _run_load(bodies, [a.url, b.url], on_progress=kill_b_at_a_third)
    assert killed.is_set() and b.proc.wait(10) == -signal.SIGKILL
    _check_all_correct(answers, want)
    rerouted = [t for _, _, _, t in answers if len(t) == 2]
    assert rerouted and all(t == [b.url, a.url] for t in rerouted)   # failed at the client on b, answered by a
    with pytest.raises(httpx.TransportError):
        httpx.post(b.url + "/search", json=bodies[0], timeout=5)
    assert httpx.get(a.url + "/health").json()["status"] == "ok"


def _assert_503_naming_the_store(r, store_uri):
    assert r.status_code == 503, r.text
    d = r.json()
    assert d["error"] == "index store unavailable" and store_uri in d["message"], d
    assert "Traceback" not in r.text and r.headers["retry-after"]


def test_store_hung_stopped_and_restarted(cluster):
    a = cluster["replicas"][0]
    store = cluster["store"]
    body = {"query": QUERIES[0], "top_k": 5}
    ok = httpx.post(a.url + "/search", json=body)
    assert ok.status_code == 200

    # hung store: the search gives up after --index-timeout (each call to the store is bounded)
    store.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        r = httpx.post(a.url + "/search", json=body, timeout=60)
        waited = time.perf_counter() - t0
    finally:
        store.proc.send_signal(signal.SIGCONT)
    _assert_503_naming_the_store(r, store.uri)
    assert waited < 2 * INDEX_TIMEOUT_S + 5, f"a hung store held the request {waited:.1f} s"
    r = httpx.post(a.url + "/search", json=body)
    assert r.status_code == 200 and _strip(r.json()["results"][0]) == _strip(ok.json()["results"][0])

    # stopped store: 503 at once, /health reports it, the replica keeps running
    store.stop()
    t0 = time.perf_counter()
    r = httpx.post(a.url + "/search", json=body, timeout=60)
    assert time.perf_counter() - t0 < INDEX_TIMEOUT_S + 5
    _assert_503_naming_the_store(r, store.uri)
    h = httpx.get(a.url + "/health", timeout=60)
    assert h.status_code == 503 and h.json()["status"] == "store unavailable" and store.uri in h.json()["message"]
    assert httpx.get(a.url + "/videos/gray", timeout=60).status_code == 503
    assert a.proc.poll() is None

    # restarted on the same data: the same replica answers again, with the same results
    store.start()
    deadline = time.time() + 60
    while True:
        r = httpx.post(a.url + "/search", json=body, timeout=60)
        if r.status_code == 200 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    assert _strip(r.json()["results"][0]) == _strip(ok.json()["results"][0])
    assert httpx.get(a.url + "/health").json()["status"] == "ok"
    log = a.log_path.read_text()
    assert "POST /search: Milvus store" in log and "Traceback" not in log   # each 503 logged in one line
