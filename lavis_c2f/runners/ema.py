"""Exponential moving average of a model's weights (``run.ema_decay``), the evaluated model.

After the t-th optimizer step (t = 1, 2, ...)::

    d_t   = min(decay, (1 + t) / (10 + t))
    ema_t = d_t * ema_{t-1} + (1 - d_t) * theta_t

over the trainable floating-point parameters ``theta`` (buffers and frozen parameters are the
model's own). ``d_t`` warms up as TensorFlow's ``ExponentialMovingAverage(num_updates=t)``, so the
average does not remember the initialisation for ``1 / (1 - decay)`` steps. Averaging the last
few hundred steps removes most of the dependence of the evaluated weights on the last mini-batches
(which rounding noise and the seed reorder), see docs/reproducibility.md.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Tuple

import torch

from lavis_c2f.common.errors import ConfigError


def ema_factor(decay: float, updates: int) -> float:
    """``d_t = min(decay, (1 + t) / (10 + t))`` for ``t = updates`` (module docstring)."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightEma:
    """The moving average of ``model``'s trainable parameters (module docstring).

    Args:
        model: the (unwrapped) model; its trainable parameters at construction start the average.
        decay: the long-run factor, 0 < decay < 1 (e.g. 0.99: about the last 100 steps).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        decay = float(decay)
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"run.ema_decay: expected a factor in (0, 1), got {decay!r}")
        self.decay = decay
        self.updates = 0
        self.shadow: Dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in self._params(model)}

    @staticmethod
    def _params(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dtype.is_floating_point]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One step of the average, after an optimizer step."""
        self.updates += 1
        d = ema_factor(self.decay, self.updates)
        for n, p in self._params(model):
            self.shadow[n].mul_(d).add_(p.detach(), alpha=1.0 - d)

    @contextmanager
    @torch.no_grad()
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Within the block the model holds the averaged weights; its own come back after."""
        params = self._params(model)
        backup = {n: p.detach().clone() for n, p in params}
        for n, p in params:
            p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            for n, p in params:
                p.copy_(backup[n])

    def checkpoint_entry(self, model: torch.nn.Module) -> Dict[str, Any]:
        """The checkpoint's ``ema`` entry, for a checkpoint whose ``model`` holds the averaged
        weights (the evaluated model): the factor, the step count and the model's own
        (training) parameters, which a resumed run continues from."""
        return {"decay": self.decay, "updates": self.updates,
                "train_params": {n: p.detach().clone() for n, p in self._params(model)}}

    @torch.no_grad()
    def restore(self, model: torch.nn.Module, entry: Dict[str, Any], source: str = "<checkpoint>") -> None:
        """Resume from a checkpoint loaded into ``model`` (its ``model`` = the average) and its
        ``ema`` entry: the average becomes the model's weights, the model gets its training
        parameters back."""
        params = self._params(model)
        train = entry.get("train_params") or {}
        missing = sorted(n for n, _ in params if n not in train)
        if missing:
            raise ConfigError(f"{source}: 'ema.train_params' lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        for n, p in params:
            self.shadow[n].copy_(p.detach())
            p.copy_(train[n])
        self.updates = int(entry.get("updates", 0))
