"""Progress bars: tqdm on a terminal; whole lines at long intervals in a log (no carriage returns)."""
from __future__ import annotations

import io
import subprocess
import sys
import time

from lavis_c2f.common.progress import log_interval, progress_bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_whole_lines_only_when_the_count_changes():
    buf = io.StringIO()
    bar = progress_bar(total=4, desc="extract", unit="video", file=buf, interval=0.0)
    for _ in range(4):
        bar.update(1)
        bar.set_postfix(failed=0, refresh=False)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert [ln.split("|")[0].split()[-1] for ln in lines] == ["0%", "25%", "50%", "75%", "100%"]
    assert lines[-1].startswith("extract: 100%") and "4/4" in lines[-1]


def test_log_is_quiet_for_short_work_and_paced_for_long_work():
    quick = io.StringIO()
    for _ in progress_bar(range(1000), desc="epoch", file=quick, interval=5.0):
        pass
    assert quick.getvalue() == ""          # shorter than the interval: the runner's epoch line is enough
    slow = io.StringIO()
    for _ in progress_bar(range(12), desc="epoch", file=slow, interval=0.1):
        time.sleep(0.02)
    lines = slow.getvalue().splitlines()
    assert 2 <= len(lines) <= 5 and lines[-1].startswith("epoch: 100%")


def test_terminal_keeps_tqdm_and_disabled_prints_nothing(monkeypatch):
    tty = _Tty()
    for _ in progress_bar(range(3), desc="t", file=tty):
        pass
    assert "\r" in tty.getvalue()
    off = io.StringIO()
    for _ in progress_bar(range(3), desc="t", file=off, enabled=False, interval=0.0):
        pass
    assert off.getvalue() == ""
    monkeypatch.setenv("C2F_PROGRESS_INTERVAL", "7")
    assert log_interval() == 7.0
    monkeypatch.setenv("C2F_PROGRESS_INTERVAL", "soon")
    assert log_interval() == 30.0


def test_extract_progress_in_a_log_file(tmp_path, subprocess_env):
    """`lavis-c2f extract` with stderr in a file: a handful of lines, no carriage returns."""
    import shutil

    import pytest

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg CLI not installed")
    vids = tmp_path / "v"
    vids.mkdir()
    for i in range(3):
        subprocess.run(["ffmpeg", "-y", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"testsrc=size=64x48:rate=10:d={2 + i}", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                        str(vids / f"c{i}.mp4")], check=True)
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("TQDM_")}   # tqdm's own overrides
    env["C2F_PROGRESS_INTERVAL"] = "0"
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "lavis_c2f.cli", "extract", str(vids), "--out",
                               str(tmp_path / "out"), "--backbone", "random", "--workers", "0"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300)
    text = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text
    bars = [ln for ln in text.splitlines() if "extract (c2f_feature_random)" in ln]
    assert bars, f"no progress line in the log:\n{text[-4000:]}"
    assert "extract (c2f_feature_random): 100%" in bars[-1] and "3/3" in bars[-1], text[-4000:]
    assert len(bars) <= 4, text[-4000:]
