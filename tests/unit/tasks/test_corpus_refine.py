"""Stage 3 in the corpus pipeline (``run.refine`` of c2f_corpus_moment_retrieval).

Off: the refiner package is never imported (fresh interpreter, real evaluate entry point).
On: the tiny refiner on a tiny demo corpus (feature images), untrained (every generation falls
back, so VCMR equals the refine-off run) and scripted (valid generations replace the stage-2
windows of the best fused videos before the final fusion); unreadable videos and pre-extracted
frame folders; results independent of the number of processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from c2f_task_helpers import build_splits, make_corpus, tiny_grounder, write_fake_ranks  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
TINY_VIT = {"patch_size": 16, "embed_dim": 24, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0, "qkv_bias": True,
            "use_mean_pooling": False, "norm_layer_eps": 1e-6}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = make_corpus(tmp_path_factory.mktemp("corpus") / "demo", n_videos=16)
    splits = build_splits(root, "moment_retrieval")
    ranks = write_fake_ranks(splits, tmp_path_factory.mktemp("ranks"))
    return root, splits, ranks


@pytest.fixture(scope="module")
def refiner_cfg(tmp_path_factory):
    """A tiny refiner config (random weights; offline assets written once)."""
    return {"model": {"arch": "c2f_tiny_caption_refiner", "model_type": "tiny", "variant": "interleaved",
                      "tiny_assets": str(tmp_path_factory.mktemp("tiny_refiner")),
                      "vit_arch": TINY_VIT, "image_size": 32, "vit_precision": "fp32", "t5_precision": "fp32",
                      "num_query_token": 4, "generation": {"num_beams": 1, "max_new_tokens": 8}},
            "sampler": {"n_candidates": 8, "n_frames": 3, "margin_s": 2.0, "margin_ratio": 0.5}}


def _task(corpus, refine=None, **options):
    from lavis_c2f.tasks.corpus_moment_retrieval import CorpusMomentRetrievalTask

    _, splits, ranks = corpus
    options.setdefault("stage1_ranks", ranks)
    options.setdefault("stage1_top_k", 4)
    task = CorpusMomentRetrievalTask(refine=refine, **options)
    task.show_progress = False
    task.datasets = {"c2f_demo": splits}
    return task


def _run(task, ds, split, out_dir):
    res = task.evaluation(tiny_grounder(), None, dataset=ds)
    return res, task.after_evaluation(res, split, 0, dataset=ds, result_dir=str(out_dir))


def _vcmr(metrics):
    return {k: v for k, v in metrics.items() if k.startswith(("VCMR", "oracle-VCMR", "VR-", "stage1", "MR-"))}


def _scripted(batch):
    """A valid generation: the 2 s after the search region's start (integer seconds)."""
    texts = []
    for r0, r1 in batch["region"].tolist():
        st = int(np.ceil(r0))
        texts.append(f"[[{st}, {min(st + 2, int(np.floor(r1)))}]]")
    return texts, [0.5] * len(texts)


# ----------------------------------------------------------------------------- options (pure)
def test_refine_options_validation(tmp_path):
    from lavis_c2f.common.errors import ConfigError
    from lavis_c2f.pipeline.refine import RefineOptions, load_refiner_config

    off = RefineOptions.from_mapping(None)
    assert not off.enabled and not off.applies_to("val")
    # a disabled block may name folders that do not exist (the YAML defaults)
    RefineOptions.from_mapping({"enabled": False, "video_root": str(tmp_path / "nowhere")})
    for bad, match in (({"enable": True}, "did you mean 'enabled'"), ({"enabled": "yes"}, "enabled"),
                       ({"top_videos": 0}, "top_videos"), ({"frame_source": "gif"}, "frame_source"),
                       ({"frames_fps": 0}, "frames_fps"), ({"splits": [1]}, "splits"),
                       ({"enabled": True}, "config: missing"),
                       ({"enabled": True, "config": {"model": {}}}, "video_root: missing"),
                       ({"enabled": True, "config": {"model": {}}, "video_root": str(tmp_path / "x")},
                        "folder not found"),
                       ({"enabled": True, "config": {"model": {}}, "frame_source": "folder"}, "frames_root"),
                       ({"enabled": True, "config": {"model": {}}, "frame_source": "feature_image",
                         "captions_dir": str(tmp_path / "srts")}, "captions_dir")):
        with pytest.raises(ConfigError, match=match):
            RefineOptions.from_mapping(bad)
    o = RefineOptions.from_mapping({"enabled": True, "config": {"model": {}}, "frame_source": "feature_image",
                                    "splits": "test"})
    assert o.applies_to("test") and not o.applies_to("val")
    # config files: a 'refiner:' node or the whole file; relative model YAMLs of the checkout resolve
    (tmp_path / "r.yaml").write_text("refiner:\n  model: lavis_c2f/configs/models/c2f_caption_refiner_tiny.yaml\n"
                                     "  sampler: {n_frames: 4}\n")
    d = load_refiner_config(str(tmp_path / "r.yaml"))
    assert d["sampler"] == {"n_frames": 4}
    assert d["model"] == str(REPO / "lavis_c2f" / "configs" / "models" / "c2f_caption_refiner_tiny.yaml")
    assert load_refiner_config("lavis_c2f/configs/models/c2f_caption_refiner_tiny.yaml")["model"]["arch"] == \
        "c2f_tiny_caption_refiner"              # a model YAML is a refiner config ({model: ...})
    with pytest.raises(ConfigError, match="not found"):
        load_refiner_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="no mapping"):
        load_refiner_config(str(tmp_path / "list.yaml"))


