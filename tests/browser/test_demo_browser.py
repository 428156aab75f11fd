"""``lavis-c2f demo`` in a real browser (headless Chromium + Playwright), end to end.

The server finds a reduced quickstart run by itself (demo corpus, trained checkpoints) and uses the
``c2f_feature_random`` backbone for uploaded videos. Each test opens a new page (a new session),
acts as a user would and saves screenshots (folder printed at the end of the run).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="the PyPI package 'playwright' is not installed "
                                                            "(pip install playwright; no 'playwright install')")
expect = sync_api.expect
PlaywrightTimeoutError = sync_api.TimeoutError

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MMSS = re.compile(r"\b(\d\d):(\d\d) – (\d\d):(\d\d)\b")
CHARADES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "media" / "charades_sample.mp4"


def _seconds(m: "re.Match", group: int) -> int:
    return 60 * int(m.group(group)) + int(m.group(group + 1))


def _no_traceback(page) -> None:
    body = page.locator("section.main, [data-testid='stMain']").first.inner_text()
    assert "Traceback" not in body, body[:2000]


def _idle(page, timeout: float = 120_000) -> None:
    """Wait until the script run ends: no "running" status widget, no placeholder skeletons."""
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
                           " && !document.querySelector('[data-testid=\"stSkeleton\"]')", timeout=timeout)


def _click_until_started(page, button, started: "re.Pattern[str]", tries: int = 3) -> None:
    """Click ``button`` until the page shows ``started``: a click that lands while Streamlit
    redraws the widget after an upload is dropped, and the run never starts."""
    for attempt in range(tries):
        button.click()
        try:
            page.get_by_text(started).first.wait_for(timeout=30_000)
            return
        except PlaywrightTimeoutError:
            if attempt == tries - 1:
                raise


def _window_text(row) -> str:
    """The text of a result row once its ``MM:SS – MM:SS`` window is drawn. A row's container
    reaches the page before its content (and the status widget can be briefly absent between
    reruns), so reading right after it appears can see an empty row."""
    expect(row).to_contain_text(MMSS, timeout=60_000)
    return row.inner_text()


def _first_test_query(run: str) -> str:
    with open(Path(run) / "corpus" / "annotations" / "test.jsonl", encoding="utf-8") as f:
        return json.loads(f.readline())["query"]


def _video_near(page, lo: float, hi: float) -> dict:
    """Wait until the page's video has a frame and its currentTime is in [lo, hi]; its state.
    (The list shows times rounded to the second, the player starts at the whole second below.)"""
    page.wait_for_function(
        "([lo, hi]) => { const v = document.querySelector('video');"
        " return v && v.readyState >= 2 && v.currentTime >= lo && v.currentTime <= hi }", arg=[lo, hi],
        timeout=60_000)
    return page.evaluate("() => { const v = document.querySelector('video');"
                         " return {t: v.currentTime, src: v.currentSrc, error: v.error && v.error.code} }")


def test_corpus_search_lists_ranked_moments(page, demo_server, artifacts):
    query = _first_test_query(demo_server["run"])
    assert demo_server["run"] in page.locator("[data-testid='stSidebar']").inner_text()  # found by itself
    assert "trained T-MASS retriever" in page.get_by_text("stage 1:").first.inner_text()
    page.get_by_label("Query").fill(query)
    page.get_by_role("button", name="Search").click()
    page.locator(".st-key-moment_1 img").wait_for()
    _idle(page)
    rows = page.locator("[class*='st-key-moment_']")
    expect(rows).to_have_count(10)
    for i in range(rows.count()):
        text = _window_text(rows.nth(i))
        m = MMSS.search(text)
        assert m, text
        assert _seconds(m, 1) <= _seconds(m, 3), text
        assert rows.nth(i).locator("img").count() == 1      # the saliency thumbnail
    assert page.get_by_text("has no video files").is_visible()   # what the thumbnails are
    assert f"moments for “{query}”" in page.locator("[data-testid='stMain']").inner_text()
    _no_traceback(page)
    page.screenshot(path=str(artifacts / "01_corpus_results.png"))


def test_example_query_button_runs_a_search(page, artifacts):
    page.locator(".st-key-example_0 button").click()
    page.locator(".st-key-moment_1").wait_for()
    _idle(page)
    assert page.get_by_label("Query").input_value().strip()
    assert MMSS.search(_window_text(page.locator(".st-key-moment_1")))


def test_empty_query_shows_a_message_not_a_traceback(page, artifacts):
    page.get_by_label("Query").fill("   ")
    page.get_by_role("button", name="Search").click()
    page.get_by_text("Type a query first").wait_for()
    _idle(page)
    assert page.locator("[class*='st-key-moment_']").count() == 0
    _no_traceback(page)
    page.screenshot(path=str(artifacts / "02_empty_query.png"))


def test_single_video_upload_draws_the_curve_and_plays_a_window(page, artifacts, clips):
    if not CHARADES.is_file():
        pytest.skip(f"../shared not found: {CHARADES}")
    page.get_by_text("One video", exact=True).click()
    page.locator(".st-key-single_file input[type=file]").set_input_files(str(CHARADES))
    page.get_by_text("charades_sample.mp4 encoded").wait_for(timeout=120_000)
    assert "ZERO-SHOT" in page.locator("[data-testid='stMain']").inner_text()   # clearly labelled
    page.get_by_label("Query").fill("a person opens a door")
    page.get_by_role("button", name="Find moments").click()
    page.locator(".st-key-window_1").wait_for()
    _idle(page)
    assert page.locator("[data-testid='stMain'] [data-testid='stImage'] img").count() == 1   # the saliency plot
    windows = page.locator("[class*='st-key-window_']")
    header = page.get_by_text(re.compile(r"Top \d+ windows for")).inner_text()
    expect(windows).to_have_count(int(re.search(r"Top (\d+) windows", header).group(1)))
    assert windows.count() >= 1
    first = MMSS.search(_window_text(windows.first))
    assert first, windows.first.inner_text()
    v = _video_near(page, _seconds(first, 1) - 1, _seconds(first, 1) + 1)   # the player waits at window 1
    assert v["error"] is None and "/media/" in v["src"], v
    page.screenshot(path=str(artifacts / "03_single_video.png"))
    last = windows.nth(windows.count() - 1)
    m = MMSS.search(_window_text(last))
    last.get_by_role("button", name=re.compile("Play from")).click()
    page.get_by_text(f"Playing charades_sample.mp4 from {m.group(1)}:{m.group(2)}").wait_for()
    v = _video_near(page, _seconds(m, 1) - 1, _seconds(m, 1) + 4)
    assert v["error"] is None, v
    page.screenshot(path=str(artifacts / "04_single_video_playing.png"))

    page.locator(".st-key-single_file input[type=file]").set_input_files(str(clips["broken"]))
    page.get_by_text("Cannot read the video broken.mp4").wait_for()
    _idle(page)
    assert page.locator("[class*='st-key-window_']").count() == 0
    page.screenshot(path=str(artifacts / "05_single_video_bad_file.png"))


def test_index_uploaded_videos_then_search_and_play(page, artifacts, clips):
    page.get_by_text("Index your own videos").click()
    page.locator(".st-key-index_files input[type=file]").set_input_files([str(clips["red"]), str(clips["blue"])])
    for name in ("red.mp4", "blue.mp4"):   # uploaded before the click
        page.locator(".st-key-index_files").get_by_text(name).wait_for()
    _idle(page)
    _click_until_started(page, page.locator(".st-key-build_index button"),
                         re.compile(r"starting \.\.\.|loading the \w+ backbone|decoding and encoding|Indexed 2 videos"))
    page.get_by_text("Indexed 2 videos").wait_for(timeout=240_000)
    page.get_by_text("Index of videos").wait_for()
    page.get_by_text("stage 1: ZERO-SHOT").wait_for()   # no retriever checkpoint: labelled zero-shot
    _idle(page)
    main = page.locator("[data-testid='stMain']")
    page.get_by_label("Query").fill("a blue screen")
    page.get_by_role("button", name="Search").click()
    page.locator(".st-key-moment_1 img").wait_for()
    _idle(page)
    rows = page.locator("[class*='st-key-moment_']")
    page.locator(".st-key-moment_2").wait_for()
    assert rows.first.locator("img").count() == 1      # a decoded frame at the window start
    assert "has no video files" not in main.inner_text()
    m = MMSS.search(_window_text(rows.first))
    assert m
    page.screenshot(path=str(artifacts / "06_index_results.png"))
    rows.first.get_by_role("button", name=re.compile("Play from")).click()
    v = _video_near(page, _seconds(m, 1) - 1, _seconds(m, 1) + 4)
    assert v["error"] is None and "/media/" in v["src"], v
    _no_traceback(page)
    page.screenshot(path=str(artifacts / "07_index_playing.png"))


def test_the_page_loads_nothing_from_outside_localhost(page, demo_server, browser_context, artifacts):
    page.locator(".st-key-example_0 button").click()
    page.locator(".st-key-moment_1 img").wait_for()
    _idle(page)
    local = list(browser_context.local_requests)
    assert any("/static/" in u for u in local), local[:10]           # scripts, styles and fonts ...
    assert any(u.startswith(demo_server["url"] + "/_stcore/stream") or "/_stcore/" in u for u in local)
    assert any(u.endswith((".woff2", ".woff", ".ttf")) for u in local), [u for u in local if "font" in u][:5]
    refs = page.evaluate("() => [...document.querySelectorAll('script[src], link[href], img[src], video[src], "
                         "iframe[src]')].map(e => e.src || e.href)")
    outside = [u for u in refs if not u.startswith((demo_server["url"], "data:", "blob:"))]
    assert refs and not outside, outside
    assert not browser_context.external_requests   # the page fixture checks this again after the test


def test_without_an_index_the_page_says_what_to_do(empty_page, artifacts):
    main = empty_page.locator("[data-testid='stMain']")
    empty_page.get_by_text("Nothing to search yet").wait_for()
    _idle(empty_page)
    assert empty_page.locator(".st-key-qs_main button").is_visible()   # "Run the quickstart"
    assert "Nothing yet" in empty_page.locator("[data-testid='stSidebar']").inner_text()
    _no_traceback(empty_page)
    empty_page.screenshot(path=str(artifacts / "08_no_index.png"))
    empty_page.get_by_test_id("stRadioGroup").get_by_text("One video", exact=True).click()   # works without an index
    empty_page.locator(".st-key-single_file input[type=file]").wait_for(state="attached")
    _idle(empty_page)
    assert "A video of the" not in main.inner_text()
    _no_traceback(empty_page)


def test_quickstart_button_trains_and_the_corpus_becomes_searchable(empty_page, empty_demo_server, artifacts):
    """The "Run the quickstart" button (a reduced run: the server's --quickstart-args) shows its
    steps, then the page switches to the new run and searches it."""
    page = empty_page
    page.get_by_text("Nothing to search yet").wait_for()
    assert "--n-videos 40" in page.locator("[data-testid='stMain']").inner_text()   # the arguments shown
    page.locator(".st-key-qs_main button").click()
    page.get_by_text(re.compile(r"step \d+ of \d+: ")).first.wait_for(timeout=240_000)   # its steps, as it runs
    page.screenshot(path=str(artifacts / "09_quickstart_running.png"))
    page.get_by_text("Quickstart finished.").wait_for(timeout=600_000)
    _idle(page)
    runs = [p for p in (Path(empty_demo_server["log"]).parent / "no_runs").iterdir() if p.is_dir()]
    assert len(runs) == 1 and str(runs[0]) in page.locator("[data-testid='stSidebar']").inner_text()
    page.locator(".st-key-example_0 button").click()
    rows = page.locator("[class*='st-key-moment_']")
    expect(rows).to_have_count(10, timeout=120_000)
    assert MMSS.search(_window_text(rows.first))
    _no_traceback(page)
    page.screenshot(path=str(artifacts / "10_quickstart_done_search.png"))
