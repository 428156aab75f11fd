"""c2f_corpus_moment_retrieval: candidate/VCMR rows, batch invariance, stage-1 sources, hard negatives."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from c2f_task_helpers import build_splits, make_corpus, tiny_grounder, write_fake_ranks


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = make_corpus(tmp_path_factory.mktemp("corpus") / "demo")
    splits = build_splits(root, "moment_retrieval")
    ranks_dir = tmp_path_factory.mktemp("ranks")
    write_fake_ranks(splits, ranks_dir)
    return root, splits, ranks_dir


def _task(corpus, **options):
    from lavis_c2f.tasks.corpus_moment_retrieval import CorpusMomentRetrievalTask

    root, splits, ranks_dir = corpus
    options.setdefault("stage1_ranks", str(ranks_dir / "{split}_best_ranks.jsonl"))
    task = CorpusMomentRetrievalTask(**options)
    task.show_progress = False
    task.datasets = {"c2f_demo": splits}
    return task


def test_rows_and_batch_independence(corpus, tmp_path):
    _, splits, _ = corpus
    ds = splits["val"]
    model = tiny_grounder()
    a = _task(corpus, stage1_top_k=3, pair_batch_size=1).evaluation(model, None, dataset=ds)
    b = _task(corpus, stage1_top_k=3, pair_batch_size=64).evaluation(model, None, dataset=ds)
    assert a["split"] == "val"
    assert [r["qid"] for r in a["rows"]] == [r.qid for r in ds.records]
    for ra, rb in zip(a["rows"], b["rows"]):
        assert [c[0] for c in ra["candidates"]] == [c[0] for c in rb["candidates"]]
        for ca, cb in zip(ra["candidates"], rb["candidates"]):
            np.testing.assert_allclose(np.asarray(ca[2]), np.asarray(cb[2]), atol=2e-4)
    row = a["rows"][0]
    n_vids = len({r.vid for r in ds.records})
    assert len(row["candidates"]) == min(3, n_vids) and row["gt_windows"] is not None
    gt_in = [c for c in row["candidates"] if c[0] == row["gt_vid"]]
    if gt_in:  # the GT video's windows are the same whether grounded as candidate or as GT
        assert gt_in[0][2] == row["gt_windows"]


def test_after_evaluation_outputs(corpus, tmp_path):
    _, splits, _ = corpus
    ds = splits["test"]
    task = _task(corpus, stage1_top_k=4, fusion={"form": "product", "weight": 2.0})
    res = task.evaluation(tiny_grounder(), None, dataset=ds)
    out = task.after_evaluation(res, "test", 3, dataset=ds, result_dir=str(tmp_path))
    vcmr = [json.loads(line) for line in (tmp_path / "test_3_vcmr.jsonl").read_text().splitlines()]
    assert len(vcmr) == len(ds.records) and set(vcmr[0]) == {"qid", "query", "pred_moments"}
    for r in vcmr:
        moments = r["pred_moments"]
        assert 1 <= len(moments) <= 4 * 3                       # <= top-4 videos x <= 3 windows
        assert all(isinstance(m[0], str) and m[1] <= m[2] for m in moments)
        assert all(moments[i][3] >= moments[i + 1][3] for i in range(len(moments) - 1))
    for name in ("test_3_candidates.jsonl", "test_3_gt_preds.jsonl", "test_3_metrics.json"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "test_3_metrics.json").read_text())
    assert metrics["fusion"]["weight"] == 2.0 and metrics["agg_metric"] == "VCMR-R@1-IoU@0.5"
    for key in ("VCMR-R@1-IoU@0.5", "VCMR-R@100-IoU@0.7", "oracle-VCMR-R@1-IoU@0.5", "stage1-R@1",
                "MR-full-R1@0.5", "MR-full-mAP", "VR-R@10"):
        assert key in out, key
    assert out["oracle-VCMR-R@10-IoU@0.5"] >= out["VCMR-R@10-IoU@0.5"]
    assert out["agg_metrics"] == out["VCMR-R@1-IoU@0.5"]
    # the evaluated VCMR rows reproduce the metrics through the public evaluation function
    from lavis_c2f.evaluation import eval_vcmr

    gt = [r.to_qvh_dict() for r in ds.records]
    assert eval_vcmr(vcmr, gt)["brief"]["VCMR-R@5-IoU@0.5"] == out["VCMR-R@5-IoU@0.5"]


def test_stage1_from_merged_annotations(corpus, tmp_path):
    from lavis_c2f.pipeline.merge import merge_stage1
    from lavis_c2f.common.errors import ConfigError

    root, splits, ranks_dir = corpus
    merged = tmp_path / "val.jsonl"
    merge_stage1(str(ranks_dir / "val_best_ranks.jsonl"), str(root / "annotations" / "val.jsonl"), 2, str(merged))
    msplits = build_splits(root, "moment_retrieval", **{"annotations.val.path": str(merged)})
    task = _task((root, msplits, ranks_dir), stage1_ranks=None, stage1_top_k=5)
    res = task.evaluation(tiny_grounder(), None, dataset=msplits["val"])
    assert all(len(r["candidates"]) == 2 for r in res["rows"])          # the merged top-2 (of >= 2 videos)
    with pytest.raises(ConfigError, match="merge-stage1"):
        _task(corpus, stage1_ranks=None).evaluation(tiny_grounder(), None, dataset=splits["val"])


def test_options_validation(corpus, tmp_path):
    from lavis_c2f.common.errors import ConfigError, DataFormatError
    from lavis_c2f.tasks.corpus_moment_retrieval import CorpusMomentRetrievalTask

    for bad in ({"stage1_top_k": 0}, {"eval_protocol": "tvr"}, {"hard_negative_ratio": -1},
                {"fusion": {"form": "max"}}, {"stage1_ranks": 3}, {"ground_truth_video": 1}):
        with pytest.raises(ConfigError):
            CorpusMomentRetrievalTask(**bad)
    choice = tmp_path / "fusion.json"
    choice.write_text(json.dumps({"form": "sum", "weight": 0.3, "s1_norm": "minmax", "grid": []}))
    t = CorpusMomentRetrievalTask(fusion_file=str(choice), fusion={"form": "product"})
    assert (t.fusion.form, t.fusion.weight, t.fusion.s1_norm) == ("sum", 0.3, "minmax")
    with pytest.raises(DataFormatError):
        CorpusMomentRetrievalTask(fusion_file=str(tmp_path / "missing.json"))
    t = CorpusMomentRetrievalTask(stage1_ranks={"val": "a.jsonl"})
    assert t.stage1_source("val").endswith("a.jsonl") and t.stage1_source("test") is None


def test_hard_negative_dataset(corpus):
    from lavis_c2f.pipeline.hard_negatives import HardNegativeMomentDataset
    from lavis_c2f.pipeline.merge import stage1_lists

    _, splits, ranks_dir = corpus
    base = splits["train"]
    lists = stage1_lists(base.records, str(ranks_dir / "train_best_ranks.jsonl"), top_k=3)
    ds = HardNegativeMomentDataset(base, lists, ratio=0.5, top_k=3, seed=1)
    n_eligible = sum(any(v != r.vid for v, _ in lst[:3]) for r, lst in zip(base.records, lists))
    assert ds.num_extra == round(0.5 * n_eligible) and len(ds) == len(base) + ds.num_extra
    extra = [ds[i] for i in range(len(base), len(ds))]
    for s in extra:
        rec = next(r for r in base.records if r.qid == s["qid"])
        assert s["vid"] != rec.vid and not s["has_labels"] and s["span_labels"].shape == (0, 2)
        assert s["vid"] in [v for v, _ in lists[base.records.index(rec)][:3]]
        assert float(s["saliency_all_labels"].sum()) == 0.0
        assert math.isclose(s["duration"], min(ds.durations.get(s["vid"], math.inf),
                                               s["video_feat"].shape[0] * base.clip_length))
    # the original samples come first, unchanged
    assert ds[0]["qid"] == base[0]["qid"] and torch.equal(ds[0]["video_feat"], base[0]["video_feat"])
    # deterministic per epoch, different across epochs
    again = [ds.negative_pair(j) for j in range(ds.num_extra)]
    ds.set_epoch(0)
    assert again == [ds.negative_pair(j) for j in range(ds.num_extra)]
    ds.set_epoch(1)
    assert again != [ds.negative_pair(j) for j in range(ds.num_extra)]
    batch = ds.collater([ds[0], ds[len(ds) - 1]])
    assert batch["has_labels"].tolist() == [True, False]
    model = tiny_grounder().train()
    out = model(batch)                                         # the grounder trains on mixed batches
    assert torch.isfinite(out["loss"])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_hard_negatives_are_read_lazily(corpus, tmp_path):
    """Building the training split for evaluation only needs no stage-1 lists of it."""
    from lavis_c2f.common.errors import ConfigError
    from lavis_c2f.pipeline.hard_negatives import HardNegativeMomentDataset

    _, splits, _ = corpus
    calls = []

    def missing():
        calls.append(1)
        raise ConfigError("run.stage1_ranks (train) is not set")

    ds = HardNegativeMomentDataset(splits["train"], missing, ratio=1.0)
    assert ds.records is splits["train"].records and calls == []      # built, nothing read
    with pytest.raises(ConfigError, match="stage1_ranks"):
        len(ds)                                                         # the first use reads them
