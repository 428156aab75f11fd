"""What ``train.py`` and ``evaluate.py`` do, importable and testable.

Both work as ``python train.py --cfg-path X.yaml`` and under
``python -m torch.distributed.run --nproc_per_node=N train.py --cfg-path X.yaml``, on CPU
(gloo) and GPU (nccl). ``--options key=value ...`` overrides YAML entries (LAVIS syntax),
e.g. ``--options run.max_epoch=3 run.device=cpu``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

import lavis_c2f  # noqa: F401  (registers every c2f_ component before the Config is built)
import torch.distributed as dist
from lavis.common.config import Config
from lavis.common.registry import registry

from lavis_c2f.common import dist as c2f_dist
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.io import write_json
from lavis_c2f.paths import resolve_path


def parse_args(argv: Optional[List[str]], description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to the project YAML")
    parser.add_argument("--options", nargs="+", default=None,
                        help="override config entries: key=value (e.g. run.max_epoch=3)")
    args = parser.parse_args(argv)
    args.cfg_path = resolve_path(args.cfg_path)
    if not os.path.isfile(args.cfg_path):
        parser.error(f"--cfg-path: no such file: {args.cfg_path}")
    return args


def setup_logging() -> None:
    level = logging.INFO if c2f_dist.is_main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def build(args: argparse.Namespace):
    """Config -> (cfg, task, datasets, model, runner class), with distributed set up."""
    cfg = Config(args)
    run_cfg = cfg.run_cfg
    for key in ("task",):
        if key not in run_cfg:
            raise ConfigError(f"{args.cfg_path}: run.{key} is required")
    device = c2f_dist.resolve_device(run_cfg.get("device", "auto"))
    distributed = c2f_dist.init_distributed(device)
    run_cfg.distributed = distributed
    run_cfg.rank = c2f_dist.get_rank()
    run_cfg.world_size = c2f_dist.get_world_size()
    run_cfg.gpu = device.index if device.type == "cuda" else None
    setup_logging()
    c2f_dist.seed_everything(int(run_cfg.get("seed", 42)))
    task_cls = registry.get_task_class(run_cfg.task)
    if task_cls is None:
        raise ConfigError(f"run.task: unknown task '{run_cfg.task}'")
    task = task_cls.setup_task(cfg=cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    runner_name = run_cfg.get("runner", "c2f_runner")
    runner_cls = registry.get_runner_class(runner_name)
    if runner_cls is None:
        raise ConfigError(f"run.runner: unknown runner '{runner_name}'")
    return cfg, task, datasets, model, runner_cls


def _run(main_fn, argv: Optional[List[str]], description: str) -> int:
    args = parse_args(argv, description)
    try:
        return main_fn(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    finally:
        if c2f_dist.is_dist():
            dist.destroy_process_group()


def _train(args: argparse.Namespace) -> int:
    cfg, task, datasets, model, runner_cls = build(args)
    runner = runner_cls(cfg=cfg, task=task, model=model, datasets=datasets, job_id=None)
    summary = runner.train()
    if c2f_dist.is_main_process():
        print(f"output directory: {runner.output_dir}")
        if summary and summary.get("test"):
            for split, metrics in summary["test"].items():
                if metrics:
                    print(f"{split}: agg_metrics={metrics.get('agg_metrics')}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    cfg, task, datasets, model, runner_cls = build(args)
    cfg.run_cfg.evaluate = True
    runner = runner_cls(cfg=cfg, task=task, model=model, datasets=datasets, job_id=None)
    ckpt = cfg.run_cfg.get("checkpoint", None)
    if ckpt:
        runner.load_weights(ckpt)
    logs = runner.evaluate(cur_epoch="best", skip_reload=True)
    if c2f_dist.is_main_process():
        write_json({"job_id": runner.job_id, "checkpoint": ckpt, "test": logs}, runner.output_dir / "summary.json")
        print(f"output directory: {runner.output_dir}")
        for split, metrics in (logs or {}).items():
            if metrics:
                print(f"{split}: agg_metrics={metrics.get('agg_metrics')}")
    return 0


def train_main(argv: Optional[List[str]] = None) -> int:
    return _run(_train, argv, "Train a lavis-c2f model (LAVIS-style).")


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    return _run(_evaluate, argv, "Evaluate a lavis-c2f model (LAVIS-style); run.checkpoint names the weights.")
