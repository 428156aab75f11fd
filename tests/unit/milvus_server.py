"""A ``milvus-lite server`` process on 127.0.0.1 for tests that need several clients of one store
(parallel ingest across ranks, several service replicas)."""
from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, name: str, log: Path, wait_s: float) -> None:
    """Poll ``ready()``; fail naming ``name`` (with its log's tail) when ``proc`` exits or
    ``wait_s`` seconds pass first."""
    deadline = time.time() + wait_s
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        if time.time() > deadline:
            pytest.fail(f"{name} was not ready within {wait_s} s:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class MilvusLiteServer:
    """``milvus-lite server --data-dir D --host 127.0.0.1 --port P`` as a child process; the port
    stays the same across :meth:`stop` / :meth:`start` (a restart on the same data)."""

    def __init__(self, data_dir: Path, log: Path):
        self.data_dir, self.log_path = Path(data_dir), Path(log)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).with_name("milvus-lite")
        exe_s = str(exe) if exe.exists() else shutil.which("milvus-lite")
        if not exe_s:
            pytest.skip("the milvus-lite command is not installed")
        self.cmd = [exe_s, "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = None

    def start(self, startup_s: float = 60.0) -> None:
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: listening(self.port), self.proc, "milvus-lite server", self.log_path, startup_s)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)     # a hung (SIGSTOP) server must run to stop
            stop_process(self.proc)


@contextlib.contextmanager
def milvus_lite_server(data_dir, startup_s: float = 60.0) -> Iterator[str]:
    """A started :class:`MilvusLiteServer` on ``data_dir`` (log beside it); yields its ``http://``
    URI once it listens and a client gets an answer; stops it on exit."""
    from pymilvus import MilvusClient

    server = MilvusLiteServer(Path(data_dir), Path(str(data_dir) + ".log"))
    try:
        server.start(startup_s)
        deadline = time.monotonic() + startup_s
        while True:
            try:
                client = MilvusClient(uri=server.uri, timeout=2.0,
                                      grpc_options={"grpc.keepalive_time_ms": 300_000,
                                                    "grpc.keepalive_permit_without_calls": 0})
                client.list_collections()
                client.close()
                break
            except Exception:  # noqa: BLE001 - not answering yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield server.uri
    finally:
        server.stop()