def test_refine_counts_and_summary():
    from lavis_c2f.pipeline.refine import flat_refine_metrics, refine_counts, summary_line

    rows = [{"refine": {"n_refined": 1, "n_fallback": 2, "n_dropped_windows": 3,
                        "fallback_reasons": {"no_windows": 1, "frames_unavailable": 1}}},
            {"refine": {"n_refined": 0, "n_fallback": 1, "n_dropped_windows": 0,
                        "fallback_reasons": {"no_windows": 1}}},
            {"qid": 3}]                                                    # not refined (other split)
    c = refine_counts(rows)
    assert c == {"n_refined": 1, "n_fallback": 3, "n_dropped_windows": 3, "n_pairs": 4, "n_queries": 2,
                 "fallback_reasons": {"frames_unavailable": 1, "no_windows": 2}}
    assert flat_refine_metrics(c) == {"refine_n_refined": 1, "refine_n_fallback": 3, "refine_n_dropped_windows": 3,
                                      "refine_n_pairs": 4, "refine_fallback_frames_unavailable": 1,
                                      "refine_fallback_no_windows": 2}
    assert summary_line(c, "val") == ("stage 3 (val): 1/4 (query, video) pairs refined, 3 fell back to stage 2 "
                                      "(frames_unavailable=1, no_windows=2), 3 invalid windows dropped, 2 queries")


def test_task_rejects_bad_refine_block(corpus):
    from lavis_c2f.common.errors import ConfigError

    with pytest.raises(ConfigError, match="run.refine"):
        _task(corpus, refine={"enabled": False, "top_video": 3})
    with pytest.raises(ConfigError, match="run.refine.config"):    # the hook's keys are checked when on
        _task(corpus, refine={"enabled": True, "frame_source": "feature_image", "config": {"model": {}, "fps": 1}})


# ----------------------------------------------------------------------------- off: nothing imported
_OFF_SCRIPT = r"""
import json, sys
from lavis_c2f.launch import evaluate_main
out, root, ranks = sys.argv[1:4]
common = ["datasets.c2f_demo.data_root=" + root, "datasets.c2f_demo.auto_generate=false",
          "run.stage1_ranks=" + ranks, "run.device=cpu", "run.test_splits=[test]", "run.stage1_top_k=4",
          "model.txt_dim=16", "model.vid_dim=18"]
rc = evaluate_main(["--cfg-path", "projects/c2f/demo_c2f.yaml", "--options", "run.output_dir=" + out + "/off"]
                   + common + sys.argv[4:])
assert rc == 0, rc
assert "lavis_c2f.models.refiner" not in sys.modules, "refiner imported with run.refine off"
assert not any(m.startswith("lavis_c2f.models.refiner") for m in sys.modules)
print("OFF-OK")
"""


