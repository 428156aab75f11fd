"""The tiny refiner's asset folder is safe to build from several processes at once.

CI once failed with ``RuntimeError: INTERNAL: unk is not defined`` on rank 0 of the 2-process
CALCE training test: both ranks wrote ``tiny/t5/spiece.model`` at the same time and one read the
other's half-written file. One process now builds under a file lock, in a staging folder, and
renames the folders into place before it writes the marker.
"""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from lavis_c2f.testing import tiny_refiner
from lavis_c2f.testing.tiny_refiner import make_tiny_assets

REPO = Path(__file__).resolve().parents[3]

_CHILD = """
import os, sys, time
from transformers import T5Tokenizer
from lavis_c2f.testing.tiny_refiner import make_tiny_assets
open(sys.argv[2] + f".{os.getpid()}", "w").close()
while not os.path.exists(sys.argv[2]):       # all start building at the same moment
    time.sleep(0.005)
out = make_tiny_assets(sys.argv[1])
tok = T5Tokenizer.from_pretrained(out["t5_dir"])
print(len(tok("Query: a man talks 12 unk").input_ids))
"""


def _t5_loads(t5_dir: str) -> int:
    from transformers import T5Tokenizer

    return len(T5Tokenizer.from_pretrained(t5_dir)("a man talks 12").input_ids)


def test_three_processes_build_one_folder(tmp_path, subprocess_env):
    root = tmp_path / "tiny"
    env = {**subprocess_env, "PYTHONPATH": str(REPO) + os.pathsep + subprocess_env.get("PYTHONPATH", "")}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(go)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("go.*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
        assert int(so.split()[-1]) > 3
    assert sorted(x for x in os.listdir(root) if not x.startswith(".tiny_refiner.lock")) == \
        ["bert", "t5", "tiny_refiner_assets.json"]         # no staging folder left behind


def test_a_waiting_process_reuses_the_finished_folder(tmp_path, monkeypatch):
    import shutil

    from filelock import FileLock

    finished = make_tiny_assets(str(tmp_path / "built_elsewhere"))
    root = str(tmp_path / "tiny")
    os.makedirs(root)
    builds = []
    monkeypatch.setattr(tiny_refiner, "_write_t5", lambda d, seed: builds.append(d))
    lock = FileLock(os.path.join(root, ".tiny_refiner.lock"))
    lock.acquire()
    done = []
    t = threading.Thread(target=lambda: done.append(make_tiny_assets(root)))
    t.start()
    t.join(timeout=1.0)
    assert t.is_alive() and not done                       # waits for the holder of the lock
    # the holder (another rank) finishes the folder and lets go
    for name in ("bert", "t5", "tiny_refiner_assets.json"):
        src = os.path.join(finished["root"], name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(root, name))
    lock.release()
    t.join(timeout=60)
    assert done and not builds                             # reused, not rebuilt
    assert _t5_loads(done[0]["t5_dir"]) > 3


def test_half_written_or_old_folders_are_rebuilt(tmp_path):
    root = tmp_path / "tiny"
    (root / "t5").mkdir(parents=True)
    (root / "t5" / "spiece.model").write_bytes(b"\x0a\x05trunc")     # a crash mid-write, no marker
    (root / "bert").mkdir()
    out = make_tiny_assets(str(root))
    assert _t5_loads(out["t5_dir"]) > 3
    meta = json.loads((root / "tiny_refiner_assets.json").read_text())
    (root / "tiny_refiner_assets.json").write_text(json.dumps({**meta, "version": meta["version"] - 1}))
    (root / "t5" / "spiece.model").write_bytes(b"old")
    out = make_tiny_assets(str(root))                                 # an older version: rebuilt
    assert _t5_loads(out["t5_dir"]) > 3
    assert json.loads((root / "tiny_refiner_assets.json").read_text()) == meta
