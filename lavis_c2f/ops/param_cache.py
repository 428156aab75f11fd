"""Tensors derived from parameters, computed once and reused while the parameters stay the same.

Inference of a small batch is bound by the number of torch calls, not by arithmetic; two kinds
of work can be done once per weight version instead of once per call:

* concatenated weights ``[W_1; ...; W_n]`` (and biases) of products that share an input, so
  that ``x [W_1; ...; W_n]^T`` replaces n products (each column block is the same dot products;
  results agree to float32 rounding);
* a sample-independent prefix of a forward pass (e.g. a decoder's first-layer queries).

A value is keyed by its parameters' storage, version counter, dtype and device
(``(p.data_ptr(), p._version, p.dtype, p.device)`` each): an optimiser step or
``load_state_dict`` (in-place writes bump the version) and ``.to()`` / ``.half()`` (new storage)
change the key, and the value is rebuilt on its next use. Values carry no autograd graph, so
callers use them only while no gradient is recorded (:func:`frozen`). Copies and pickles of a
cache start empty.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import nn


def frozen(module: nn.Module) -> bool:
    """``module`` runs inference: eval mode and no gradient recorded (the only state in which a
    :class:`ParamCache` value may stand in for a computation on the parameters)."""
    return not module.training and not torch.is_grad_enabled()


def _key(params: Sequence[torch.Tensor]) -> Tuple[Any, ...]:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)


class ParamCache:
    """Named values, each rebuilt when one of the parameters it was derived from changed."""

    def __init__(self) -> None:
        self._values: Dict[str, Tuple[Tuple[Any, ...], Any]] = {}

    def get(self, name: str, params: Sequence[torch.Tensor], build: Callable[[], Any]) -> Any:
        """The value ``name`` built by ``build()`` from ``params`` (rebuilt when they changed)."""
        key = _key(params)
        hit = self._values.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        self._values[name] = (key, value)
        return value

    def clear(self) -> None:
        """Drop every value (e.g. when the module goes back to training)."""
        self._values.clear()

    def __len__(self) -> int:
        return len(self._values)

    # copies and pickles start empty: the values belong to the original's parameters (and
    # oneDNN-packed weights cannot be copied or pickled)
    def __deepcopy__(self, memo: Dict[int, Any]) -> "ParamCache":
        return ParamCache()

    def __getstate__(self) -> Dict[str, Any]:
        return {"_values": {}}


class CachingModule(nn.Module):
    """A module that keeps weight-derived values in ``self._cache`` (a :class:`ParamCache`,
    created here); ``train()`` drops them (``eval()`` keeps them): training changes the weights at
    every step, so nothing cached would be reused, and the memory is freed."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._cache = ParamCache()

    def train(self, mode: bool = True) -> "CachingModule":
        """``nn.Module.train``; training mode drops the cached values."""
        if mode:
            self._cache.clear()
        return super().train(mode)


def linear_params(layers: Sequence[nn.Linear]) -> Tuple[torch.Tensor, ...]:
    """The parameters of ``layers`` in order (the cache key of
    :func:`lavis_c2f.ops.linear.concat_linear`)."""
    return tuple(p for m in layers for p in ((m.weight,) if m.bias is None else (m.weight, m.bias)))
