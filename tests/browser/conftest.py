"""Fixtures of the browser tests: a headless Chromium driven by Playwright, the demo server as a
child process, a small quickstart run and generated clips. Screenshots go to
``$C2F_TEST_ARTIFACTS/browser`` (default: a pytest temporary folder), printed at the end of the run.

Requirements (run_scripts/setup.sh installs them): Debian's ``chromium`` package and the PyPI
package ``playwright`` (its own browser download, ``playwright install``, is not used). The tests
skip, saying which is missing, only when one of them is absent.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
_ARTIFACT_DIRS: List[Path] = []
#: a reduced quickstart (40 videos, 1 epoch per stage): the fixture's run and the app's button
SMALL_QUICKSTART = ["--n-videos", "40", "--stage1-epochs", "1", "--stage2-epochs", "1", "--skip-untrained",
                    "--threads", "1"]


def chromium_path() -> str:
    for cand in (os.environ.get("C2F_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                 shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    pytest.skip("no Chromium found (apt-get install chromium; or set C2F_CHROMIUM to its path)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
    if rep.when == "call" and rep.failed:
        # CI keeps only the terminal: put what the app said into the failure report itself
        for name in ("demo_server", "empty_demo_server"):
            server = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if server and Path(server["log"]).is_file():
                text = Path(server["log"]).read_text(encoding="utf-8", errors="replace")
                rep.sections.append((f"demo server log ({name}, last 6000 characters)", text[-6000:]))
        for name in ("page", "empty_page"):
            pg = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if pg is not None:
                try:
                    rep.sections.append(("page text at the failure", pg.locator("body").inner_text(timeout=5_000)[-4000:]))
                except Exception as e:  # the page itself may be what broke
                    rep.sections.append(("page text at the failure", f"unavailable: {type(e).__name__}: {e}"))


def pytest_terminal_summary(terminalreporter) -> None:
    for d in _ARTIFACT_DIRS:
        if d.is_dir() and any(d.iterdir()):
            terminalreporter.write_line(f"browser test screenshots: {d}")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    root = os.environ.get("C2F_TEST_ARTIFACTS")
    d = (Path(root) if root else tmp_path_factory.mktemp("artifacts")) / "browser"
    d.mkdir(parents=True, exist_ok=True)
    _ARTIFACT_DIRS.append(d)
    print(f"\nbrowser test screenshots: {d}")
    return d


def _run(cmd: List[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="session")
def quickstart_root(tmp_path_factory) -> Path:
    """A folder holding one finished, reduced quickstart run (40 videos, 1 epoch per stage)."""
    root = tmp_path_factory.mktemp("c2f_quickstart")
    proc = _run([sys.executable, "-m", "lavis_c2f.cli", "quickstart", "--out", root / "run1", *SMALL_QUICKSTART],
                timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return root


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> Dict[str, Path]:
    """``red.mp4`` / ``blue.mp4`` (6 s test pattern, then 6 s of one colour) and ``broken.mp4`` (text)."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg CLI not installed (apt-get install ffmpeg)")
    d = tmp_path_factory.mktemp("clips")
    for colour in ("red", "blue"):
        subprocess.run(["ffmpeg", "-y", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                        "testsrc=size=160x120:rate=10", "-f", "lavfi", "-i",
                        f"color=c={colour}:size=160x120:rate=10:d=6",
                        "-filter_complex", "[0]trim=duration=6[a];[a][1]concat=n=2:v=1", "-c:v", "libx264",
                        "-pix_fmt", "yuv420p", str(d / f"{colour}.mp4")], check=True, capture_output=True)
    (d / "broken.mp4").write_text("this is not a video\n", encoding="utf-8")
    return {p.stem: p for p in d.iterdir()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serve(quickstart_root: Path, work: Path) -> Iterator[Dict[str, str]]:
    """``lavis-c2f demo`` (``python -m lavis_c2f.demo``) on a free localhost port, looking for
    quickstart runs under ``quickstart_root`` (its button runs :data:`SMALL_QUICKSTART`), with the
    random backbone for uploaded videos. Yields ``{"url", "log"}``; the server is stopped on exit."""
    port = _free_port()
    log = work / "server.log"
    cmd = [sys.executable, "-m", "lavis_c2f.demo", "--quickstart-root", str(quickstart_root), "--backbone", "random",
           "--port", str(port), "--host", "127.0.0.1", "--workdir", str(work / "state"), "--device", "cpu",
           "--quickstart-args=" + " ".join(SMALL_QUICKSTART)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(work), env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo server did not answer within 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "log": str(log)}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="session")
def demo_server(quickstart_root, tmp_path_factory) -> Iterator[Dict[str, str]]:
    """The demo finding the reduced quickstart run by itself. Yields ``{"url", "log", "run"}``."""
    with _serve(quickstart_root, tmp_path_factory.mktemp("demo_work")) as server:
        yield dict(server, run=str(quickstart_root / "run1"))


@pytest.fixture()
def empty_demo_server(tmp_path) -> Iterator[Dict[str, str]]:
    """The demo with nothing to search: no quickstart run, no --index. Yields ``{"url", "log"}``."""
    (tmp_path / "no_runs").mkdir()
    with _serve(tmp_path / "no_runs", tmp_path) as server:
        yield server


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory):
    """A Chromium context with a fresh profile; records requests that leave localhost."""
    exe = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api", reason="the PyPI package 'playwright' is not installed "
                                                                 "(pip install playwright; no 'playwright install')")
    profile = tmp_path_factory.mktemp("chromium_profile")
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(profile), executable_path=exe, headless=True,
                                                    args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1800})
        ctx.external_requests = []  # type: ignore[attr-defined]
        ctx.local_requests = []  # type: ignore[attr-defined]

        def record(request) -> None:
            u = request.url
            if u.startswith(("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:", "about:")):
                ctx.local_requests.append(u)  # type: ignore[attr-defined]
            else:
                ctx.external_requests.append(u)  # type: ignore[attr-defined]

        ctx.on("request", record)
        try:
            yield ctx
        finally:
            ctx.close()


def _open(request, browser_context, server: Dict[str, str], artifacts: Path):
    """A new page (a new Streamlit session) on ``server``; fails the test if anything left
    localhost. A failing test leaves ``FAILED_<test>.png`` and the server log's path in the report."""
    p = browser_context.new_page()
    p.set_default_timeout(60_000)
    p.goto(server["url"])
    p.get_by_text("Find moments in videos").wait_for(timeout=120_000)
    yield p
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        p.screenshot(path=str(artifacts / f"FAILED_{request.node.name}.png"))
        print(f"server log: {server['log']}")
    external = list(browser_context.external_requests)
    p.close()
    assert not external, f"the page requested non-local resources: {external[:5]}"


@pytest.fixture()
def page(request, browser_context, demo_server, artifacts):
    """A new page on the demo with the quickstart run (see :func:`_open`)."""
    yield from _open(request, browser_context, demo_server, artifacts)


@pytest.fixture()
def empty_page(request, browser_context, empty_demo_server, artifacts):
    """A new page on the demo with nothing to search (see :func:`_open`)."""
    yield from _open(request, browser_context, empty_demo_server, artifacts)
