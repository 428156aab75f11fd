"""Linear layers whose float32 CPU products may run on oneDNN instead of the BLAS of torch.

``y = x W^T + b``; backward ``dL/dx = g W``, ``dL/dW = g^T x``, ``dL/db = sum_rows g``.

Why: torch computes a float32 ``F.linear`` on CPU with MKL's ``sgemm``. MKL picks its kernels
by CPU vendor, and on AMD processors it does not use AVX-512 even where the core has it; oneDNN
(shipped inside torch, ``torch.ops.mkldnn._linear_pointwise``) picks them by CPU features. On
the 2-core AMD EPYC (Zen 5) host of this project oneDNN runs the grounder's products (75..7500
rows, 256..1024 wide) at about 230-250 GFLOP/s on one thread against MKL's 85-115. On Intel
CPUs the two are about even. Same float32 arithmetic, another summation order: results differ
from torch's by float32 rounding (about 1e-6 relative).

Kernels (``kernel`` argument): ``"torch"`` (``F.linear``, always) or ``"onednn"``: oneDNN for
float32 CPU products of at least :data:`ONEDNN_MIN_MACS` multiply-adds (rows x in x out)
and :data:`ONEDNN_MIN_COLS` output columns (below that its fixed cost per call, about 10 us,
outweighs the gain: measured crossovers 16 rows at 256 -> 256, 4 rows at 256 -> 1024), else
``F.linear``. Where oneDNN is missing (:func:`onednn_available`) ``"onednn"`` runs ``F.linear``
(:func:`set_linear_kernel` warns once).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lavis_c2f.ops.kernels import set_module_attribute
from lavis_c2f.ops.param_cache import CachingModule, frozen

LINEAR_KERNELS = ("torch", "onednn")
#: fewest multiply-adds and output columns a product needs to run on oneDNN
ONEDNN_MIN_MACS = 1 << 20
ONEDNN_MIN_COLS = 16
#: fewest multiply-adds with a packed weight (:func:`pack_weight`; its fixed cost is lower:
#: measured 16.8 against MKL's 18.8 us at 10 x 256 -> 256, 29.8 against 55.6 at 10 x 256 -> 768,
#: MKL ahead at 1 x 256 -> 1024)
ONEDNN_PACKED_MIN_MACS = 1 << 19
#: the batch-size hint oneDNN picks a packed layout for (the grounder's clip rows)
PACK_ROWS_HINT = 75


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and its linear operator."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = onednn_available()


def _on_onednn(a: torch.Tensor, w: torch.Tensor, min_macs: int = ONEDNN_MIN_MACS) -> bool:
    """``a`` (..., K) times ``w`` (N, K)^T is worth running on oneDNN (``min_macs``:
    :data:`ONEDNN_PACKED_MIN_MACS` with a packed weight)."""
    return (_ONEDNN and a.device.type == "cpu" and a.dtype == torch.float32
            and w.dtype == torch.float32 and w.shape[0] >= ONEDNN_MIN_COLS
            and a.numel() * w.shape[0] >= min_macs)


def _product(a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """``a`` (..., K) @ ``w`` (N, K)^T + ``b`` (N,) on oneDNN when worth it, else torch."""
    if _on_onednn(a, w):
        return torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")
    return F.linear(a, w, b)


class _OneDNNLinear(torch.autograd.Function):
    """Autograd of :func:`linear` with ``kernel="onednn"`` (the three products of a linear
    layer, each on oneDNN when worth it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,  # noqa: D102
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (M, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # g (M, N) @ W (N, K)
            grad_x = _product(g, weight.t(), None).reshape(x.shape)
        if ctx.needs_input_grad[1]:  # g^T (N, M) @ x (M, K)
            grad_w = _product(g.t(), x.reshape(-1, x.shape[-1]).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def pack_weight(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """oneDNN's own layout of ``weight`` (N, K) for inference products
    (``torch.ops.mkldnn._reorder_linear_weight``; same results bit for bit, 5-25% faster per
    product on the grounder's shapes), or None where oneDNN is missing or ``weight`` is not a
    float32 CPU tensor. Without gradient; rebuild it when the weight changes
    (:class:`~lavis_c2f.ops.param_cache.ParamCache`)."""
    if not (_ONEDNN and weight.device.type == "cpu" and weight.dtype == torch.float32):
        return None
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


class InferenceWeights(NamedTuple):
    """A product's weight (N, K), bias (N,) or None and oneDNN-packed weight (or None)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    packed: Optional[torch.Tensor]


def inference_weights(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> InferenceWeights:
    """Detached ``weight``/``bias`` with the packed weight (:func:`pack_weight`)."""
    return InferenceWeights(weight.detach(), None if bias is None else bias.detach(),
                            pack_weight(weight))


def concat_linear(layers: Sequence[nn.Linear]) -> InferenceWeights:
    """:class:`InferenceWeights` of linear layers of one input width stacked in order
    (weights (sum N_i, K), biases (sum N_i,), a layer without bias contributing zeros): one
    product ``x [W_1; ...; W_n]^T`` for n products of the same input."""
    weight = torch.cat([m.weight.detach() for m in layers], dim=0).contiguous()
    bias = torch.cat([m.bias.detach() if m.bias is not None
                      else m.weight.new_zeros(m.weight.shape[0]) for m in layers])
    return inference_weights(weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           kernel: str = "torch", packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` (..., K) @ ``weight`` (N, K)^T + ``bias`` (N,) -> (..., N) with ``kernel`` (see
    the module doc); differentiable in all three inputs. ``packed``: :func:`pack_weight` of
    ``weight``, used by oneDNN products without gradient."""
    min_macs = ONEDNN_MIN_MACS if packed is None else ONEDNN_PACKED_MIN_MACS
    if kernel == "torch" or not _on_onednn(x, weight, min_macs):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    if packed is None:
        return _product(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def frozen_linear(x: torch.Tensor, weights: InferenceWeights, kernel: str) -> torch.Tensor:
    """:func:`linear` of :class:`InferenceWeights` (inference only)."""
    return linear(x, weights.weight, weights.bias, kernel, weights.packed)


class Linear(CachingModule, nn.Linear):
    """``torch.nn.Linear`` (same parameters and state-dict keys) whose product runs on the
    kernel named by its ``linear_kernel`` attribute (:func:`set_linear_kernel`; ``"torch"``
    after construction)."""

    linear_kernel = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features); at inference with kernel ``onednn``
        the product takes the packed weight (:func:`pack_weight`, once per weight version)."""
        if (self.linear_kernel == "onednn" and frozen(self)
                and _on_onednn(x, self.weight, ONEDNN_PACKED_MIN_MACS)):
            weights = self._cache.get("packed", (self.weight, self.bias), self.inference_weights)
            return frozen_linear(x, weights, "onednn")
        return linear(x, self.weight, self.bias, self.linear_kernel)

    def inference_weights(self) -> InferenceWeights:
        """This layer's :class:`InferenceWeights`."""
        return inference_weights(self.weight, self.bias)


def set_linear_kernel(module: nn.Module, kernel: str) -> int:
    """Set ``linear_kernel`` on every sub-module of ``module`` that has one (:class:`Linear`,
    and layers that call :func:`linear` themselves).

    Args:
        module: the model.
        kernel: one of :data:`LINEAR_KERNELS`; ``"onednn"`` where oneDNN is missing warns and
            sets ``"torch"``.
    Returns:
        the number of sub-modules set.
    """
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"unknown linear kernel '{kernel}', expected one of {LINEAR_KERNELS}")
    if kernel == "onednn" and not _ONEDNN:
        warnings.warn("linear_kernel 'onednn': this torch build has no oneDNN linear operator; "
                      "using torch's", RuntimeWarning, stacklevel=2)
        kernel = "torch"
    return set_module_attribute(module, "linear_kernel", kernel)
