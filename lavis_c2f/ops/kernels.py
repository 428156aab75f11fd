"""Kernel switches of model layers, written once: a layer that can run on more than one kernel
carries a class attribute naming it (``linear_kernel``: :mod:`lavis_c2f.ops.linear`,
``dropout_kernel``: :mod:`lavis_c2f.ops.dropout`), set on a whole model by
:func:`set_module_attribute`."""
from __future__ import annotations

from typing import Any

from torch import nn


def set_module_attribute(module: nn.Module, name: str, value: Any) -> int:
    """Set attribute ``name`` to ``value`` on every sub-module of ``module`` (itself included)
    that has it; returns how many were set."""
    n = 0
    for sub in module.modules():
        if hasattr(sub, name):
            setattr(sub, name, value)
            n += 1
    return n
