"""NumPy's scalar introsort argsort, written out so that ties break the same on every CPU.

The official QD-DETR and MESM datasets pick the hard saliency positive/negative clips with
``np.argsort(agg_scores)`` (default ``kind="quicksort"``). Their pinned NumPy (1.17 / 1.21)
runs NumPy's scalar introsort (``npysort/quicksort.cpp``, ``aquicksort_``): median-of-3
quicksort on ranges of more than 16 elements, insertion sort on shorter ones, heapsort past a depth limit of
``2 * floor(log2(n))``. It is deterministic for a given array but not stable, and with the
many ties of QVHighlights-style saliency (three annotators, scores 0-4) the order of tied
clips is what decides the hard labels.

NumPy >= 1.25 sends ``np.argsort`` of 64-bit numbers to x86-simd-sort on CPUs with AVX-512
(and NumPy 2 also on AVX2), which orders ties differently. ``np.argsort`` therefore gives
different labels on different machines; :func:`introsort_argsort` gives the official
(pre-SIMD) order everywhere. ``tests/unit/ops/test_argsort.py`` checks it against
``np.argsort`` with the SIMD paths switched off (``NPY_DISABLE_CPU_FEATURES``).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import numpy as np

SMALL_QUICKSORT = 15  # numpy's npysort_common.h: a range [pl, pr] with pr - pl <= 15 is insertion-sorted


def scalar_sort_env(env: Mapping[str, str]) -> Dict[str, str]:
    """``env`` plus ``NPY_DISABLE_CPU_FEATURES`` so that a child NumPy sorts with its scalar introsort.

    Names the CPU features of this machine that send ``np.argsort`` of 64-bit numbers to SIMD
    sorts (AVX-512 from NumPy 1.25, also AVX2 from NumPy 2). For running code that relies on
    ``np.argsort``'s tie order (the official QD-DETR / MESM datasets) as under its pinned NumPy.
    """
    try:
        from numpy.core._multiarray_umath import __cpu_features__
    except ImportError:  # NumPy 2 moved it
        from numpy._core._multiarray_umath import __cpu_features__  # type: ignore[no-redef]
    simd = [name for name, on in __cpu_features__.items() if on and name.startswith("AVX512")]
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0" and __cpu_features__.get("AVX2"):
        simd.append("AVX2")
    out = dict(env)
    if simd:
        out["NPY_DISABLE_CPU_FEATURES"] = " ".join(simd)
    return out


def _heapsort(v: Sequence[float], idx: List[int], lo: int, n: int) -> None:
    """NumPy's ``aheapsort_`` on ``idx[lo:lo + n]`` (1-based heap indexing as in the C code)."""
    def get(k: int) -> int:
        return idx[lo + k - 1]

    def put(k: int, val: int) -> None:
        idx[lo + k - 1] = val

    def sift_down(i: int, tmp: int, end: int) -> None:
        j = i << 1
        while j <= end:
            if j < end and v[get(j)] < v[get(j + 1)]:
                j += 1
            if v[tmp] < v[get(j)]:
                put(i, get(j))
                i, j = j, j + j
            else:
                break
        put(i, tmp)

    for start in range(n >> 1, 0, -1):
        sift_down(start, get(start), n)
    while n > 1:
        tmp = get(n)
        put(n, get(1))
        n -= 1
        sift_down(1, tmp, n)


def introsort_argsort(values: Sequence[float]) -> np.ndarray:
    """Indices that sort ``values`` increasingly, ties ordered as NumPy's scalar introsort orders them.

    Args:
        values: (N,) numbers without NaN.
    Returns:
        (N,) int64 permutation, equal to ``np.argsort(values)`` of NumPy 1.17-1.24 (and of later
        NumPy with its SIMD sorts disabled).
    """
    v = [float(x) for x in np.asarray(values, dtype=np.float64).reshape(-1)]
    n = len(v)
    idx = list(range(n))
    if n < 2:
        return np.asarray(idx, dtype=np.int64)
    stack: List[int] = []
    depths: List[int] = []
    pl, pr = 0, n - 1
    cdepth = 2 * (n.bit_length() - 1)
    while True:
        if cdepth < 0:
            _heapsort(v, idx, pl, pr - pl + 1)
        else:
            while pr - pl > SMALL_QUICKSORT:
                pm = pl + ((pr - pl) >> 1)
                if v[idx[pm]] < v[idx[pl]]:
                    idx[pm], idx[pl] = idx[pl], idx[pm]
                if v[idx[pr]] < v[idx[pm]]:
                    idx[pr], idx[pm] = idx[pm], idx[pr]
                if v[idx[pm]] < v[idx[pl]]:
                    idx[pm], idx[pl] = idx[pl], idx[pm]
                vp = v[idx[pm]]
                pi, pj = pl, pr - 1
                idx[pm], idx[pj] = idx[pj], idx[pm]
                while True:
                    pi += 1
                    while v[idx[pi]] < vp:
                        pi += 1
                    pj -= 1
                    while vp < v[idx[pj]]:
                        pj -= 1
                    if pi >= pj:
                        break
                    idx[pi], idx[pj] = idx[pj], idx[pi]
                pk = pr - 1
                idx[pi], idx[pk] = idx[pk], idx[pi]
                if pi - pl < pr - pi:  # push the larger partition
                    stack += [pi + 1, pr]
                    pr = pi - 1
                else:
                    stack += [pl, pi - 1]
                    pl = pi + 1
                cdepth -= 1
                depths.append(cdepth)
            for pi in range(pl + 1, pr + 1):  # insertion sort
                vi = idx[pi]
                vp = v[vi]
                pj = pi
                while pj > pl and vp < v[idx[pj - 1]]:
                    idx[pj] = idx[pj - 1]
                    pj -= 1
                idx[pj] = vi
        if not stack:
            break
        pr = stack.pop()
        pl = stack.pop()
        cdepth = depths.pop()
    return np.asarray(idx, dtype=np.int64)


def introsort_argsort_rows(values: np.ndarray) -> np.ndarray:
    """:func:`introsort_argsort` along the last axis of ``values`` (..., N).

    NumPy's scalar introsort insertion-sorts a range of at most ``SMALL_QUICKSORT + 1`` = 16
    elements, which keeps ties in index order: rows that short are one vectorised stable argsort
    (NaN last, as NumPy's comparison puts it). Longer rows go through :func:`introsort_argsort`
    one by one (they must be free of NaN).

    Returns:
        int64 indices of the shape of ``values``.
    """
    arr = np.asarray(values, dtype=np.float64)
    n = arr.shape[-1] if arr.ndim else 0
    if n <= SMALL_QUICKSORT + 1:
        return np.argsort(arr, axis=-1, kind="stable")
    if np.isnan(arr).any():
        raise ValueError("introsort_argsort_rows: rows longer than 16 must not hold NaN")
    flat = arr.reshape(-1, n)
    out = np.stack([introsort_argsort(row) for row in flat]) if len(flat) else np.zeros((0, n), dtype=np.int64)
    return out.reshape(arr.shape)
