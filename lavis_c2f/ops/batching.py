"""Batch-independent results: every matrix product gets at least :data:`GEMM_MIN_ROWS` rows.

PyTorch's CPU matrix product computes a one-row operand with BLAS's matrix-vector kernel, whose
rounding differs from the GEMM kernel's; from a few rows on, each output row of ``X @ W`` is
bit-identical whatever the other rows of ``X`` are (checked by
``tests/unit/index/test_batched_search.py``). A batch of one query is therefore padded by
repeating its last row, and the padding rows are dropped after the product::

    idx = padded_index(n)          # [0, 1, ..., n-1, n-1, ..., n-1], len max(n, GEMM_MIN_ROWS)
    y = f(x[idx])[:n]

so searching a query alone and inside a batch of 256 gives identical scores.
"""
from __future__ import annotations

import numpy as np

#: rows a product needs for BLAS to use its GEMM kernel (1 row: GEMV; 7 rows suffice here)
GEMM_MIN_ROWS = 8


def padded_index(n: int, min_rows: int = GEMM_MIN_ROWS) -> np.ndarray:
    """(max(n, min_rows),) int64 row indices ``0 .. n-1`` followed by ``n - 1`` repeated (n >= 1)."""
    if n < 1:
        raise ValueError(f"padded_index needs n >= 1, got {n}")
    idx = np.arange(max(n, int(min_rows)), dtype=np.int64)
    return np.minimum(idx, n - 1)


__all__ = ["GEMM_MIN_ROWS", "padded_index"]
