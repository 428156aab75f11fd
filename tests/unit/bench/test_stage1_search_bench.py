"""bench/stage1_search.py on a tiny corpus: a built index, then the same index reused under another
pre-filter kind (rebuilt), read into the page cache before timing."""
from __future__ import annotations

import json

import pytest
import torch

from bench_helpers import load_bench


@pytest.fixture(scope="module")
def sb():
    return load_bench("stage1_search.py", "c2f_bench_stage1_search")


@pytest.fixture
def torch_threads():
    """The bench sets torch's thread count (``--threads``): restored afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_build_then_reuse_under_another_kind(sb, tmp_path, torch_threads):
    args = ["--n-videos", "300", "--threads", "1", "--queries", "8", "--batch", "8", "--exhaustive-queries", "3",
            "--e2e-at", "0", "--index-dir", str(tmp_path / "idx")]
    assert sb.main(args + ["--json", str(tmp_path / "a.json")]) == 0
    assert sb.main(args + ["--ann-kind", "pq", "--pq-refine", "1000", "--json", str(tmp_path / "b.json")]) == 0
    (a,), (b,) = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["ann"] == "flat" and not a["index_reused"] and a["ann_rebuild_s"] is None
    # (index_reused compares run ids, the same for two runs in one process)
    assert b["ann"] == "pq" and b["exhaustive_reused"] and b["ann_rebuild_s"] > 0
    assert b["build_s"] == a["build_s"]                   # the build record of the first run
    assert b["ann_params"]["codec"] == "pq4" and b["ann_params"]["refine"] == 1000
    assert a["warm_gib"] > 0 and b["warm_gib"] == pytest.approx(a["warm_gib"])
    for r in (a, b):
        assert r["batched_identical"] and r["exhaustive_queries"] == 3
    # m = 256 candidates out of 300 videos, every pre-filter vector refined: exact pre-filter order
    assert a["recall_at_10"] == b["recall_at_10"]
