"""Quickstart helpers: the chance predictor and the table (the full run is in tests/integration)."""
from __future__ import annotations

import numpy as np

from lavis_c2f.data.demo_corpus import DemoCorpusParams
from lavis_c2f.data.records import MomentRecord
from lavis_c2f.pipeline.fusion import FusionConfig, evaluate_candidates
from lavis_c2f.pipeline.quickstart import COLUMNS, QUICKSTART_CORPUS, chance_rows, corpus_overrides, format_table


def _records(n_videos=20, per_video=3):
    recs = []
    for v in range(n_videos):
        for j in range(per_video):
            st = 2.0 * ((v + j) % 10)
            recs.append(MomentRecord(qid=v * per_video + j, query=f"q{v} {j}", vid=f"v{v}", duration=40.0,
                                     relevant_windows=[(st, st + 6.0)]))
    return recs


def test_chance_rows_are_random_and_valid():
    recs = _records()
    durations = {r.vid: r.duration for r in recs}
    vids = sorted(durations)
    rows = chance_rows(recs, vids, durations, 2.0, k=5, rng=np.random.default_rng(0))
    assert len(rows) == len(recs)
    for r in rows:
        assert sorted(v for v, _ in r["stage1"]) == vids                       # a permutation
        assert [s for _, s in r["stage1"]] == sorted((s for _, s in r["stage1"]), reverse=True)
        assert len(r["candidates"]) == 5 and len(r["gt_windows"]) == 5
        for _, _, windows in r["candidates"]:
            for st, ed, sc in windows:
                assert 0 <= st < ed <= 40.0 and st % 2 == 0 and 0 <= sc <= 1
            assert [w[2] for w in windows] == sorted((w[2] for w in windows), reverse=True)
    flat, _, _ = evaluate_candidates(rows, FusionConfig(), protocol="qvh")
    # a random ranking finds the GT video first about 1/20 of the time
    assert 0 <= flat["stage1-R@1"] <= 20
    assert flat["oracle-VCMR-R@1-IoU@0.5"] == flat["MR-full-R1@0.5"]        # bound = grounder in the GT video
    again = chance_rows(recs, vids, durations, 2.0, k=5, rng=np.random.default_rng(0))
    assert again == rows                                                      # seeded


def test_format_table():
    m = {key: 12.345 for _, key in COLUMNS}
    text = format_table([("chance (random)", {}), ("trained (this run)", m)])
    lines = text.splitlines()
    assert "stage 1: text->video" in lines[0] and "bound" in lines[0]
    assert all(h in lines[1] for h, _ in COLUMNS)
    assert set(lines[2]) == {"-"}
    assert lines[3].startswith("chance (random)") and lines[3].split()[-1] == "-"
    assert lines[4].startswith("trained (this run)") and lines[4].count("12.3") == len(COLUMNS)


def test_main_job_corpus_keeps_train_and_val_and_enlarges_test():
    kw, custom = corpus_overrides()
    assert not custom and kw == QUICKSTART_CORPUS
    main, default = DemoCorpusParams.from_dict(kw).split_sizes(), DemoCorpusParams().split_sizes()
    assert main[:2] == default[:2]                        # same training and validation size
    assert main[2] >= 4 * default[2]                      # a test split that measures the models
    assert {k for k in kw} <= {"n_videos", "split_fractions"}   # the same generator otherwise


def test_user_corpus_replaces_the_main_job_corpus():
    # --n-videos / --corpus-param: the generator's defaults with the user's changes (the CI's
    # reduced chain keeps its corpus whatever the main job's is)
    assert corpus_overrides(150, {"max_clips": 30}) == ({"max_clips": 30, "n_videos": 150}, True)
    assert corpus_overrides(None, {"max_clips": 30}) == ({"max_clips": 30}, True)
    assert corpus_overrides(60, None) == ({"n_videos": 60}, True)
