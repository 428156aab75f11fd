"""Helpers of the predictor and search tests: ffmpeg-made clips, tiny checkpoints, small corpora.

Everything is tiny and CPU-only: the ``c2f_feature_random`` backbone (D = 16), a 16-d T-MASS
retriever and a 32-wide QD-DETR whose ``max_v_l`` (4 clips) is shorter than the test videos, so
the predictor's chunking of long videos is exercised.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
CHARADES = SHARED / "data" / "media" / "charades_sample.mp4"
OFFICIAL_QD = SHARED / "fixtures" / "qd_detr_reference" / "qd_detr_clip_model_best.ckpt"
OFFICIAL_MESM = SHARED / "fixtures" / "mesm_reference" / "mesm_model_best.ckpt"

DIM = 16
RETRIEVER_HP = dict(text_input_dim=DIM, video_input_dim=DIM, embed_dim=DIM, num_frames=4, num_heads=1,
                    pool_dropout=0.0, num_trials=2, max_words=8)
GROUNDER_CFG = dict(arch="c2f_qd_detr", txt_dim=DIM, vid_dim=DIM + 2, hidden_dim=32, nheads=4, enc_layers=1,
                    dec_layers=2, dim_feedforward=48, num_queries=5, max_v_l=4)


def need_ffmpeg() -> None:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg CLI not installed (apt-get install ffmpeg; setup.sh installs it)")


def ffmpeg(*args: str) -> None:
    r = subprocess.run(["ffmpeg", "-y", "-nostdin", "-loglevel", "error", *args], capture_output=True)
    if r.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {r.stderr.decode()[-400:]}")


def make_videos(root: Path) -> Dict[str, Path]:
    """Three small clips: ``pattern`` (12 s test pattern), ``redblue`` (6 s red then 8 s blue,
    with an ``.srt`` beside it) and ``gray`` (5 s of gray)."""
    need_ffmpeg()
    root.mkdir(parents=True, exist_ok=True)
    enc = ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10", "-t", "12", *enc, str(root / "pattern.mp4"))
    ffmpeg("-f", "lavfi", "-i", "color=c=red:size=64x48:rate=10:d=6", "-f", "lavfi",
           "-i", "color=c=blue:size=64x48:rate=10:d=8", "-filter_complex", "[0][1]concat=n=2:v=1", *enc,
           str(root / "redblue.mp4"))
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:size=64x48:rate=10:d=5", *enc, str(root / "gray.mp4"))
    (root / "redblue.srt").write_text("1\n00:00:01,000 --> 00:00:03,500\nthe screen is red\n\n"
                                      "2\n00:00:07,000 --> 00:00:09,000\nnow it is blue\n", encoding="utf-8")
    return {p.stem: p for p in root.glob("*.mp4")}


def random_backbone(**kw: Any):
    from lavis_c2f.video.backbones import build_backbone

    return build_backbone("random", config=kw or None)


def save_tiny_retriever(out_dir: Path, seed: int = 0, **overrides: Any) -> Dict[str, str]:
    """A runner-style retriever checkpoint (weights + config) and its model YAML."""
    import torch
    import yaml

    from lavis_c2f.models.checkpoint import save_checkpoint
    from lavis_c2f.models.retriever import C2FTMassRetriever

    out_dir.mkdir(parents=True, exist_ok=True)
    hp = {**RETRIEVER_HP, **overrides}
    torch.manual_seed(seed)
    model = C2FTMassRetriever(**hp).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.ndim >= 1:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    cfg = {"arch": "c2f_tmass_retriever", **hp}
    tag = "_".join(["tmass", str(seed)] + [f"{k}{v}" for k, v in sorted(overrides.items())])
    yml = out_dir / f"{tag}.yaml"
    yml.write_text(yaml.safe_dump({"model": cfg}), encoding="utf-8")
    ckpt = out_dir / f"{tag}.pth"
    save_checkpoint({"model": model.state_dict(), "config": {"model": cfg, "run": {}}, "arch": cfg["arch"]}, ckpt)
    return {"ckpt": str(ckpt), "yaml": str(yml)}


def save_tiny_grounder(path: Path, seed: int = 0, **overrides: Any) -> str:
    """Our grounder checkpoint format (weights + resolved config) of a tiny QD-DETR."""
    import torch

    from lavis_c2f.models.grounder.lavis_models import C2FQDDETR

    torch.manual_seed(seed)
    model = C2FQDDETR.from_config({**GROUNDER_CFG, **overrides})
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_checkpoint(str(path))
    return str(path)


def make_demo(root: Path) -> Dict[str, Any]:
    """A small demo corpus (24-d text, 32-d video) and checkpoints of matching tiny models, laid
    out like a ``lavis-c2f quickstart`` run directory (``summary.json``, ``fusion.json``)."""
    import json

    from lavis_c2f.data.demo_corpus import make_demo_corpus

    run = root / "run"
    meta = make_demo_corpus(str(run / "corpus"), n_videos=12, text_dim=24, video_dim=32, latent_dim=8)
    s1 = save_tiny_retriever(root / "ckpt", seed=3, text_input_dim=24, video_input_dim=32)
    s2 = save_tiny_grounder(root / "ckpt" / "demo_qd.pth", txt_dim=24, vid_dim=34, max_v_l=75)
    (run / "summary.json").write_text(json.dumps({"checkpoints": {"stage1": s1["ckpt"], "stage2": s2}}))
    (run / "fusion.json").write_text(json.dumps({"form": "product", "weight": 0.5, "s1_norm": "zscore",
                                                 "max_moments": 100}))
    return {"run": run, "corpus": run / "corpus", "meta": meta, "stage1": s1, "stage2": s2}
