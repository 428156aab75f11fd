"""Learning-rate schedules registered with LAVIS (stateless: ``step(cur_epoch, cur_step)``).

Stateless schedules make resuming exact: the lr of any (epoch, step) is a pure function.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from lavis.common.registry import registry

from lavis_c2f.common.errors import ConfigError


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _warmup(step: int, warmup_steps: int, start: float, target: float) -> float:
    if warmup_steps <= 0 or step >= warmup_steps:
        return target
    return start + (target - start) * step / warmup_steps


@registry.register_lr_scheduler("c2f_step_lr")
class StepLRScheduler:
    """QD-DETR's schedule: ``init_lr`` multiplied by ``gamma`` at each epoch in ``milestones``
    (or every ``lr_drop`` epochs), with an optional linear warm-up over the first steps of epoch 0."""

    def __init__(self, optimizer, max_epoch: int, init_lr: float, min_lr: float = 0.0,
                 lr_drop: Optional[int] = None, milestones: Optional[Sequence[int]] = None,
                 gamma: float = 0.1, warmup_steps: int = 0, warmup_start_lr: float = -1, **kwargs):
        self.optimizer = optimizer
        self.init_lr, self.min_lr, self.gamma = float(init_lr), float(min_lr), float(gamma)
        self.lr_drop = int(lr_drop) if lr_drop else None
        self.milestones = sorted(int(m) for m in (milestones or []))
        self.warmup_steps = int(warmup_steps or 0)
        self.warmup_start_lr = float(warmup_start_lr) if warmup_start_lr is not None and warmup_start_lr >= 0 else self.init_lr

    def lr_at(self, cur_epoch: int, cur_step: int) -> float:
        n_drops = sum(1 for m in self.milestones if cur_epoch >= m)
        if self.lr_drop:
            n_drops += cur_epoch // self.lr_drop
        lr = max(self.min_lr, self.init_lr * (self.gamma ** n_drops))
        if cur_epoch == 0:
            lr = _warmup(cur_step, self.warmup_steps, self.warmup_start_lr, lr)
        return lr

    def step(self, cur_epoch: int, cur_step: int) -> None:
        _set_lr(self.optimizer, self.lr_at(cur_epoch, cur_step))


@registry.register_lr_scheduler("c2f_constant_lr")
class ConstantLRScheduler(StepLRScheduler):
    """Constant ``init_lr`` after an optional warm-up."""

    def __init__(self, optimizer, max_epoch: int, init_lr: float, **kwargs):
        kwargs.pop("lr_drop", None)
        kwargs.pop("milestones", None)
        super().__init__(optimizer, max_epoch=max_epoch, init_lr=init_lr, lr_drop=None, milestones=None, **kwargs)


@registry.register_lr_scheduler("c2f_warmup_cosine_lr")
class WarmupCosineLRScheduler:
    """Per-step linear warm-up from 0, then a half cosine down to ``min_lr`` over the whole run
    (transformers' ``get_cosine_schedule_with_warmup``, which T-MASS uses)::

        s = cur_epoch * iters_per_epoch + cur_step        S = max_epoch * iters_per_epoch
        lr(s) = init_lr * s / W                                      for s < W
              = min_lr + (init_lr - min_lr) * (1 + cos(pi (s - W) / (S - W))) / 2   otherwise

    with ``W = warmup_steps`` or ``int(warmup_proportion * S)`` (T-MASS: 0.1). Every parameter
    group gets ``lr(s) * lr_scale`` (the runner's ``lr_groups``).
    """

    def __init__(self, optimizer, max_epoch: int, init_lr: float, min_lr: float = 0.0, warmup_steps: int = 0,
                 warmup_proportion: Optional[float] = None, iters_per_epoch: Optional[int] = None, **kwargs):
        if not iters_per_epoch or int(iters_per_epoch) < 1:
            raise ConfigError("c2f_warmup_cosine_lr needs the number of steps per epoch (the runner passes it)")
        self.optimizer = optimizer
        self.init_lr, self.min_lr = float(init_lr), float(min_lr)
        self.iters_per_epoch = int(iters_per_epoch)
        self.total = max(1, int(max_epoch) * self.iters_per_epoch)
        if warmup_proportion is not None:
            p = float(warmup_proportion)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"run.warmup_proportion: expected a fraction in [0, 1), got {warmup_proportion!r}")
            self.warmup = int(p * self.total)
        else:
            self.warmup = int(warmup_steps or 0)

    def lr_at(self, cur_epoch: int, cur_step: int) -> float:
        s = int(cur_epoch) * self.iters_per_epoch + int(cur_step)
        if s < self.warmup:
            return self.init_lr * s / max(1, self.warmup)
        progress = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self, cur_epoch: int, cur_step: int) -> None:
        _set_lr(self.optimizer, self.lr_at(cur_epoch, cur_step))


@registry.register_lr_scheduler("c2f_linear_warmup_cosine_lr")
class LinearWarmupCosineLRScheduler(StepLRScheduler):
    """LAVIS's ``linear_warmup_cosine_lr`` (BLIP-2, Mr. BLIP, CALCE), stateless. In epoch 0 the
    lr rises linearly ``warmup_start_lr -> init_lr`` over ``warmup_steps`` steps (then stays at
    ``init_lr``); from epoch ``e >= 1`` it is
    ``min_lr + (init_lr - min_lr) * 0.5 * (1 + cos(pi * e / max_epoch))``."""

    def __init__(self, optimizer, max_epoch: int, init_lr: float, min_lr: float = 0.0, warmup_steps: int = 0,
                 warmup_start_lr: float = -1, **kwargs):
        super().__init__(optimizer, max_epoch=max_epoch, init_lr=init_lr, min_lr=min_lr,
                         warmup_steps=warmup_steps, warmup_start_lr=warmup_start_lr)
        self.max_epoch = int(max_epoch)

    def lr_at(self, cur_epoch: int, cur_step: int) -> float:
        if cur_epoch == 0:
            return min(self.init_lr, self.warmup_start_lr + (self.init_lr - self.warmup_start_lr)
                       * cur_step / max(self.warmup_steps, 1))
        return (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * cur_epoch / max(self.max_epoch, 1))) \
            + self.min_lr


def bert_warmup_cosine(progress: float, warmup: float) -> float:
    """BertAdam's ``warmup_cosine`` factor at ``progress`` = step / total steps:
    ``progress / warmup`` below ``warmup``, else ``0.5 (1 + cos(pi progress))`` (the cosine runs
    over the whole of training, so it jumps from 1 to ``0.5 (1 + cos(pi warmup))`` at the end of
    the warm-up, as in CLIP4Clip / UCoFiA)."""
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@registry.register_lr_scheduler("c2f_bertadam_warmup_cosine")
class BertAdamWarmupCosineScheduler:
    """CLIP4Clip / UCoFiA's ``BertAdam(schedule="warmup_cosine")`` on ``torch.optim.AdamW``.

    Optimizer step ``t`` (0-based, counted over epochs as ``iters_per_epoch`` batches of
    ``accum_grad_iters``) runs at ``lr_g = init_lr * lr_scale_g * bert_warmup_cosine(t / T,
    warmup_proportion)`` with ``T`` the steps of ``max_epoch`` epochs (so the first step has
    lr 0, as BertAdam's; ``lr_scale_g`` from the runner's ``lr_groups``). Unlike
    ``c2f_warmup_cosine_lr`` (transformers' schedule, T-MASS) the cosine spans the whole run.

    BertAdam is Adam **without bias correction** with decoupled weight decay,
    ``p -= lr (m / (sqrt(v) + eps) + wd p)``. ``torch.optim.AdamW`` at step ``t + 1`` computes
    ``p -= lr' (m / c1) / (sqrt(v) / sqrt(c2) + eps') + lr' wd' p`` with ``c1 = 1 - b1^(t+1)``,
    ``c2 = 1 - b2^(t+1)``, so with ``adam_bias_correction: false`` (default) this schedule sets
    ``lr' = lr c1 / sqrt(c2)``, ``eps' = eps / sqrt(c2)``, ``wd' = wd sqrt(c2) / c1`` in every
    group, and AdamW's update is BertAdam's exactly (``tests/unit/runner/test_bertadam_schedule.py``).
    BertAdam's per-tensor gradient clip at 1.0 is a no-op after the runner's global clip at 1.0.
    Stateless: the settings of any (epoch, step) are a pure function of it (exact resume).
    """

    def __init__(self, optimizer, max_epoch: int, init_lr: float, iters_per_epoch: Optional[int] = None,
                 warmup_proportion: Optional[float] = 0.1, accum_grad_iters: int = 1,
                 adam_bias_correction: bool = False, **kwargs):
        if iters_per_epoch is None or int(iters_per_epoch) < 1:
            raise ConfigError("c2f_bertadam_warmup_cosine needs the number of steps per epoch (the runner passes it)")
        warmup_proportion = 0.1 if warmup_proportion is None else warmup_proportion
        if not 0.0 < float(warmup_proportion) < 1.0:
            raise ConfigError(f"run.warmup_proportion: expected a fraction in (0, 1), got {warmup_proportion!r}")
        self.optimizer = optimizer
        self.init_lr, self.warmup = float(init_lr), float(warmup_proportion)
        self.accum = max(1, int(accum_grad_iters))
        self.steps_per_epoch = -(-int(iters_per_epoch) // self.accum)
        self.total_steps = self.steps_per_epoch * int(max_epoch)
        self.bias_correction = bool(adam_bias_correction)
        for g in optimizer.param_groups:
            g.setdefault("base_eps", g["eps"])
            g.setdefault("base_weight_decay", g["weight_decay"])

    def optimizer_step(self, cur_epoch: int, cur_step: int) -> int:
        """0-based index of the optimizer step that batch ``cur_step`` of ``cur_epoch`` belongs to."""
        return int(cur_epoch) * self.steps_per_epoch + int(cur_step) // self.accum

    def factor(self, t: int) -> float:
        return bert_warmup_cosine(t / max(1, self.total_steps), self.warmup)

    def step(self, cur_epoch: int, cur_step: int) -> None:
        t = self.optimizer_step(cur_epoch, cur_step)
        f = self.factor(t)
        for g in self.optimizer.param_groups:
            lr = self.init_lr * g.get("lr_scale", 1.0) * f
            if self.bias_correction:
                g["lr"], g["eps"], g["weight_decay"] = lr, g["base_eps"], g["base_weight_decay"]
                continue
            b1, b2 = g["betas"]
            c1, c2 = 1.0 - b1 ** (t + 1), math.sqrt(1.0 - b2 ** (t + 1))
            g["lr"] = lr * c1 / c2
            g["eps"] = g["base_eps"] / c2
            g["weight_decay"] = g["base_weight_decay"] * c2 / c1