def _eval_subprocess(script: str, *args: str, env_extra=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "C2F_DEMO_ROOT": "",
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_refine_off_does_not_import_the_refiner(corpus, tmp_path):
    root, _, ranks = corpus
    out = _eval_subprocess(_OFF_SCRIPT, str(tmp_path), str(root), ranks)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OFF-OK" in out.stdout
    metrics = json.loads(next((tmp_path / "off").rglob("test_best_metrics.json")).read_text())
    assert "VCMR-R@1-IoU@0.5" in metrics["metrics"] and "refine" not in metrics
    assert not any(k.startswith("refine_") for k in metrics["metrics"])


# ----------------------------------------------------------------------------- on: tiny refiner
def test_untrained_tiny_refiner_falls_back_and_keeps_vcmr(corpus, refiner_cfg, tmp_path):
    _, splits, _ = corpus
    ds = splits["test"]
    _, off = _run(_task(corpus), ds, "test", tmp_path / "off")
    task = _task(corpus, refine={"enabled": True, "config": refiner_cfg, "top_videos": 2,
                                 "frame_source": "feature_image"})
    res, on = _run(task, ds, "test", tmp_path / "on")
    n_pairs = sum(len(r["refine"]["vids"]) for r in res["rows"])
    assert n_pairs >= len(ds.records)                               # at least one video per query
    # the untrained tiny refiner writes no parsable window: every pair falls back to stage 2
    assert on["refine_n_refined"] == 0 and on["refine_n_fallback"] == on["refine_n_pairs"] == n_pairs
    assert sum(v for k, v in on.items() if k.startswith("refine_fallback_")) == n_pairs
    assert "refine_fallback_frames_unavailable" not in on
    assert _vcmr(on) == _vcmr(off)                                   # so stage 2's metrics, exactly
    report = json.loads((tmp_path / "on" / "test_0_metrics.json").read_text())
    assert report["refine"]["frame_source"] == "feature_image" and report["refine"]["n_pairs"] == n_pairs
    assert report["metrics"]["refine_n_fallback"] == n_pairs
    off_vcmr = (tmp_path / "off" / "test_0_vcmr.jsonl").read_text()
    assert (tmp_path / "on" / "test_0_vcmr.jsonl").read_text() == off_vcmr


def test_scripted_refinement_replaces_windows_of_best_videos(corpus, refiner_cfg, tmp_path, monkeypatch, caplog):
    from lavis_c2f.pipeline.fusion import fuse_candidates

    _, splits, _ = corpus
    ds = splits["val"]
    off_res, _ = _run(_task(corpus), ds, "val", tmp_path / "off")
    task = _task(corpus, refine={"enabled": True, "config": refiner_cfg, "top_videos": 1,
                                 "frame_source": "feature_image"})
    monkeypatch.setattr(task.corpus_refiner(ds).refiner.model, "generate_text", _scripted)
    with caplog.at_level("INFO", logger="lavis_c2f.tasks.corpus_moment_retrieval"):
        res, on = _run(task, ds, "val", tmp_path / "on")
    assert on["refine_n_refined"] == on["refine_n_pairs"] > 0 and on["refine_n_fallback"] == 0
    assert any("stage 3 (val):" in r.getMessage() and "pairs refined" in r.getMessage() for r in caplog.records)
    vcmr = {json.loads(line)["qid"]: json.loads(line) for line in
            (tmp_path / "on" / "val_0_vcmr.jsonl").read_text().splitlines()}
    for row_off, row in zip(off_res["rows"], res["rows"]):
        best = fuse_candidates(row_off["candidates"], task.fusion)[0][0]      # the best fused video
        info = row["refine"]
        expect = [best] + ([row["gt_vid"]] if row["gt_vid"] != best else [])
        assert info["vids"] == expect
        for (vid, s1, windows), (vid0, s10, windows0) in zip(row["candidates"], row_off["candidates"]):
            assert (vid, s1) == (vid0, s10)
            if vid in info["vids"]:
                assert info["stage2_windows"][vid] == windows0
                st, ed = windows[0][:2]                                # the scripted window first,
                assert 0 < ed - st <= 2                                     # scored as the best stage-2 one
                assert windows[0][2] == pytest.approx(max(w[2] for w in windows0))
                moments = [m[:3] for m in vcmr[row["qid"]]["pred_moments"]]
                assert [vid, st, ed] in moments                             # and ranked by the final fusion
            else:
                assert windows == windows0                              # other videos keep stage 2
        # single-video metrics see the refined GT-video windows; the fused list ranks refined windows
        assert row["gt_windows"] == next((c[2] for c in row["candidates"] if c[0] == row["gt_vid"]),
                                         row["gt_windows"])
        assert info["stage2_windows"][row["gt_vid"]] == row_off["gt_windows"]
        assert row["gt_windows"] != row_off["gt_windows"]


def test_refinement_is_independent_of_the_number_of_processes(corpus, refiner_cfg, monkeypatch):
    from lavis_c2f.common import dist as c2f_dist
    from lavis_c2f.pipeline.merge import stage1_lists

    _, splits, ranks = corpus
    ds = splits["val"]
    task = _task(corpus, refine={"enabled": True, "config": refiner_cfg, "top_videos": 2,
                                 "frame_source": "feature_image"})
    monkeypatch.setattr(task.corpus_refiner(ds).refiner.model, "generate_text", _scripted)
    stage1 = stage1_lists(ds.records, ranks.replace("{split}", "val"))
    model = tiny_grounder()
    import torch

    single = task._ground(model, ds, ds.records, stage1, torch.device("cpu"), "t", split="val")
    parts = []
    for rank in (0, 1, 2):
        monkeypatch.setattr(c2f_dist, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(c2f_dist, "get_world_size", lambda: 3)
        parts.extend(task._ground(model, ds, ds.records, stage1, torch.device("cpu"), "t", split="val"))
    assert [r["qid"] for r in parts] == [r["qid"] for r in single]
    for a, b in zip(single, parts):
        assert a["refine"] == b["refine"]
        for ca, cb in zip(a["candidates"], b["candidates"]):
            assert ca[:2] == cb[:2]
            np.testing.assert_allclose(np.asarray(ca[2]), np.asarray(cb[2]), atol=2e-4)


def test_unreadable_videos_fall_back_and_folder_frames_are_read(corpus, refiner_cfg, tmp_path, monkeypatch):
    from PIL import Image

    _, splits, _ = corpus
    ds = splits["test"]
    off_res, off = _run(_task(corpus), ds, "test", tmp_path / "off")
    # video files that do not exist: every pair falls back (counted), nothing raises
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / f"{ds.records[0].vid}.mp4").write_bytes(b"not a video")
    task = _task(corpus, refine={"enabled": True, "config": refiner_cfg, "top_videos": 2, "frame_source": "video",
                                 "video_root": str(videos)})
    res, on = _run(task, ds, "test", tmp_path / "video")
    assert on["refine_n_fallback"] == on["refine_n_pairs"] == on["refine_fallback_frames_unavailable"] > 0
    assert _vcmr(on) == _vcmr(off)
    # pre-extracted frames of one video (1 fps); the other videos have none and fall back
    frames = tmp_path / "frames"
    vid = ds.records[0].vid
    (frames / vid).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(int(ds.records[0].duration)):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(frames / vid / f"{k:05d}.png")
    task = _task(corpus, refine={"enabled": True, "config": refiner_cfg, "top_videos": 2, "frame_source": "folder",
                                 "frames_root": str(frames), "frames_fps": 1.0})
    monkeypatch.setattr(task.corpus_refiner(ds).refiner.model, "generate_text", _scripted)
    res, on = _run(task, ds, "test", tmp_path / "folder")
    pairs_with_frames = sum(vid in r["refine"]["vids"] for r in res["rows"])
    assert pairs_with_frames > 0 and on["refine_n_refined"] == pairs_with_frames
    assert on["refine_n_fallback"] == on.get("refine_fallback_frames_unavailable", 0)
    assert on["refine_n_pairs"] == on["refine_n_refined"] + on["refine_n_fallback"]


# ----------------------------------------------------------------------------- end to end (slow)
_ON_SCRIPT = r"""
import json, sys
from lavis_c2f.launch import evaluate_main
out, root, ranks = sys.argv[1:4]
common = ["datasets.c2f_demo.data_root=" + root, "datasets.c2f_demo.auto_generate=false",
          "run.stage1_ranks=" + ranks, "run.device=cpu", "run.test_splits=[test]", "run.stage1_top_k=4",
          "model.txt_dim=16", "model.vid_dim=18", "run.seed=3"]
for tag, extra in (("off", []), ("on", ["run.refine.enabled=true", "run.refine.top_videos=2",
                                        "run.refine.config.sampler.n_frames=4"])):
    rc = evaluate_main(["--cfg-path", "projects/c2f/demo_c2f.yaml", "--options", "run.output_dir=" + out + "/" + tag]
                       + common + extra)
    assert rc == 0, (tag, rc)
    imported = "lavis_c2f.models.refiner" in sys.modules
    assert imported == (tag == "on"), (tag, imported)
print("ON-OK")
"""


@pytest.mark.slow
def test_demo_yaml_switch_end_to_end(corpus, tmp_path):
    """demo_c2f.yaml with --options run.refine.enabled=true: the tiny refiner YAML of the block
    (its offline assets under $C2F_CACHE), feature images, untrained: all fall back, same VCMR."""
    root, _, ranks = corpus
    out = _eval_subprocess(_ON_SCRIPT, str(tmp_path), str(root), ranks,
                           env_extra={"C2F_CACHE": str(tmp_path / "cache")}, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ON-OK" in out.stdout and "stage 3 (test):" in out.stderr
    off = json.loads(next((tmp_path / "off").rglob("test_best_metrics.json")).read_text())["metrics"]
    on = json.loads(next((tmp_path / "on").rglob("test_best_metrics.json")).read_text())["metrics"]
    assert on["refine_n_pairs"] > 0 and on["refine_n_fallback"] == on["refine_n_pairs"]
    assert _vcmr(on) == _vcmr(off)
