"""introsort_argsort orders ties exactly as NumPy's scalar introsort (the official code's np.argsort).

The reference is ``np.argsort`` run in a child process with NumPy's SIMD sorts switched off
(``NPY_DISABLE_CPU_FEATURES``): on CPUs with AVX-512, NumPy >= 1.25 sorts 64-bit numbers with
x86-simd-sort, whose tie order differs.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lavis_c2f.datasets.moment_retrieval import saliency_labels_from_scores
from lavis_c2f.ops.argsort import introsort_argsort, introsort_argsort_rows, scalar_sort_env

REFERENCE = r"""
import json, sys
import numpy as np
arrays = json.load(sys.stdin)
print(json.dumps([np.argsort(np.asarray(a, dtype=np.float64)).tolist() for a in arrays]))
"""


def scalar_numpy_argsort(arrays, env):
    """``np.argsort`` of each array in a child NumPy with the SIMD sorts disabled."""
    out = subprocess.run([sys.executable, "-c", REFERENCE], input=json.dumps(arrays), env=scalar_sort_env(env),
                         capture_output=True, text=True, check=True)
    return [np.asarray(o) for o in json.loads(out.stdout)]


def tie_heavy_arrays():
    rng = np.random.default_rng(7)
    arrays = []
    for n in list(range(0, 40)) + [45, 60, 75, 150, 400]:
        for t in range(6):
            a = rng.integers(0, 1 + t, size=n).astype(float)  # t = 0: all tied
            if t == 4:
                a = np.sort(a)
            if t == 5:
                a = np.sort(a)[::-1]
            arrays.append(a.tolist())
        arrays.append(rng.random(n).tolist())
    return arrays


def test_matches_scalar_numpy_on_tie_heavy_arrays(subprocess_env):
    arrays = tie_heavy_arrays()
    expected = scalar_numpy_argsort(arrays, subprocess_env)
    for a, e in zip(arrays, expected):
        got = introsort_argsort(a)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, e, err_msg=f"array {a}")


def test_known_orders():
    # up to 16 elements numpy insertion-sorts (stable); from 17 on it partitions (unstable)
    np.testing.assert_array_equal(introsort_argsort([1.0] * 16), np.arange(16))
    # (values printed by NumPy 1.26 with AVX-512 disabled; x86-simd-sort gives 0..16 here)
    assert introsort_argsort([1.0] * 17).tolist() == [0, 14, 13, 12, 11, 10, 9, 15, 8, 6, 5, 4, 3, 2, 1, 7, 16]
    assert introsort_argsort([2, 2, 2, 1, 1] + [2] * 15).tolist() == \
        [3, 4, 0, 17, 16, 15, 14, 13, 12, 11, 9, 18, 8, 7, 6, 5, 2, 1, 10, 19]
    assert introsort_argsort([]).tolist() == [] and introsort_argsort([3.0]).tolist() == [0]
    assert sorted(introsort_argsort([2, 1, 2, 0]).tolist()) == [0, 1, 2, 3]


def test_rows_match_scalar_numpy_short_and_long(subprocess_env):
    rng = np.random.default_rng(3)
    for n in (1, 3, 16, 17, 30):
        rows = rng.integers(0, 3, size=(2, 5, n)).astype(float)          # tie-heavy, batched
        if n <= 16:
            rows[0, 0, 0] = np.nan                                        # NaN sorts last, as NumPy
        expected = scalar_numpy_argsort(rows.reshape(-1, n).tolist(), subprocess_env)
        got = introsort_argsort_rows(rows)
        assert got.shape == rows.shape and got.dtype == np.int64
        np.testing.assert_array_equal(got.reshape(-1, n), np.stack(expected), err_msg=f"n={n}")
    with pytest.raises(ValueError, match="NaN"):
        introsort_argsort_rows(np.full((2, 17), np.nan))
    assert introsort_argsort_rows(np.zeros((0, 20))).shape == (0, 20)


# --------------------------------------------------------------------- saliency labels, tie cases

def official_hard_labels(cases, env):
    """Official ``get_saliency_labels_all`` hard labels with the scalar NumPy argsort."""
    orders = scalar_numpy_argsort([np.asarray(s, dtype=float).sum(1).tolist() for _, s, _ in cases], env)
    out = []
    for (rel, _, ctx_l), order in zip(cases, orders):
        out.append(([min(rel[i], ctx_l - 1) for i in order[-1:]], [min(rel[i], ctx_l - 1) for i in order[:1]]))
    return out


TIE_CASES = {
    "all tied (20 clips)": (list(range(20)), [[2, 2, 2]] * 20, 30),
    "ties at the top": (list(range(3, 25)), [[4, 4, 4]] * 12 + [[1, 2, 3]] * 10, 40),
    "ties at the bottom": (list(range(0, 30, 1)), [[0, 1, 0]] * 18 + [[3, 3, 4]] + [[2, 2, 2]] * 11, 30),
    "one relevant clip": ([5], [[3, 2, 4]], 10),
    "window at the video's end": (list(range(55, 77)), [[1, 1, 1]] * 10 + [[4, 3, 4]] * 12, 75),
}


@pytest.mark.parametrize("name", list(TIE_CASES))
def test_hard_saliency_labels_equal_the_official_ones(name, subprocess_env):
    rel, scores, ctx_l = TIE_CASES[name]
    (exp_pos, exp_neg), = official_hard_labels([TIE_CASES[name]], subprocess_env)
    pos, neg, all_s = saliency_labels_from_scores(rel, scores, ctx_l, np.random.default_rng(0))
    assert pos[:1] == exp_pos and neg[:1] == exp_neg
    assert all(0 <= c < ctx_l for c in pos + neg)
    assert all_s.shape == (ctx_l,)


def test_stable_tie_break_is_the_documented_variant():
    rel, scores, ctx_l = TIE_CASES["all tied (20 clips)"]
    pos, neg, _ = saliency_labels_from_scores(rel, scores, ctx_l, np.random.default_rng(0), tie_break="stable")
    assert pos[0] == 19 and neg[0] == 0
    with pytest.raises(ValueError, match="tie_break"):
        saliency_labels_from_scores(rel, scores, ctx_l, np.random.default_rng(0), tie_break="random")


def test_heapsort_fallback_equals_numpy_aheapsort_with_ties():
    """The depth-limit fallback on its own: NumPy's ``kind='heapsort'`` argsort is its scalar
    ``aheapsort_`` on every CPU, so the tie order must match it exactly."""
    from lavis_c2f.ops.argsort import _heapsort

    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        v = rng.integers(0, 5, n).astype(float).tolist()
        idx = list(range(n))
        _heapsort(v, idx, 0, n)
        assert idx == np.argsort(np.array(v), kind="heapsort").tolist(), v
