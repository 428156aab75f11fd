"""``c2f_runner``: LAVIS's epoch runner, fixed for CPU, single-process and exact resume.

What differs from ``lavis.runners.runner_base.RunnerBase`` (LAVIS 1.0.2):

* device from ``run.device`` (``auto``/``cuda``/``cpu``); DDP wraps with ``device_ids`` only on
  CUDA; gloo on CPU, nccl on GPU (see :mod:`lavis_c2f.common.dist`);
* no unconditional ``dist.barrier()``, no ``torch.cuda.Stream`` prefetcher on CPU;
* ``run.output_dir`` is resolved against the current directory (not LAVIS's install folder)
  into an absolute ``<output_dir>/<job_id>``; the job id is agreed across ranks;
* every checkpoint holds the resolved config, and is written atomically;
* ``run.resume_ckpt_path`` resumes to the same result as an uninterrupted run (with
  ``run.resume_model_only: true`` it only initialises the weights, as LAVIS does): the data order
  and every random generator are re-seeded from ``(run.seed, epoch, rank)`` at each epoch, the
  lr schedule is a pure function of (epoch, step), and model/optimizer/scaler/best-metric
  state is restored;
* evaluation data is sharded contiguously across ranks and gathered in order, so distributed
  metrics equal single-process metrics;
* strict checkpoint loading that reports missing/unexpected keys;
* TensorBoard scalars in ``<output_dir>/<job_id>/tensorboard/`` (each loss and the lr per step,
  every evaluation metric per epoch; rank 0; off with ``run.tensorboard: false``), see
  :mod:`lavis_c2f.runners.scalars`;
* optimiser parameter groups: ``run.lr_groups`` (``[{prefix: "clip.", lr: 1e-6}]``: parameters
  whose name starts with ``prefix`` get that peak lr, the others ``init_lr``; the schedule
  scales every group alike), ``run.weight_decay_scope`` (``all``: every parameter decays, as the
  official QD-DETR, MESM and T-MASS AdamW; ``matrices``: biases, norms and 1-D parameters get
  none), ``run.no_decay_names`` (a list of name substrings: exactly the parameters whose name
  contains one get no weight decay, e.g. CLIP4Clip / UCoFiA's ``[bias, LayerNorm.bias,
  LayerNorm.weight]``; overrides the scope), ``run.adam_eps`` (1e-8);
* a model's ``after_optimizer_step()`` runs after every optimizer step (e.g. a logit-scale clamp);
* ``run.ema_decay`` (off when absent or null): the evaluated model is the exponential moving
  average of the weights (:mod:`lavis_c2f.runners.ema`): validation runs on it, and a checkpoint's
  ``model`` holds it (what ``evaluate.py`` and the pipeline load), with the training weights in
  its ``ema`` entry for resuming;
* ``run.deterministic`` (default: on for CPU, off for CUDA): torch's deterministic algorithms
  (``torch.use_deterministic_algorithms(True, warn_only=True)``). On CPU with more than one thread
  the backward of advanced indexing (``index_put_`` with accumulation) otherwise adds its terms in
  whatever order the threads reach them, so the same command trained different models run to run
  (docs/reproducibility.md); with one thread it changes nothing.

``run:`` keys read here (all optional except ``max_epoch``, ``init_lr`` for training):
``device, seed, output_dir, job_id, max_epoch, init_lr, min_lr, weight_decay, weight_decay_scope,
no_decay_names, beta2, adam_eps, adam_bias_correction, lr_groups, lr_sched, warmup_steps, warmup_proportion,
warmup_lr, lr_drop,
lr_milestones, ema_decay, lr_gamma, batch_size_train, batch_size_eval,
num_workers, amp, grad_clip, accum_grad_iters, log_freq, train_splits, valid_splits,
test_splits, val_interval, resume_ckpt_path, resume_model_only, checkpoint, evaluate,
save_every_epoch, drop_last, progress, tensorboard, deterministic``.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from lavis_c2f.common import dist as c2f_dist
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.io import write_json
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.models.checkpoint import (load_checkpoint_file, load_model_weights, model_state_for_checkpoint,
                                         save_checkpoint)
from lavis_c2f.paths import resolve_path
from lavis_c2f.runners.ema import WeightEma
from lavis_c2f.runners.scalars import ScalarWriter
from lavis_c2f.tasks.base import unwrap_model

logger = logging.getLogger(__name__)

# run.weight_decay_scope: "all" decays every parameter (torch AdamW over model.parameters(), as
# the official QD-DETR and MESM trainers do); "matrices" exempts biases, norms and other 1-D
# parameters (LAVIS / CLIP-style recipes)
WEIGHT_DECAY_SCOPES = ("all", "matrices")


class ContiguousShardSampler(Sampler):
    """Rank r of w gets indices ``[r*n//w, (r+1)*n//w)``: no padding, no duplicates, and
    concatenating ranks in order restores the dataset order."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.start = rank * n // world_size
        self.end = (rank + 1) * n // world_size

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start


def _seed_worker(worker_id: int) -> None:  # numpy is not re-seeded by PyTorch in workers

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _make_job_id() -> str:
    return datetime.datetime.now().strftime("%Y%m%d%H%M%S")


def use_deterministic_algorithms(setting: Optional[bool], device) -> bool:
    """``run.deterministic`` (module docstring): switch torch's deterministic algorithms on when
    ``setting`` is true, or, when it is ``None``, when ``device`` is a CPU, and off otherwise (a
    process that runs several jobs, as the quickstart does, gets each job's own setting); whether
    they are on."""
    on = bool(setting) if setting is not None else torch.device(device).type == "cpu"
    torch.use_deterministic_algorithms(on, warn_only=True)
    return on


@registry.register_runner("c2f_runner")
class C2FRunner:
    """Epoch-based runner (see module docstring). Same constructor as LAVIS's runners."""

    def __init__(self, cfg, task, model, datasets: Dict[str, Dict[str, Any]], job_id: Optional[str] = None):
        self.config = cfg
        self.run_cfg = cfg.run_cfg
        self.task = task
        self.task.show_progress = bool(self.run_cfg.get("progress", True))
        self.datasets = self._by_split(datasets)
        self.device = c2f_dist.resolve_device(self.run_cfg.get("device", "auto"))
        use_deterministic_algorithms(self.run_cfg.get("deterministic", None), self.device)
        self.distributed = c2f_dist.is_dist()
        self.seed = int(self.run_cfg.get("seed", 42))
        self._model = model.to(self.device)
        self._wrapped_model = None
        self._optimizer = None
        self._scaler = None
        self._lr_sched = None
        ema_decay = self.run_cfg.get("ema_decay", None)
        self.ema = WeightEma(self._model, float(ema_decay)) if ema_decay is not None else None
        self.start_epoch = 0
        self.best_agg_metric = -math.inf
        self.best_epoch = -1
        cfg_job_id = self.run_cfg.get("job_id")
        if isinstance(cfg_job_id, bool):
            # OmegaConf reads run.job_id=off / no / yes / true from the command line as a boolean
            raise ConfigError(f"run.job_id: got the boolean {cfg_job_id} (words such as off, no, yes, true are read as "
                              "booleans); quote it, e.g. --options 'run.job_id=\"off\"', or choose another name")
        job_id = cfg_job_id or job_id or _make_job_id()
        self.job_id = str(c2f_dist.broadcast_object(job_id))
        self.setup_output_dir()
        self.scalars = ScalarWriter(self.output_dir, enabled=bool(self.run_cfg.get("tensorboard", True))
                                    and c2f_dist.is_main_process())

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _by_split(datasets: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
        """{dataset_name: {split: ds}} -> {split: ds}; several datasets per split are concatenated."""
        by_split: Dict[str, List[Any]] = {}
        for name, splits in datasets.items():
            for split, ds in splits.items():
                by_split.setdefault(split, []).append(ds)
        out = {}
        for split, dss in by_split.items():
            if len(dss) == 1:
                out[split] = dss[0]
            else:
                concat = torch.utils.data.ConcatDataset(dss)
                concat.collater = getattr(dss[0], "collater", None)
                out[split] = concat
        return out

    def setup_output_dir(self) -> None:
        base = resolve_path(self.run_cfg.get("output_dir", "output"))
        self.output_dir = Path(base) / self.job_id
        self.result_dir = self.output_dir / "result"
        if c2f_dist.is_main_process():
            self.result_dir.mkdir(parents=True, exist_ok=True)
        c2f_dist.barrier()
        registry.mapping["paths"]["output_dir"] = str(self.output_dir)
        registry.mapping["paths"]["result_dir"] = str(self.result_dir)
        if c2f_dist.is_main_process():
            with open(self.output_dir / "config.yaml", "w", encoding="utf-8") as f:
                f.write(OmegaConf.to_yaml(self.config.config, resolve=True))

    def resolved_config(self) -> Dict[str, Any]:
        return OmegaConf.to_container(self.config.config, resolve=True)

    # ------------------------------------------------------------------ model / optim
    @property
    def model(self) -> torch.nn.Module:
        if self._wrapped_model is None:
            if self.distributed:
                kwargs = {"find_unused_parameters": bool(self.run_cfg.get("find_unused_parameters", True))}
                if self.device.type == "cuda":
                    kwargs["device_ids"] = [self.device.index or 0]
                self._wrapped_model = DDP(self._model, **kwargs)
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self._model

    def _lr_groups(self) -> List[Dict[str, Any]]:
        """``run.lr_groups`` as ``[{"prefix", "lr"}]`` (validated)."""
        raw = self.run_cfg.get("lr_groups", None) or []
        out = []
        for i, g in enumerate(raw):
            g = check_keys(g, {"prefix", "lr"}, f"run.lr_groups[{i}]")
            if not isinstance(g.get("prefix"), str) or not g["prefix"]:
                raise ConfigError(f"run.lr_groups[{i}].prefix: expected a parameter-name prefix, "
                                  f"got {g.get('prefix')!r}")
            try:
                lr = float(g["lr"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"run.lr_groups[{i}].lr: expected a number, got {g.get('lr')!r}") from None
            out.append({"prefix": g["prefix"], "lr": lr})
        return out

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            init_lr = float(self.run_cfg.init_lr)
            wd = float(self.run_cfg.get("weight_decay", 0.0))
            scope = self.run_cfg.get("weight_decay_scope", "matrices")
            if scope not in WEIGHT_DECAY_SCOPES:
                raise ConfigError(f"run.weight_decay_scope: expected one of {list(WEIGHT_DECAY_SCOPES)}, "
                                  f"got {scope!r}")
            no_decay_names = self.run_cfg.get("no_decay_names", None)
            if no_decay_names is not None and (isinstance(no_decay_names, str) or not all(
                    isinstance(x, str) for x in no_decay_names)):
                raise ConfigError(f"run.no_decay_names: expected a list of name substrings, got {no_decay_names!r}")
            specs = self._lr_groups()
            # per lr group (the default first): one group with weight decay, one without
            buckets: List[List[List[torch.nn.Parameter]]] = [[[], []] for _ in range(len(specs) + 1)]
            n_params = 0
            for n, p in self._model.named_parameters():
                if not p.requires_grad:
                    continue
                gi = next((i + 1 for i, g in enumerate(specs) if n.startswith(g["prefix"])), 0)
                if no_decay_names is not None:
                    no_wd = any(x in n for x in no_decay_names)
                else:
                    no_wd = scope == "matrices" and (p.ndim < 2 or "bias" in n or "norm" in n or "ln" in n
                                                     or "bn" in n)
                buckets[gi][int(no_wd)].append(p)
                n_params += p.numel()
            logger.info("trainable parameters: %d", n_params)
            groups = []
            for gi, (p_wd, p_no_wd) in enumerate(buckets):
                extra = {} if gi == 0 else {"lr_scale": specs[gi - 1]["lr"] / init_lr,
                                            "lr": specs[gi - 1]["lr"]}
                if gi > 0 and not (p_wd or p_no_wd):
                    raise ConfigError(f"run.lr_groups[{gi - 1}].prefix: no trainable parameter name starts with "
                                      f"{specs[gi - 1]['prefix']!r}")
                groups += [{"params": p_wd, "weight_decay": wd, **extra},
                           {"params": p_no_wd, "weight_decay": 0.0, **extra}]
            self._optimizer = torch.optim.AdamW(
                groups, lr=init_lr, weight_decay=wd, eps=float(self.run_cfg.get("adam_eps", 1e-8)),
                betas=(0.9, float(self.run_cfg.get("beta2", 0.999))))
        return self._optimizer

    @property
    def scaler(self):
        if self._scaler is None and self.run_cfg.get("amp", False) and self.device.type == "cuda":
            self._scaler = torch.amp.GradScaler("cuda")
        return self._scaler

    @property
    def lr_scheduler(self):
        if self._lr_sched is None:
            name = self.run_cfg.get("lr_sched", "c2f_constant_lr")
            cls = registry.get_lr_scheduler_class(name)
            if cls is None:
                known = sorted(registry.mapping["lr_scheduler_name_mapping"])
                raise ConfigError(f"run.lr_sched: unknown schedule '{name}'; known: {known}")
            self._lr_sched = cls(
                optimizer=self.optimizer, max_epoch=self.max_epoch,
                init_lr=float(self.run_cfg.init_lr), min_lr=float(self.run_cfg.get("min_lr", 0.0)),
                warmup_steps=int(self.run_cfg.get("warmup_steps", 0)),
                warmup_proportion=self.run_cfg.get("warmup_proportion", None),
                iters_per_epoch=len(self.train_loader(max(self.start_epoch, 0))),
                accum_grad_iters=int(self.run_cfg.get("accum_grad_iters", 1)),
                adam_bias_correction=bool(self.run_cfg.get("adam_bias_correction", False)),
                warmup_start_lr=float(self.run_cfg.get("warmup_lr", -1)),
                decay_rate=self.run_cfg.get("lr_decay_rate", None),
                lr_drop=self.run_cfg.get("lr_drop", None),
                milestones=self.run_cfg.get("lr_milestones", None),
                gamma=float(self.run_cfg.get("lr_gamma", 0.1)))
        return self._lr_sched

    @property
    def max_epoch(self) -> int:
        return int(self.run_cfg.get("max_epoch", 0))

    def _splits(self, key: str) -> List[str]:
        splits = list(self.run_cfg.get(key, []) or [])
        missing = [s for s in splits if s not in self.datasets]
        if missing:
            raise ConfigError(f"run.{key} names split(s) {missing} but the datasets only have "
                              f"{sorted(self.datasets)}")
        return splits

    # ------------------------------------------------------------------ data
    def _collate(self, dataset):
        return getattr(dataset, "collater", None)

    def train_loader(self, epoch: int) -> DataLoader:
        ds = self.datasets[self._splits("train_splits")[0]]
        for part in getattr(ds, "datasets", [ds]):  # per-epoch label sampling of c2f datasets
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)
        sampler = DistributedSampler(ds, num_replicas=c2f_dist.get_world_size(), rank=c2f_dist.get_rank(),
                                     shuffle=True, seed=self.seed, drop_last=False)
        sampler.set_epoch(epoch)
        g = torch.Generator()
        g.manual_seed(self.seed * 1000 + epoch)
        bs = int(self.run_cfg.get("batch_size_train", 32))
        return DataLoader(ds, batch_size=bs, sampler=sampler,
                          num_workers=int(self.run_cfg.get("num_workers", 0)),
                          collate_fn=self._collate(ds), pin_memory=self.device.type == "cuda",
                          drop_last=bool(self.run_cfg.get("drop_last", len(sampler) > bs)),
                          worker_init_fn=_seed_worker, generator=g)

    def eval_loader(self, split: str) -> DataLoader:
        ds = self.datasets[split]
        sampler = ContiguousShardSampler(len(ds), c2f_dist.get_rank(), c2f_dist.get_world_size())
        return DataLoader(ds, batch_size=int(self.run_cfg.get("batch_size_eval", 64)), sampler=sampler,
                          num_workers=int(self.run_cfg.get("num_workers", 0)),
                          collate_fn=self._collate(ds), pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------------ loops
    def train(self) -> Dict[str, Any]:
        start = time.time()
        train_splits = self._splits("train_splits")
        if not train_splits:
            raise ConfigError("run.train_splits is empty: nothing to train on (use evaluate.py to evaluate)")
        valid_splits = self._splits("valid_splits")
        self.log_config()
        resume = self.run_cfg.get("resume_ckpt_path", None)
        if resume and self.run_cfg.get("resume_model_only", False):
            self._load_model_only(resume)
            if self.ema is not None:   # the average starts from the loaded weights
                self.ema = WeightEma(self._model, self.ema.decay)
        elif resume:
            self._load_checkpoint(resume)
        val_interval = int(self.run_cfg.get("val_interval", 1))
        last_epoch = self.start_epoch - 1
        for epoch in range(self.start_epoch, self.max_epoch):
            c2f_dist.seed_everything(self.seed * 1000 + epoch * 7 + c2f_dist.get_rank())
            loader = self.train_loader(epoch)
            stats = self.task.train_epoch(
                epoch=epoch, model=self.model, data_loader=loader, optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler, scaler=self.scaler, device=self.device,
                log_freq=int(self.run_cfg.get("log_freq", 50)),
                accum_grad_iters=int(self.run_cfg.get("accum_grad_iters", 1)),
                grad_clip=self.run_cfg.get("grad_clip", None), on_step=self.scalars.step, ema=self.ema)
            self.log_stats(stats, "train", epoch)
            last_epoch = epoch
            is_last = epoch + 1 == self.max_epoch
            if valid_splits and ((epoch + 1) % val_interval == 0 or is_last):
                for split in valid_splits:
                    metrics = self._eval_averaged(split, epoch)
                    if split == valid_splits[0] and metrics is not None:
                        agg = float(metrics["agg_metrics"])
                        if agg > self.best_agg_metric:
                            self.best_agg_metric, self.best_epoch = agg, epoch
                            self._save_checkpoint(epoch, "best")
                        metrics = {**metrics, "best_epoch": self.best_epoch}
                    self.log_stats(metrics, split, epoch)
            self._save_checkpoint(epoch, "latest")
            if self.run_cfg.get("save_every_epoch", False):
                self._save_checkpoint(epoch, str(epoch))
            c2f_dist.barrier()
        if self.start_epoch >= self.max_epoch:
            logger.info("nothing to train: start epoch %d >= max_epoch %d", self.start_epoch, self.max_epoch)
        if not valid_splits and last_epoch >= 0 and c2f_dist.is_main_process():
            # no validation: the last epoch is the one we keep as "best"
            src = self.output_dir / "checkpoint_latest.pth"
            if src.exists():
                save_checkpoint(load_checkpoint_file(src), self.output_dir / "checkpoint_best.pth")
        c2f_dist.barrier()
        test_logs = self.evaluate(cur_epoch="best", skip_reload=False)
        summary = {"job_id": self.job_id, "output_dir": str(self.output_dir),
                   "best_epoch": self.best_epoch, "best_agg_metric": self.best_agg_metric,
                   "test": test_logs, "train_seconds": round(time.time() - start, 1)}
        if c2f_dist.is_main_process():
            write_json(summary, self.output_dir / "summary.json")
        self.scalars.close()
        logger.info("training finished in %s; outputs in %s",
                    datetime.timedelta(seconds=int(time.time() - start)), self.output_dir)
        return summary

    def evaluate(self, cur_epoch="best", skip_reload: bool = False) -> Dict[str, Any]:
        logs = {}
        for split in self._splits("test_splits"):
            logs[split] = self.eval_epoch(split, cur_epoch, skip_reload=skip_reload)
            self.log_stats(logs[split], split, cur_epoch)
        return logs

    def _eval_averaged(self, split_name: str, epoch: int) -> Optional[Dict[str, Any]]:
        """Validation during training: of the weight average with ``run.ema_decay``, else of the model."""
        if self.ema is None:
            return self.eval_epoch(split_name, epoch, skip_reload=True)
        with self.ema.applied(self._model):
            return self.eval_epoch(split_name, epoch, skip_reload=True)

    @torch.no_grad()
    def eval_epoch(self, split_name: str, cur_epoch, skip_reload: bool = False) -> Optional[Dict[str, Any]]:
        model = self._model
        if not skip_reload and cur_epoch == "best":
            best = self.output_dir / "checkpoint_best.pth"
            if best.exists():
                load_model_weights(model, best, map_location=self.device)
        model.eval()
        dataset = self.datasets[split_name]
        self.task.before_evaluation(model=model, dataset=dataset)
        results = self.task.evaluation(model, self.eval_loader(split_name), device=self.device,
                                       dataset=dataset, desc=f"eval {split_name}")
        metrics = None
        if c2f_dist.is_main_process() and results is not None:
            metrics = self.task.after_evaluation(val_result=results, split_name=split_name, epoch=cur_epoch,
                                                 dataset=dataset, result_dir=str(self.result_dir))
        return c2f_dist.broadcast_object(metrics)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, epoch: int, tag: str) -> None:
        if not c2f_dist.is_main_process():
            return
        ema_entry = None
        if self.ema is not None:   # "model" = the evaluated average; the training weights in "ema"
            ema_entry = self.ema.checkpoint_entry(self._model)
            with self.ema.applied(self._model):
                state, kind = model_state_for_checkpoint(self._model)
                state = {k: v.detach().clone() for k, v in state.items()}   # not views of the weights
        else:
            state, kind = model_state_for_checkpoint(self._model)
        obj = {
            "model": state,
            "ema": ema_entry,
            "state_dict_kind": kind,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "best_agg_metric": self.best_agg_metric,
            "best_epoch": self.best_epoch,
            "config": self.resolved_config(),
            "arch": str(self.config.model_cfg.get("arch", "")),
            "job_id": self.job_id,
            "world_size": c2f_dist.get_world_size(),
        }
        path = self.output_dir / f"checkpoint_{tag}.pth"
        save_checkpoint(obj, path)
        logger.info("saved %s (epoch %d)", path, epoch)

    def _load_checkpoint(self, path: str) -> None:
        path = resolve_path(path)
        ckpt = load_model_weights(self._model, path, map_location=self.device)
        if self.ema is not None and ckpt.get("ema"):
            self.ema.restore(self._model, ckpt["ema"], source=str(path))
        elif self.ema is not None or ckpt.get("ema"):
            raise ConfigError(f"run.resume_ckpt_path {path}: the checkpoint was written "
                              f"{'with' if ckpt.get('ema') else 'without'} a weight average (run.ema_decay) and "
                              f"this run is configured {'without' if self.ema is None else 'with'} one; resume "
                              "with the same setting, or use run.resume_model_only")
        if ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt.get("epoch", -1)) + 1
        self.best_agg_metric = float(ckpt.get("best_agg_metric", -math.inf))
        self.best_epoch = int(ckpt.get("best_epoch", -1))
        if self.best_epoch >= 0 and c2f_dist.is_main_process():
            # keep the resumed run's notion of "best" usable for the final test
            best_src = Path(path).with_name("checkpoint_best.pth")
            if best_src.exists() and best_src.resolve() != (self.output_dir / "checkpoint_best.pth").resolve():
                save_checkpoint(load_checkpoint_file(best_src), self.output_dir / "checkpoint_best.pth")
        logger.info("resumed from %s at epoch %d", path, self.start_epoch)

    def _load_model_only(self, path: str) -> None:
        """``run.resume_model_only``: start from a checkpoint's weights only (a new run: epoch 0,
        fresh optimizer), e.g. CALCE's stage 2 from its stage 1. A model with its own checkpoint
        loader (the refiner: ours or LAVIS-layout checkpoints) uses it."""
        path = resolve_path(path)
        if hasattr(self._model, "trainable_state_dict") and hasattr(self._model, "load_checkpoint"):
            self._model.load_checkpoint(path, map_location=self.device)
        else:
            load_model_weights(self._model, path, map_location=self.device)
        logger.info("initialised from the weights of %s (resume_model_only)", path)

    def load_weights(self, path: str) -> None:
        """Strictly load model weights (for evaluation), reporting missing/unexpected keys."""
        load_model_weights(self._model, resolve_path(path), map_location=self.device)

    # ------------------------------------------------------------------ logs
    def log_stats(self, stats: Optional[Dict[str, Any]], split_name: str, epoch) -> None:
        if not stats or not c2f_dist.is_main_process():
            return
        row = {"epoch": epoch, "split": split_name}
        row.update({k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))})
        with open(self.output_dir / "log.txt", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items() if k not in ("epoch", "split"))
        logger.info("[%s] epoch %s: %s", split_name, epoch, shown)
        if isinstance(epoch, int):
            self.scalars.epoch(stats, split_name, epoch)
        else:  # the final test of the best (or given) checkpoint
            self.scalars.epoch(stats, split_name, max(self.best_epoch, 0), best=True)

    def log_config(self) -> None:
        if c2f_dist.is_main_process():
            with open(self.output_dir / "log.txt", "a", encoding="utf-8") as f:
                f.write(json.dumps({"config": self.resolved_config()}) + "\n")
