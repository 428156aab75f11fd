"""A ``milvus-lite server`` process on 127.0.0.1 for tests that need several clients of one store."""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def milvus_lite_server(data_dir, startup_s: float = 60.0):
    """Start ``milvus-lite server --data-dir DATA_DIR`` on a free port; yields its ``http://`` URI
    once a client gets an answer; terminates it (then kills it) on exit."""
    from pymilvus import MilvusClient

    exe = os.path.join(os.path.dirname(sys.executable), "milvus-lite")
    exe = exe if os.path.exists(exe) else shutil.which("milvus-lite")
    if not exe:
        pytest.skip("the milvus-lite command is not installed")
    port = free_port()
    log = open(os.path.join(str(data_dir) + ".log"), "wb")
    proc = subprocess.Popen([exe, "server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited with {proc.returncode}; see {log.name}")
            try:
                client = MilvusClient(uri=uri, timeout=2.0, grpc_options={"grpc.keepalive_time_ms": 300_000,
                                                                          "grpc.keepalive_permit_without_calls": 0})
                client.list_collections()
                client.close()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
