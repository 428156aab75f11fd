"""TensorBoard scalars of a training run, written to ``<run dir>/tensorboard/`` (rank 0 only).

Tags and steps (what Moment-DETR / QD-DETR users are used to watching):

* ``train/<loss>`` and ``train/lr``: every optimisation step, at the global step
  ``epoch * iters_per_epoch + i`` (the loss of that step on rank 0; ``lr`` of the first
  parameter group after the schedule's update);
* ``train_epoch/<loss>``: the epoch means over all ranks (what ``log.txt`` holds), step = epoch;
* ``<split>/<metric>``: every numeric evaluation metric of a validation split, step = epoch;
  the final test of the best checkpoint goes to ``<split>/best/<metric>`` at the best epoch.

Events go through ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard``
package); watch them with ``tensorboard --logdir <output_dir>``.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Optional

logger = logging.getLogger(__name__)

SUBDIR = "tensorboard"


def _numeric(values: Mapping[str, Any]):
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            yield str(k), float(v)


class ScalarWriter:
    """Scalar events of one run (see the module docstring); a disabled writer does nothing.

    Args:
        run_dir: the run's output folder; events go to ``run_dir/tensorboard``.
        enabled: False (``run.tensorboard: false``, or a rank other than 0) writes nothing.
        flush_secs: seconds between flushes to disk.
    """

    def __init__(self, run_dir: "os.PathLike[str] | str", enabled: bool = True, flush_secs: int = 30):
        self.log_dir = os.path.join(os.fspath(run_dir), SUBDIR)
        self.enabled = bool(enabled)
        self.flush_secs = int(flush_secs)
        self._writer = None

    def _get(self):
        """The SummaryWriter, created on the first scalar (no empty event file otherwise)."""
        if self._writer is None and self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # the tensorboard package is missing
                logger.warning("TensorBoard logging is off: %s (pip install tensorboard, or set "
                               "run.tensorboard: false)", e)
                self.enabled = False
                return None
            self._writer = SummaryWriter(log_dir=self.log_dir, flush_secs=self.flush_secs)
        return self._writer

    def step(self, values: Mapping[str, Any], global_step: int) -> None:
        """Per-step ``train/<name>`` scalars (losses and ``lr``)."""
        w = self._get()
        if w is None:
            return
        for k, v in _numeric(values):
            w.add_scalar(f"train/{k}", v, int(global_step))

    def epoch(self, values: Mapping[str, Any], split: str, epoch: int, best: bool = False) -> None:
        """Per-epoch scalars: ``train_epoch/<name>`` for split ``train``, else ``<split>/<name>``
        (``<split>/best/<name>`` when ``best``)."""
        w = self._get()
        if w is None:
            return
        prefix = "train_epoch" if split == "train" else (f"{split}/best" if best else split)
        for k, v in _numeric(values):
            w.add_scalar(f"{prefix}/{k}", v, int(epoch))
        w.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
