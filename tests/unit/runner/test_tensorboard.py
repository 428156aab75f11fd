"""TensorBoard scalars of c2f_runner: read back from the event file of a real (toy) training run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")

from test_runner import PROJECT, TRAIN_SCRIPT  # noqa: E402  (the toy project of the runner tests)

# 48 samples in batches of 16 (3 steps per epoch), 2 epochs, lr halved after epoch 0
OPTIONS = ("datasets.c2f_toy_regression.n_train=48", "run.max_epoch=2", "run.lr_drop=1", "run.lr_gamma=0.5")


def _train(tmp_path: Path, env, *options: str) -> Path:
    (tmp_path / "toy.yaml").write_text(PROJECT.format(out=tmp_path / "runs"))
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT.format(fn="train_main"))
    proc = subprocess.run([sys.executable, str(tmp_path / "train.py"), "--cfg-path", str(tmp_path / "toy.yaml"),
                           "--options", *options, *OPTIONS], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / "runs" / options[0].split("=", 1)[1]


def _scalars(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_runner_writes_losses_lr_and_metrics(tmp_path, subprocess_env):
    run = _train(tmp_path, subprocess_env, "run.job_id=tb")
    events = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    sc = _scalars(run / "tensorboard")
    # 48 samples, batch 16: 3 steps per epoch, global steps 0..5
    steps = [s for s, _ in sc["train/loss"]]
    assert steps == list(range(6))
    per_epoch = 3
    assert [s for s, _ in sc["train/loss_mse"]] == steps
    # step schedule: lr 0.01 in epoch 0, halved in epoch 1
    lrs = [v for _, v in sc["train/lr"]]
    assert lrs[:per_epoch] == pytest.approx([0.01] * per_epoch)
    assert lrs[per_epoch:] == pytest.approx([0.005] * per_epoch)
    # epoch means and validation metrics equal log.txt
    rows = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert [v for _, v in sc["train_epoch/loss"]] == pytest.approx([r["loss"] for r in train_rows])
    val_rows = [r for r in rows if r.get("split") == "val" and isinstance(r.get("epoch"), int)]
    assert [s for s, _ in sc["val/mse"]] == [0, 1]
    assert [v for _, v in sc["val/mse"]] == pytest.approx([r["mse"] for r in val_rows])
    assert [v for _, v in sc["val/agg_metrics"]] == pytest.approx([r["agg_metrics"] for r in val_rows])
    best = json.loads((run / "summary.json").read_text())
    assert sc["val/best/mse"] == [(best["best_epoch"], pytest.approx(best["test"]["val"]["mse"]))]


@pytest.mark.parametrize("flag,enabled", [(None, True), (True, True), (False, False)])
def test_run_tensorboard_flag(tmp_path, flag, enabled):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    import lavis_c2f.testing.toy as toy
    from lavis_c2f.runners.c2f_runner import C2FRunner

    run = {"output_dir": str(tmp_path / "runs"), "job_id": "j", "device": "cpu"}
    if flag is not None:
        run["tensorboard"] = flag
    cfg = SimpleNamespace(run_cfg=OmegaConf.create(run), config=OmegaConf.create({"run": run}))
    runner = C2FRunner(cfg, toy.ToyRegressionTask(), toy.ToyRegressor(), datasets={})
    assert runner.scalars.enabled is enabled
    assert runner.scalars.log_dir == str(tmp_path / "runs" / "j" / "tensorboard")
    runner.log_stats({"mse": 0.25}, "val", 0)
    assert (tmp_path / "runs" / "j" / "tensorboard").exists() is enabled


def test_scalar_writer_skips_non_numbers_and_is_lazy(tmp_path):
    from lavis_c2f.runners.scalars import ScalarWriter

    w = ScalarWriter(tmp_path, enabled=True)
    assert not (tmp_path / "tensorboard").exists()  # nothing written yet: no empty event file
    w.epoch({"mse": 0.5, "n": 3, "name": "x", "ok": True, "bad": float("nan")}, "val", 2)
    w.step({"loss": 1.25, "lr": 1e-3}, 7)
    w.close()
    sc = _scalars(tmp_path / "tensorboard")
    assert sc == {"val/mse": [(2, 0.5)], "val/n": [(2, 3.0)], "train/loss": [(7, 1.25)],
                  "train/lr": [(7, pytest.approx(1e-3))]}
    off = ScalarWriter(tmp_path / "off", enabled=False)
    off.step({"loss": 1.0}, 0)
    off.epoch({"mse": 1.0}, "val", 0)
    off.close()
    assert not (tmp_path / "off").exists()
