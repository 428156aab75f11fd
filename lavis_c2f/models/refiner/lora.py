"""A minimal LoRA (Hu et al., 2021) for the T5 of the refiner.

``peft`` is not used: its current releases need a newer ``transformers`` than the 4.26 this
package pins (LAVIS 1.0.2), and the refiner only needs LoRA on ``nn.Linear`` layers.

:class:`LoRALinear` *is* an ``nn.Linear`` (same ``weight``/``bias`` parameters and state-dict
keys, so a plain T5 state dict still loads) plus two low-rank factors::

    y = x W^T + b + (dropout(x) A^T B^T) * alpha / r       A: (r, in), B: (out, r)

``B`` starts at zero, so a freshly wrapped layer computes exactly what the base layer did.
The base ``weight``/``bias`` are frozen by :func:`apply_lora`; the factors are computed in
their own dtype (float32) and cast to the base output dtype (bf16 T5 works).
"""
from __future__ import annotations

import math
from typing import Iterable, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    """``nn.Linear`` with a trainable low-rank update (see module doc).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        r: rank (> 0). alpha: scale numerator (scaling = alpha / r). dropout: on the LoRA input.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, r: int = 8,
                 alpha: float = 8.0, dropout: float = 0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.r, self.alpha, self.scaling = int(r), float(alpha), float(alpha) / float(r)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def from_linear(cls, base: nn.Linear, r: int, alpha: float, dropout: float) -> "LoRALinear":
        """A LoRA layer sharing ``base``'s weight and bias parameters."""
        layer = cls(base.in_features, base.out_features, bias=base.bias is not None, r=r,
                    alpha=alpha, dropout=dropout, device=base.weight.device)
        layer.weight = base.weight
        layer.bias = base.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        lora_in = self.lora_dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(lora_in, self.lora_A), self.lora_B) * self.scaling
        return out + update.to(out.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + scaling * B A`` in the base dtype (for export)."""
        return (self.weight.float() + self.scaling * (self.lora_B @ self.lora_A)).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, alpha={self.alpha}"


def apply_lora(module: nn.Module, target_modules: Sequence[str], r: int = 8, alpha: float = 8.0,
               dropout: float = 0.05) -> List[str]:
    """Replace every ``nn.Linear`` child of ``module`` whose attribute name is in
    ``target_modules`` (e.g. T5's ``q``, ``k``, ``v``, ``o``, ``wi_0``, ``wi_1``, ``wo``) by a
    :class:`LoRALinear`, freeze every parameter of ``module`` except the LoRA factors.

    Returns:
        the qualified names of the wrapped layers (sorted). Raises ``ValueError`` when no layer
        matches (a typo in ``target_modules`` would otherwise train nothing).
    """
    targets = set(target_modules)
    if not targets:
        raise ValueError("target_modules is empty")
    wrapped: List[str] = []
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear.from_linear(child, r, alpha, dropout))
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not wrapped:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear named {sorted(targets)} in {type(module).__name__}; "
                         f"its linear layers are named {names}")
    for name, p in module.named_parameters():
        p.requires_grad = name.endswith("lora_A") or name.endswith("lora_B")
    return sorted(wrapped)


def lora_parameters(module: nn.Module) -> Iterable[nn.Parameter]:
    """The LoRA factors of ``module``."""
    for name, p in module.named_parameters():
        if name.endswith("lora_A") or name.endswith("lora_B"):
            yield p
