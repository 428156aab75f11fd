"""CALCE's two training stages end to end on CPU with the tiny random model.

Stage 1 runs under ``torch.distributed.run`` (2 processes, gloo) and predicts the train and val
splits at the end; stage 2 reads those rows as coarse windows and starts from the stage-1
weights (``resume_ckpt_path`` + ``resume_model_only``), as CALCE's recipe does. Both losses fall.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]


def make_data(root: Path, n_videos: int = 4, n_frames: int = 30) -> None:
    """Frame folders (1 fps, 32 px; one colour per scene), CALCE json annotations, .srt files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for v in range(n_videos):
        vid = f"vid{v}"
        d = root / "frames" / vid
        d.mkdir(parents=True)
        bounds = sorted(rng.choice(np.arange(5, n_frames - 5), size=2, replace=False).tolist())
        colours = rng.integers(0, 255, size=(3, 3))
        for k in range(n_frames):
            scene = int(k >= bounds[0]) + int(k >= bounds[1])
            img = np.clip(colours[scene] + rng.normal(0, 8, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{k:05d}.png")
        rows.append({"video": vid, "qid": f"q{v}", "query": f"a person talks about thing {v}",
                     "duration": n_frames, "items": ["person", f"thing {v}"],
                     "relevant_windows": [[bounds[0], bounds[1]]]})
    (root / "srts").mkdir()
    (root / "srts" / "vid0.srt").write_text("1\n00:00:06,000 --> 00:00:09,500\nthis thing is great\n", encoding="utf-8")
    for split in ("train", "val"):
        (root / f"{split}.json").write_text(json.dumps(rows), encoding="utf-8")


def project(root: Path, stage: int) -> dict:
    model = {"arch": "c2f_tiny_caption_refiner", "model_type": "tiny", "variant": "calce",
             "tiny_assets": str(root / "tiny"), "num_query_token": 8,
             "lora": {"r": 4, "alpha": 4.0, "dropout": 0.05,
                      "target_modules": ["q", "k", "v", "o", "wi_0", "wi_1", "wo", "lm_head"]},
             "calce": {"stage": stage, "num_clusters": 4, "bias1": 1 if stage == 1 else 2, "bias2": 1,
                       "max_txt_len": 64},
             "generation": {"num_beams": 1, "max_new_tokens": 12, "min_length": 1},
             "keep_stage2_tail": False}
    data = {"variant": "calce", "calce": {"stage": stage, "n_frms": 12 * stage, "items": "annotation"},
            "data_root": str(root),
            "annotations": {"train": {"path": "train.json", "format": "calce", "require_windows": True},
                            "val": {"path": "val.json", "format": "calce"}},
            "frames": {"type": "folder", "path": "frames", "fps": 1.0}, "captions": "srts", "image_size": 32}
    run = {"task": "c2f_moment_retrieval", "runner": "c2f_runner", "eval_protocol": "qvh",
           "agg_metric": "MR-full-R1@0.5", "device": "cpu", "seed": 42, "output_dir": str(root / f"stage{stage}"),
           "job_id": "calce", "max_epoch": 4, "init_lr": 3e-3, "min_lr": 0.0, "warmup_lr": 1e-4, "warmup_steps": 2,
           "lr_sched": "c2f_linear_warmup_cosine_lr", "weight_decay": 0.05, "batch_size_train": 1,
           "batch_size_eval": 2, "accum_grad_iters": 1, "num_workers": 0, "train_splits": ["train"],
           "valid_splits": ["val"], "progress": False}
    if stage == 1:
        run["test_splits"] = ["train", "val"]          # CALCE's stage-1 "infer" of both splits
    else:
        result = root / "stage1" / "calce" / "result"
        data["stage2_predictions"] = {"train": str(result / "train_best_preds.jsonl"),
                                      "val": str(result / "val_best_preds.jsonl")}
        run.update(resume_ckpt_path=str(root / "stage1" / "calce" / "checkpoint_best.pth"), resume_model_only=True,
                   test_splits=["val"])
    return {"model": model, "datasets": {"c2f_refiner": data}, "run": run}


def train_losses(out_dir: Path):
    rows = [json.loads(x) for x in (out_dir / "log.txt").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") == "train" and "loss" in r]


@pytest.mark.slow
def test_two_stages_train_with_falling_loss(tmp_path, subprocess_env):
    make_data(tmp_path)
    env = {**subprocess_env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + subprocess_env.get("PYTHONPATH", "")}
    for stage in (1, 2):
        cfg = tmp_path / f"calce_stage{stage}.yaml"
        cfg.write_text(yaml.safe_dump(project(tmp_path, stage)), encoding="utf-8")
        launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
                  if stage == 1 else [sys.executable])
        out = subprocess.run(launch + [str(REPO / "train.py"), "--cfg-path", str(cfg)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=900)
        # every rank's error lines first: the launcher's tail shows only the rank that noticed the crash
        errors = "\n".join(ln for ln in out.stderr.splitlines()
                            if "Error" in ln or "Killed" in ln or "signal" in ln.lower())[-4000:]
        assert out.returncode == 0, errors + "\n--- tail ---\n" + out.stdout[-2000:] + out.stderr[-4000:]
        run_dir = tmp_path / f"stage{stage}" / "calce"
        losses = train_losses(run_dir)
        assert len(losses) == 4 and losses[-1] < losses[0], losses
        ckpt = run_dir / "checkpoint_best.pth"
        assert ckpt.is_file()
        import torch

        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        keys = set(saved["model"])
        assert any(".lora_B.default.weight" in k for k in keys) and "query_proj.weight" in keys
        assert saved["config"]["model"]["calce"]["stage"] == stage
    preds = (tmp_path / "stage1" / "calce" / "result" / "train_best_preds.jsonl").read_text().splitlines()
    assert len(preds) == 4 and all(json.loads(p)["pred_relevant_windows"] for p in preds)
    assert "initialised from the weights of" in out.stderr + out.stdout
