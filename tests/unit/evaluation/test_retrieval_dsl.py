"""Official t2v metrics (R@1/5/10, MdR, MnR) and the DSL option against a golden file whose
numbers follow the official compute_metrics / np_softmax formulas."""
import json
from pathlib import Path

import numpy as np
import pytest

from lavis_c2f.evaluation.retrieval import (RetrievalAccumulator, column_logsumexp, dual_softmax, rank_metrics,
                                            t2v_ranks)

GOLDEN = json.loads((Path(__file__).parent / "golden_t2v_dsl.json").read_text())


@pytest.mark.parametrize("key", ["t2v", "dsl_t2v"])
def test_t2v_metrics_equal_the_official_formula(key):
    sim = np.asarray(GOLDEN["sim"])
    if key == "dsl_t2v":
        sim = dual_softmax(sim)
        np.testing.assert_allclose(sim, np.asarray(GOLDEN["dsl_sim"]), rtol=1e-12, atol=0)
    ranks = t2v_ranks(sim, GOLDEN["gt_video"])
    want = GOLDEN[key]
    assert ranks.tolist() == want["ranks"]
    got = rank_metrics(ranks, (1, 5, 10))
    for k in ("R@1", "R@5", "R@10", "MdR"):
        assert got[k] == pytest.approx(want[k])
    assert got["MnR"] == round(want["MnR"], 2)


def test_dsl_over_row_blocks_equals_dsl_over_the_matrix():
    rng = np.random.default_rng(0)
    sim = rng.normal(0, 0.1, (37, 11)).astype(np.float32)
    whole = dual_softmax(sim)
    lse = np.logaddexp.reduce([column_logsumexp(sim[a:a + 8]) for a in range(0, 37, 8)], axis=0)
    blocks = np.concatenate([dual_softmax(sim[a:a + 8], col_lse=lse) for a in range(0, 37, 8)])
    np.testing.assert_allclose(blocks, whole, rtol=1e-12)
    acc = RetrievalAccumulator(11)
    gt = np.arange(37) % 11
    for a in range(0, 37, 8):
        acc.add(blocks[a:a + 8], gt[a:a + 8])
    assert acc.compute()["t2v"] == rank_metrics(t2v_ranks(whole, gt))
    with pytest.raises(ValueError, match="col_lse"):
        dual_softmax(sim, col_lse=np.zeros(3))
    with pytest.raises(ValueError, match="temperature"):
        dual_softmax(sim, temperature=0)
