"""c2f_runner: CPU training, exact resume, distributed (gloo) training and evaluation."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TRAIN_SCRIPT = """
import sys
import lavis_c2f.testing.toy  # registers the c2f_toy_* components
from lavis_c2f.launch import {fn}
sys.exit({fn}())
"""

PROJECT = """
model:
  arch: c2f_toy_regressor
  model_type: default
datasets:
  c2f_toy_regression:
    n_train: 96
run:
  task: c2f_toy_regression
  runner: c2f_runner
  device: cpu
  seed: 7
  output_dir: {out}
  max_epoch: 4
  init_lr: 0.01
  lr_sched: c2f_step_lr
  lr_drop: 2
  batch_size_train: 16
  batch_size_eval: 8
  num_workers: 0
  progress: false
  train_splits: [train]
  valid_splits: [val]
  test_splits: [val]
"""


@pytest.fixture()
def project(tmp_path: Path):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(PROJECT.format(out=tmp_path / "runs"))
    for fn in ("train_main", "evaluate_main"):
        (tmp_path / f"{fn}.py").write_text(TRAIN_SCRIPT.format(fn=fn))
    return tmp_path


def _run(project: Path, script: str, *options: str, env, nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    cmd += [str(project / script), "--cfg-path", str(project / "toy.yaml"), "--options", *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _summary(project: Path, job: str) -> dict:
    return json.loads((project / "runs" / job / "summary.json").read_text())


@pytest.mark.slow
def test_resume_equals_uninterrupted(project, subprocess_env):
    _run(project, "train_main.py", "run.job_id=full", env=subprocess_env)
    _run(project, "train_main.py", "run.job_id=part", "run.max_epoch=2", env=subprocess_env)
    latest = project / "runs" / "part" / "checkpoint_latest.pth"
    _run(project, "train_main.py", "run.job_id=resumed", f"run.resume_ckpt_path={latest}", env=subprocess_env)
    full, resumed = _summary(project, "full"), _summary(project, "resumed")
    assert full["test"]["val"]["mse"] == resumed["test"]["val"]["mse"]
    assert full["best_epoch"] == resumed["best_epoch"] == 3
    a = torch.load(project / "runs" / "full" / "checkpoint_latest.pth", weights_only=True)
    b = torch.load(project / "runs" / "resumed" / "checkpoint_latest.pth", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the resolved config travels with every checkpoint
    assert a["config"]["run"]["max_epoch"] == 4 and a["config"]["model"]["arch"] == "c2f_toy_regressor"


@pytest.mark.slow
def test_output_dir_is_absolute_and_complete(project, subprocess_env):
    proc = _run(project, "train_main.py", "run.job_id=j1", env=subprocess_env)
    out = project / "runs" / "j1"
    assert f"output directory: {out}" in proc.stdout
    for name in ("config.yaml", "log.txt", "summary.json", "checkpoint_best.pth", "checkpoint_latest.pth"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert sum(1 for r in rows if r.get("split") == "train") == 4


@pytest.mark.slow
def test_distributed_gloo_train_and_eval_match_single_process(project, subprocess_env):
    _run(project, "train_main.py", "run.job_id=ddp", env=subprocess_env, nproc=2)
    ddp = _summary(project, "ddp")
    assert ddp["test"]["val"]["n"] == 32
    ckpt = project / "runs" / "ddp" / "checkpoint_best.pth"
    _run(project, "evaluate_main.py", "run.job_id=ev1", f"run.checkpoint={ckpt}", env=subprocess_env)
    _run(project, "evaluate_main.py", "run.job_id=ev2", f"run.checkpoint={ckpt}", env=subprocess_env, nproc=2)
    one, two = _summary(project, "ev1")["test"]["val"], _summary(project, "ev2")["test"]["val"]
    assert one["indices"] == two["indices"] == list(range(32))  # gathered in dataset order, no duplicates
    assert one["mse"] == pytest.approx(two["mse"], rel=1e-6)


def test_strict_weight_loading_reports_keys(tmp_path):
    import lavis_c2f.testing.toy as toy
    from lavis_c2f.models.checkpoint import (CheckpointMismatchError, load_model_weights,
                                                   save_checkpoint)

    model = toy.ToyRegressor(in_dim=8, hidden_dim=16)
    sd = model.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["net.0.bias"]
    path = tmp_path / "bad.pth"
    save_checkpoint({"model": sd, "config": {}}, path)
    with pytest.raises(CheckpointMismatchError) as e:
        load_model_weights(model, path)
    msg = str(e.value)
    assert "net.0.bias" in msg and "extra.weight" in msg and str(path) in msg
    with pytest.raises(FileNotFoundError):
        load_model_weights(model, tmp_path / "missing.pth")


def test_unknown_c2f_names_list_known_ones():
    import lavis_c2f.testing.toy  # noqa: F401
    from lavis.common.registry import registry

    with pytest.raises(KeyError) as e:
        registry.get_task_class("c2f_toy_regresion")
    assert "c2f_toy_regression" in str(e.value)
    assert registry.get_model_class("blip2_opt") is not None  # LAVIS's own names unaffected
    assert registry.get_model_class("not_c2f_thing") is None


def test_config_error_for_bad_split(project, subprocess_env):
    cmd = [sys.executable, str(project / "train_main.py"), "--cfg-path", str(project / "toy.yaml"),
           "--options", "run.valid_splits=[nope]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert proc.returncode == 2
    assert "run.valid_splits" in proc.stderr and "nope" in proc.stderr


def test_boolean_job_id_is_a_config_error(project, subprocess_env):
    """``run.job_id=off`` is read as False by OmegaConf: an error with the quoting hint, not a random id."""
    cmd = [sys.executable, str(project / "train_main.py"), "--cfg-path", str(project / "toy.yaml"),
           "--options", "run.job_id=off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "run.job_id" in proc.stderr and "quote" in proc.stderr
    assert not (project / "runs").exists() or not any((project / "runs").iterdir())


def test_trainable_only_checkpoints_load_without_frozen_weights(tmp_path):
    import lavis_c2f.testing.toy as toy
    from lavis_c2f.models.checkpoint import (CheckpointMismatchError, load_model_weights,
                                                   model_state_for_checkpoint, save_checkpoint)

    class Partial(toy.ToyRegressor):
        def trainable_state_dict(self):
            names = {n for n, p in self.named_parameters() if p.requires_grad}
            return {k: v for k, v in self.state_dict().items() if k in names}

    model = Partial()
    model.net[0].weight.requires_grad_(False)  # a frozen "backbone"
    state, kind = model_state_for_checkpoint(model)
    assert kind == "trainable" and "net.0.weight" not in state and "net.3.weight" in state
    path = tmp_path / "partial.pth"
    save_checkpoint({"model": state, "state_dict_kind": kind}, path)
    fresh = Partial()
    fresh.net[0].weight.requires_grad_(False)
    load_model_weights(fresh, path)  # frozen weights may be absent
    assert torch.equal(fresh.net[3].weight, model.net[3].weight)
    del state["net.3.weight"]  # a trainable weight may not
    save_checkpoint({"model": state, "state_dict_kind": kind}, path)
    with pytest.raises(CheckpointMismatchError, match="net.3.weight"):
        load_model_weights(fresh, path)


def test_optional_components_register_lazily(subprocess_env):
    code = ("import sys, lavis_c2f\n"
            "assert 'lavis_c2f.models.refiner' not in sys.modules\n"
            "from lavis.common.registry import registry\n"
            "assert registry.get_model_class('c2f_caption_refiner') is not None\n"
            "assert registry.get_builder_class('c2f_refiner') is not None\n"
            "from lavis_c2f.registry_utils import known_names\n"
            "assert 'c2f_caption_refiner' in known_names('model')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_weight_ema_formula_and_swap():
    from lavis_c2f.runners.ema import WeightEma, ema_factor
    model = torch.nn.Linear(2, 1)
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    model.register_parameter("frozen", frozen)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightEma(model, decay=0.9)
    assert "frozen" not in ema.shadow
    expect = torch.zeros(1, 2)
    for t, value in enumerate([1.0, 2.0, 4.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        assert ema_factor(0.9, t) == d
        expect = d * expect + (1 - d) * value
    assert torch.allclose(ema.shadow["weight"], expect)
    with ema.applied(model):
        assert torch.allclose(model.weight, expect)
    assert torch.equal(model.weight, torch.full((1, 2), 4.0))   # the training weights are back
    entry = ema.checkpoint_entry(model)
    restored = WeightEma(model, decay=0.9)
    with torch.no_grad():
        model.weight.copy_(expect)          # a checkpoint's "model" holds the average
    restored.restore(model, entry)
    assert restored.updates == 3 and torch.equal(restored.shadow["weight"], expect)
    assert torch.equal(model.weight, torch.full((1, 2), 4.0))
    with pytest.raises(Exception, match="ema_decay"):
        WeightEma(model, decay=1.0)


@pytest.mark.slow
def test_ema_resume_equals_uninterrupted_and_checkpoint_holds_the_average(project, subprocess_env):
    ema = "run.ema_decay=0.9"
    _run(project, "train_main.py", "run.job_id=full", ema, env=subprocess_env)
    _run(project, "train_main.py", "run.job_id=part", ema, "run.max_epoch=2", env=subprocess_env)
    latest = project / "runs" / "part" / "checkpoint_latest.pth"
    _run(project, "train_main.py", "run.job_id=resumed", ema, f"run.resume_ckpt_path={latest}", env=subprocess_env)
    full, resumed = _summary(project, "full"), _summary(project, "resumed")
    assert full["test"]["val"]["mse"] == resumed["test"]["val"]["mse"]
    a = torch.load(project / "runs" / "full" / "checkpoint_latest.pth", weights_only=True)
    b = torch.load(project / "runs" / "resumed" / "checkpoint_latest.pth", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["ema"]["updates"] == b["ema"]["updates"] > 0
    assert any(not torch.equal(a["model"][k], a["ema"]["train_params"][k]) for k in a["ema"]["train_params"])
    # the best checkpoint holds the validated average: evaluating it repeats the validation
    rows = [json.loads(line) for line in (project / "runs" / "full" / "log.txt").read_text().splitlines()]
    val = {r["epoch"]: r["mse"] for r in rows if r.get("split") == "val" and isinstance(r.get("epoch"), int)}
    assert full["test"]["val"]["mse"] == val[full["best_epoch"]]
    # a checkpoint with an average does not silently resume without one
    proc = subprocess.run([sys.executable, str(project / "train_main.py"), "--cfg-path", str(project / "toy.yaml"),
                           "--options", "run.job_id=bad", f"run.resume_ckpt_path={latest}"],
                          capture_output=True, text=True, env=subprocess_env, timeout=600)
    assert proc.returncode != 0 and "ema_decay" in proc.stderr


def test_cpu_training_uses_deterministic_algorithms():
    """``run.deterministic`` (default on CPU): with 2 threads the backward of advanced indexing
    (``index_put_`` with accumulation) adds in one fixed order, so a repeated step gives the same
    gradient bit for bit (without it the reduced quickstart chain trained different models run to
    run with 2 threads: docs/reproducibility.md)."""
    from lavis_c2f.runners.c2f_runner import use_deterministic_algorithms

    before, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        torch.use_deterministic_algorithms(False)
        assert not use_deterministic_algorithms(None, "cuda") and not torch.are_deterministic_algorithms_enabled()
        assert not use_deterministic_algorithms(False, "cpu") and not torch.are_deterministic_algorithms_enabled()
        assert use_deterministic_algorithms(None, "cpu") and torch.are_deterministic_algorithms_enabled()
        # an explicit false (or a CUDA job) after a CPU job in the same process switches them off again
        assert not use_deterministic_algorithms(False, "cpu") and not torch.are_deterministic_algorithms_enabled()
        assert use_deterministic_algorithms(True, "cpu") and torch.are_deterministic_algorithms_enabled()
        assert not use_deterministic_algorithms(None, "cuda") and not torch.are_deterministic_algorithms_enabled()
        assert use_deterministic_algorithms(None, "cpu") and torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 32, generator=g)
        idx = torch.randint(0, 64, (200_000,), generator=g)       # many rows hit each index
        w = torch.randn(200_000, 32, generator=g)

        def grad():
            xx = x.clone().requires_grad_(True)
            (xx[idx] * w).sum().backward()
            return xx.grad

        first = grad()
        assert all(torch.equal(first, grad()) for _ in range(5))
    finally:
        torch.use_deterministic_algorithms(before)
        torch.set_num_threads(threads)
