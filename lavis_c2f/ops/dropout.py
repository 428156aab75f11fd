"""Dropout whose keep mask is drawn from raw random bits instead of ``bernoulli_``.

``y = x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` per element; backward ``g * m / (1 - p)``.

Why: on CPU torch's ``F.dropout`` draws its mask with ``bernoulli_`` (about 4 ns per element on
one thread here: 11% of a grounder training step before its products moved to oneDNN, more
after). Kernel ``"bits"`` draws 64 random bits per two elements from torch's default generator
(``random_`` over the full int64 range, seeded by ``torch.manual_seed``) and keeps element i
when its 32-bit word ``u_i >= round(p * 2^32)`` (as signed int32: ``u_i - 2^31 >= round(p *
2^32) - 2^31``): P(keep) = 1 - p to within 2^-32, half the time of ``F.dropout``. The masks
follow the same distribution as torch's but are other draws, so a seeded run does not repeat a
run with kernel ``"torch"`` (the same holds between torch versions).

Kernels: ``"torch"`` (``F.dropout``, always; the official code's masks, which the train-parity
step check records and replays through ``F.dropout``) or ``"bits"`` (CPU tensors; elsewhere
``F.dropout``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lavis_c2f.ops.kernels import set_module_attribute

DROPOUT_KERNELS = ("torch", "bits")


def keep_mask(shape: torch.Size, p: float, device: torch.device = torch.device("cpu")
              ) -> torch.Tensor:
    """Bool tensor of ``shape``, each element True (kept) with probability ``1 - p`` (to within
    2^-32), from the default generator's raw bits (module doc)."""
    n = 1
    for s in shape:
        n *= int(s)
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    threshold = int(round(p * 2.0 ** 32)) - 2 ** 31  # P(int32 word >= threshold) = 1 - p
    return (words.view(torch.int32)[:n] >= threshold).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool, kernel: str = "torch") -> torch.Tensor:
    """Dropout of ``x`` (any shape) at rate ``p`` with ``kernel`` (module doc); identity outside
    training or at ``p == 0``."""
    if not training or p == 0.0:
        return x
    if kernel == "torch" or x.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(x, p, True)
    scale = keep_mask(x.shape, p, x.device).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * scale


class Dropout(nn.Dropout):
    """``torch.nn.Dropout`` (no parameters) drawing its masks with the kernel named by its
    ``dropout_kernel`` attribute (:func:`set_dropout_kernel`; ``"torch"`` after construction)."""

    dropout_kernel = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(...) -> (...)."""
        return dropout(x, self.p, self.training, self.dropout_kernel)


def set_dropout_kernel(module: nn.Module, kernel: str) -> int:
    """Set ``dropout_kernel`` on every sub-module of ``module`` that has one (:class:`Dropout`,
    and layers that call :func:`dropout` themselves); ``kernel`` one of
    :data:`DROPOUT_KERNELS`. Returns the number of sub-modules set."""
    if kernel not in DROPOUT_KERNELS:
        raise ValueError(f"unknown dropout kernel '{kernel}', expected one of {DROPOUT_KERNELS}")
    return set_module_attribute(module, "dropout_kernel", kernel)
