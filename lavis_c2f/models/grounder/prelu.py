"""PReLU with a fast backward pass (the FFN activation of every grounder layer).

Forward: ``y = x if x > 0 else w * x`` (``torch.prelu``, the official kernel, bit for bit).
Backward, with ``n = 1[x <= 0]`` as a float mask:

    dL/dx = g * (n * w + (1 - n))        (exactly g where x > 0 and g * w elsewhere)
    dL/dw = sum(g * min(x, 0))

torch's own PReLU backward kernel on CPU costs about 6 ns per element (about 7% of a QD-DETR
training step at batch 32); these few vectorised element-wise passes cost about a quarter of
that. ``dL/dx`` is bit-identical to torch's; ``dL/dw`` is the same products summed by the same
reduction kernel, from products taken in another form (``g * min(x, 0)`` instead of
``x > 0 ? 0 : g * x``; float32 rounding, about 1e-7 relative).
"""
from __future__ import annotations

import torch
from torch import nn


class _PReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x, weight)
        return torch.prelu(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * x.clamp_max(0)).sum().reshape(weight.shape)
        if ctx.needs_input_grad[0]:
            negative = (x <= 0).to(grad.dtype)
            scale = torch.addcmul(1.0 - negative, negative, weight)  # w where x <= 0, else 1
            grad_x = grad * scale
        return grad_x, grad_w


class PReLU(nn.PReLU):
    """``torch.nn.PReLU`` with a single parameter (``weight``, shape (1,), as in the official
    checkpoints) and the fast backward of the module doc."""

    def __init__(self, init: float = 0.25):
        super().__init__(num_parameters=1, init=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(...) -> (...)."""
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _PReLUFunction.apply(x, self.weight)
        return torch.prelu(x, self.weight)
