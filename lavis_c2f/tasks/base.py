"""Shared training/evaluation loop of the ``c2f_`` tasks.

LAVIS's ``BaseTask`` moves batches with ``prepare_sample`` (CUDA only), logs with a
``MetricLogger`` and calls ``dist.barrier()`` unconditionally in places. This base keeps
LAVIS's task interface (``setup_task``, ``build_datasets``, ``build_model``, ``train_step``,
``valid_step``, ``after_evaluation``) and replaces the loops with device-agnostic ones that
show progress bars (:mod:`lavis_c2f.common.progress`: lines at long intervals in logs), clip gradients, and gather evaluation results across ranks in the
dataset's order (so distributed results equal single-process results).
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask
from lavis_c2f.common import dist as c2f_dist
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.progress import progress_bar
from lavis_c2f.data.cfg import check_keys

logger = logging.getLogger(__name__)


def move_to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Recursively move tensors in dicts/lists/tuples to ``device``; other objects pass through."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, list):
        return [move_to_device(v, device, non_blocking) for v in obj]
    if isinstance(obj, tuple):
        return tuple(move_to_device(v, device, non_blocking) for v in obj)
    return obj


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP/DataParallel wrappers."""
    return model.module if hasattr(model, "module") and isinstance(
        model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else model


def dataset_clip_length(dataset) -> float:
    """Seconds per clip of an evaluated dataset (from its dataset YAML; no fallback in code)."""
    clip_length = getattr(dataset, "clip_length", None)
    if not clip_length:
        raise ConfigError(f"the evaluated dataset {type(dataset).__name__} has no clip_length (it comes from the "
                          "dataset YAML, datasets.<name>.clip_length)")
    return float(clip_length)


def result_dir() -> str:
    """The result folder the runner registered (absolute), or the cwd outside a runner."""
    try:
        return registry.get_path("result_dir")
    except KeyError:
        return os.getcwd()


class C2FTask(BaseTask):
    """Base of every ``c2f_`` task. Subclasses implement ``valid_step`` and ``after_evaluation``.

    Task options are read from ``run:`` in ``setup_task`` only; ``TASK_OPTIONS`` lists the
    ``run:`` keys a subclass understands (for documentation; unknown ``run:`` keys are the
    runner's business).
    """

    TASK_OPTIONS: Dict[str, Any] = {}

    def __init__(self, **options: Any):
        super().__init__()
        self.options = {**self.TASK_OPTIONS, **check_keys(options, self.TASK_OPTIONS, f"{type(self).__name__} options")}
        self.show_progress = True

    @classmethod
    def setup_task(cls, cfg=None, **kwargs):
        run_cfg = cfg.run_cfg if cfg is not None else {}
        options = {k: run_cfg.get(k) for k in cls.TASK_OPTIONS if k in run_cfg}
        return cls(**options)

    # ------------------------------------------------------------------ build
    def build_datasets(self, cfg) -> Dict[str, Dict[str, Any]]:
        datasets = {}
        datasets_config = cfg.datasets_cfg
        if len(datasets_config) == 0:
            raise ConfigError("config has no 'datasets' entry")
        for name in datasets_config:
            builder = registry.get_builder_class(name)(datasets_config[name])
            datasets[name] = builder.build_datasets()
        return datasets

    # ------------------------------------------------------------------ train
    def train_step(self, model, samples) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        output = model(samples)
        if "loss" not in output:
            raise RuntimeError(f"{type(unwrap_model(model)).__name__}.forward must return a 'loss'")
        loss_dict = {k: v for k, v in output.items() if "loss" in k and torch.is_tensor(v)}
        return output["loss"], loss_dict

    def train_epoch(self, epoch: int, model, data_loader, optimizer, lr_scheduler, scaler=None,
                    device: Optional[torch.device] = None, log_freq: int = 50, accum_grad_iters: int = 1,
                    grad_clip: Optional[float] = None,
                    on_step: Optional[Callable[[Dict[str, float], int], None]] = None, ema=None,
                    **_: Any) -> Dict[str, float]:
        """One pass over ``data_loader``. Returns the mean of every logged loss over all ranks.
        ``ema``: a :class:`lavis_c2f.runners.ema.WeightEma` updated after every optimizer step.

        ``on_step(values, global_step)`` gets this rank's losses of each step and ``lr``
        (``global_step = epoch * len(data_loader) + i``; the runner's TensorBoard scalars)."""
        device = device or torch.device("cpu")
        model.train()
        sums: Dict[str, float] = defaultdict(float)
        count = 0
        n_iters = len(data_loader)
        bar = progress_bar(total=n_iters, desc=f"train epoch {epoch}", unit="step",
                           enabled=self.show_progress and c2f_dist.is_main_process())
        optimizer.zero_grad(set_to_none=True)
        use_amp = scaler is not None and device.type == "cuda"
        for i, samples in enumerate(data_loader):
            samples = move_to_device(samples, device)
            if isinstance(samples, dict):
                samples.update({"epoch": epoch, "num_iters_per_epoch": n_iters, "iters": i})
            lr_scheduler.step(cur_epoch=epoch, cur_step=i)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                loss, loss_dict = self.train_step(model=model, samples=samples)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch} step {i}: "
                                         + ", ".join(f"{k}={v.item():.4g}" for k, v in loss_dict.items()))
            loss = loss / accum_grad_iters
            if use_amp:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            if (i + 1) % accum_grad_iters == 0 or i + 1 == n_iters:
                if grad_clip is not None and grad_clip > 0:
                    if use_amp:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                if use_amp:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                hook = getattr(unwrap_model(model), "after_optimizer_step", None)
                if hook is not None:   # e.g. clamping a logit scale, as CLIP-style trainers do
                    hook()
                if ema is not None:
                    ema.update(unwrap_model(model))
            step_values = {k: float(v.detach()) for k, v in loss_dict.items()}
            for k, v in step_values.items():
                sums[k] += v
            count += 1
            if on_step is not None:
                step_values["lr"] = optimizer.param_groups[0]["lr"]
                on_step(step_values, epoch * n_iters + i)
            if (i + 1) % max(1, log_freq) == 0 or i + 1 == n_iters:
                bar.set_postfix({k: f"{sums[k] / count:.4f}" for k in list(sums)[:4]}, refresh=False)
            bar.update(1)
        bar.close()
        stats = {k: v / max(count, 1) for k, v in sums.items()}
        stats = self._average_across_ranks(stats)
        stats["lr"] = optimizer.param_groups[0]["lr"]
        return stats

    @staticmethod
    def _average_across_ranks(stats: Dict[str, float]) -> Dict[str, float]:
        gathered = c2f_dist.all_gather_objects(stats)
        keys = sorted(set().union(*[g.keys() for g in gathered]))
        return {k: sum(g.get(k, 0.0) for g in gathered) / len(gathered) for k in keys}

    # ------------------------------------------------------------------ evaluation
    def valid_step(self, model, samples) -> List[Dict[str, Any]]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluation(self, model, data_loader, device: Optional[torch.device] = None,
                   desc: str = "evaluate", **_: Any) -> List[Dict[str, Any]]:
        """Run ``valid_step`` over this rank's shard and gather every rank's rows in order.

        The runner shards evaluation data contiguously (rank r gets one contiguous slice), so
        concatenating the gathered lists in rank order restores the dataset order.
        """
        device = device or torch.device("cpu")
        model = unwrap_model(model)
        was_training = model.training
        model.eval()
        rows: List[Dict[str, Any]] = []
        for samples in progress_bar(data_loader, desc=desc, unit="batch",
                                    enabled=self.show_progress and c2f_dist.is_main_process()):
            samples = move_to_device(samples, device)
            rows.extend(self.valid_step(model=model, samples=samples))
        model.train(was_training)
        gathered = c2f_dist.all_gather_objects(rows)
        return [r for part in gathered for r in part]

    def after_evaluation(self, val_result, split_name: str, epoch, **kwargs) -> Dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def split_annotation_path(dataset) -> Optional[str]:
        """The annotation file of a dataset built by a c2f builder (for official evaluation)."""
        return getattr(dataset, "ann_path", None)
