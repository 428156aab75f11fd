"""Shared pytest fixtures and markers for lavis-c2f."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = (REPO_ROOT / ".." / "shared").resolve()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "weights: needs real pretrained weights from a local path")
    config.addinivalue_line("markers", "browser: needs a headless browser")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the repo; skips the test when it is absent (a user's clone)."""
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED}: reference data is only available in the dev/CI checkout")
    return SHARED


@pytest.fixture(scope="session")
def reference_fixture(shared_dir):
    """``reference_fixture(name, *files)``: the folder ``../shared/fixtures/<name>`` of an official
    code's recorded outputs; skips the test, naming the missing files, when any of ``files`` is absent."""
    def get(name: str, *files: str) -> Path:
        d = shared_dir / "fixtures" / name
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            pytest.skip(f"{name} fixture incomplete in {d}: missing {', '.join(missing)}")
        return d
    return get


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture()
def subprocess_env() -> dict:
    """Environment for child processes: quiet, unbuffered, CPU."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""})
    return env


@pytest.fixture(scope="session", autouse=True)
def _stop_embedded_milvus():
    """Stop the milvus-lite engines that tests left open (an index not closed) at the end of the
    session, while logging still has its streams: milvus-lite's own exit hook logs each stop after
    the streams are closed, which printed a page of 'Logging error' tracebacks after the summary."""
    yield
    server_manager = sys.modules.get("milvus_lite.server_manager")
    if server_manager is not None:
        server_manager.server_manager_instance.release_all()
