"""Padding helpers shared by the collaters."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import numpy as np
import torch


def _to_numpy(x: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def pad_sequences(seqs: Sequence[Union[torch.Tensor, np.ndarray]], dtype: torch.dtype = torch.float32,
                  min_len: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad tensors of shape (L_i, *rest) at the end of the first axis.

    Returns ``(padded (B, L, *rest), mask (B, L) float32)`` with mask 1 = valid. ``L`` is the
    longest ``L_i`` but at least ``min_len`` (so a batch of empty sequences still gives a
    (B, 1, ...) all-padding tensor with mask 0 rather than a zero-size axis).
    The copy is done in numpy: on small CPUs ``torch.zeros`` + per-row ``__setitem__`` is
    tens of times slower for (32, 75, 514) batches.
    """
    if len(seqs) == 0:
        raise ValueError("pad_sequences needs at least one sequence")
    arrays = [_to_numpy(s) for s in seqs]
    rest = tuple(arrays[0].shape[1:])
    for i, a in enumerate(arrays):
        if tuple(a.shape[1:]) != rest:
            raise ValueError(f"sequence {i} has trailing shape {tuple(a.shape[1:])}, expected {rest}")
    length = max([int(a.shape[0]) for a in arrays] + [min_len])
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    out = np.zeros((len(arrays), length) + rest, dtype=np_dtype)
    mask = np.zeros((len(arrays), length), dtype=np.float32)
    for i, a in enumerate(arrays):
        n = int(a.shape[0])
        if n:
            out[i, :n] = a
            mask[i, :n] = 1.0
    return torch.from_numpy(out), torch.from_numpy(mask)


def stack_lists(rows: List[Sequence[int]], width: int) -> torch.Tensor:
    """List of equal-length int lists -> LongTensor (B, width)."""
    for i, r in enumerate(rows):
        if len(r) != width:
            raise ValueError(f"row {i} has {len(r)} entries, expected {width}")
    return torch.from_numpy(np.asarray([list(r) for r in rows], dtype=np.int64).reshape(len(rows), width))
