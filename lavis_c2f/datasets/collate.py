"""Padding helpers shared by the collaters."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def pad_sequences(seqs: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32,
                  min_len: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad tensors of shape (L_i, *rest) at the end of the first axis.

    Returns ``(padded (B, L, *rest), mask (B, L) float32)`` with mask 1 = valid. ``L`` is the
    longest ``L_i`` but at least ``min_len`` (so a batch of empty sequences still gives a
    (B, 1, ...) all-padding tensor with mask 0 rather than a zero-size axis).
    """
    if len(seqs) == 0:
        raise ValueError("pad_sequences needs at least one sequence")
    rest = tuple(seqs[0].shape[1:])
    for i, s in enumerate(seqs):
        if tuple(s.shape[1:]) != rest:
            raise ValueError(f"sequence {i} has trailing shape {tuple(s.shape[1:])}, expected {rest}")
    length = max([int(s.shape[0]) for s in seqs] + [min_len])
    out = torch.zeros((len(seqs), length) + rest, dtype=dtype)
    mask = torch.zeros((len(seqs), length), dtype=torch.float32)
    for i, s in enumerate(seqs):
        n = int(s.shape[0])
        if n:
            out[i, :n] = s.to(dtype)
            mask[i, :n] = 1.0
    return out, mask


def stack_lists(rows: List[Sequence[int]], width: int) -> torch.Tensor:
    """List of equal-length int lists -> LongTensor (B, width)."""
    t = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) != width:
            raise ValueError(f"row {i} has {len(r)} entries, expected {width}")
        t[i] = torch.as_tensor(list(r), dtype=torch.long)
    return t
