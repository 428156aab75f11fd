"""The official T-MASS recipe (projects/c2f/msrvtt_tmass.yaml) end to end on CPU: a tiny random
CLIP (unfrozen) trained from decoded frames of generated MSR-VTT-style videos under the runner,
with the recipe's two learning-rate groups, warm-up + cosine, weight decay on every parameter,
support loss; the loss falls. The checkpoint is then evaluated in one process and under
torch.distributed.run with two: per-pair noise gives the same metrics."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from frames_helpers import write_msrvtt_corpus, write_tiny_clip

REPO = Path(__file__).resolve().parents[3]
SCRIPT = "import sys; from lavis_c2f.launch import {fn}; sys.exit({fn}(sys.argv[1:]))"


def _launch(fn, cfg, cwd, env, *options, nproc=1):
    cmd = [sys.executable]
    if nproc > 1:
        script = cwd / f"{fn}.py"
        script.write_text(SCRIPT.format(fn=fn))
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", str(script)]
    else:
        cmd += ["-c", SCRIPT.format(fn=fn)]
    cmd += ["--cfg-path", str(cfg)] + (["--options", *options] if options else [])
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_official_recipe_trains_a_tiny_clip_from_frames(tmp_path, subprocess_env):
    root = tmp_path / "msrvtt"
    write_msrvtt_corpus(root, [f"video{i}" for i in range(6)], ["video7", "video8", "video9"])
    clip = root / "clip"
    write_tiny_clip(clip, width=32, proj=24, image_size=32, patch=16)
    cfg = OmegaConf.load(REPO / "projects" / "c2f" / "msrvtt_tmass.yaml")
    cfg.model.update(clip_path=str(clip), text_input_dim=24, video_input_dim=24, embed_dim=24, num_frames=4,
                     num_trials=5)
    ds = cfg.datasets.c2f_msrvtt
    ds.update(data_root=str(root), image_size=32)
    ds.frames.num_frames = 4
    ds.tokenizer.update(path=str(clip), max_words=20)
    cfg.run.update(output_dir=str(tmp_path / "runs"), device="cpu", max_epoch=8, batch_size_train=4,
                   batch_size_eval=4, init_lr=2e-3, num_workers=0, video_loader_workers=0, progress=False,
                   valid_splits=["test"], job_id="train")
    cfg.run.lr_groups[0].lr = 1e-3
    project = tmp_path / "tiny_tmass.yaml"
    OmegaConf.save(cfg, project)

    _launch("train_main", project, tmp_path, subprocess_env)
    out = tmp_path / "runs" / "train"
    rows = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:2]) / 2, losses
    assert all(r["loss_support"] > 0 for r in rows if r.get("split") == "train")
    ck = torch.load(out / "checkpoint_latest.pth", map_location="cpu", weights_only=True)
    lrs = sorted({round(g["lr"] / g.get("lr_scale", 1.0), 12) for g in ck["optimizer"]["param_groups"]})
    assert len(lrs) == 1 and {g["weight_decay"] for g in ck["optimizer"]["param_groups"] if g["params"]} == {0.2}
    assert any(k.startswith("clip.model.vision_model.") for k in ck["model"]) and "logit_scale" not in ck["model"]
    summary = json.loads((out / "summary.json").read_text())
    test = summary["test"]["test"]
    assert test["num_queries"] == 3 and "dsl_t2v_R@1" in test and "t2v_MnR" in test

    # the run's final test used checkpoint_best in one process; two processes give the same numbers
    best = out / "checkpoint_best.pth"
    two = _launch("evaluate_main", project, tmp_path, subprocess_env, f"run.checkpoint={best}", "run.job_id=eval2",
                  nproc=2)
    m2 = json.loads((tmp_path / "runs" / "eval2" / "summary.json").read_text())["test"]["test"]
    assert {k: v for k, v in test.items() if k != "ranks_file"} == {k: v for k, v in m2.items() if k != "ranks_file"}
    assert "agg_metrics" in two.stdout
