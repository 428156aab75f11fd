"""bench/grounder.py: the clocks of the round-robin timer and the JSON of a run of ours alone
(tiny sizes; the official code is never imported here)."""
from __future__ import annotations

import json
import time

import pytest

from bench_helpers import load_bench


@pytest.fixture(scope="module")
def gb():
    return load_bench("grounder.py", "bench_grounder")


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_clock_leaves_out_waiting_and_wall_clock_counts_it(gb):
    jobs = {"sleep": lambda: time.sleep(0.05), "busy": lambda: _busy(0.02)}
    wall = gb.interleaved_best(jobs, rounds=2, clock="wall")
    cpu = gb.interleaved_best(jobs, rounds=2, clock="cpu")
    assert wall["sleep"] >= 0.05
    assert cpu["sleep"] < 0.01
    assert 0.02 <= cpu["busy"] < 0.2


@pytest.fixture
def torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # main() sets --threads for the whole process


def test_ours_alone_writes_measurements_per_side(gb, tmp_path, torch_threads, capsys):
    out = tmp_path / "grounder.json"
    rc = gb.main(["--models", "qd_detr", "--clips", "20", "--train-batch", "2", "--topk", "3",
                  "--train-steps", "1", "--repeats", "1", "--repeats-topk", "1", "--threads", "1",
                  "--clock", "cpu", "--our-model", "linear_kernel=torch", "--json", str(out)])
    assert rc == 0
    assert "ours: {'linear_kernel': 'torch', 'dropout_kernel': 'bits'}, config set: " \
           "{'linear_kernel': 'torch'}" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["settings"]["clock"] == "cpu" and data["threads"] == 1
    assert data["settings"]["our_model"] == ["linear_kernel=torch"]
    assert data["rows"] == [] and data["data_share"] == []  # no official code, no --data-share
    sides = {m["side"]: m for m in data["measured"]}
    assert set(sides) == {"ours", "ours-no-neg"}
    for m in sides.values():
        assert m["train_samples_per_s"] > 0
        assert m["infer_ms_per_pair_b1"] > 0 and m["infer_ms_per_pair_b3"] > 0


def test_unknown_model_is_refused(gb):
    with pytest.raises(SystemExit, match="unknown model 'detr'"):
        gb.main(["--models", "detr"])
    with pytest.raises(SystemExit):  # argparse: --our-model takes KEY=VALUE
        gb.main(["--models", "qd_detr", "--our-model", "linear_kernel"])
