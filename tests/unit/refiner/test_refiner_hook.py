"""The pipeline hook (CaptionRefiner), lazy registration, and the tiny YAML end to end."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.refiner.data import SamplerConfig
from lavis_c2f.models.refiner.hook import CaptionRefiner
from lavis_c2f.testing.tiny_refiner import TINY_VIT
from lavis_c2f.models.refiner.srt import Caption

REPO = Path(__file__).resolve().parents[3]
SHARED = REPO.parent / "shared"


def video(n=30, size=16):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), np.arange(n) + 0.5


@pytest.fixture()
def refiner(tiny_model):
    return CaptionRefiner(tiny_model, SamplerConfig(n_candidates=16, n_frames=4, margin_s=2.0, margin_ratio=0.0))


def test_refine_with_frames_fallback_or_refined_and_counted(refiner, monkeypatch):
    frames, times = video()
    stage2 = [[10.0, 14.0, 0.8], [20.0, 24.0, 0.3]]
    out = refiner.refine("a man talks", 30.0, stage2, frames=frames, timestamps=times,
                         captions=[(11, 12, "hello"), {"start": 13, "end": 14, "text": "bye"}])
    assert out and all(len(w) == 3 and w[0] < w[1] for w in out)
    assert refiner.stats.n_total == 1
    # scripted generations: a valid one is used, garbage falls back to stage 2
    monkeypatch.setattr(refiner.model, "generate_text", lambda batch: (["[[11, 13]]"], [0.5]))
    out = refiner.refine("q", 30.0, stage2, frames=frames, timestamps=times)
    assert out[0] == [11.0, 13.0, 0.8] and [w[:2] for w in out[1:]] == [[10.0, 14.0], [20.0, 24.0]]
    monkeypatch.setattr(refiner.model, "generate_text", lambda batch: (["[[13, 11]] garbage"], [0.5]))
    assert refiner.refine("q", 30.0, stage2, frames=frames, timestamps=times) == stage2
    assert refiner.stats.n_refined >= 1 and refiner.stats.fallback_reasons["invalid"] == 1
    assert "fell back to stage 2" in refiner.stats.summary()


def test_refine_prompt_uses_region_frames_and_captions(refiner, monkeypatch):
    seen = {}

    def fake(batch):
        seen["prompt"] = refiner.model.build_prompts(batch)[0].text
        seen["times"] = batch["frame_times"][0]
        return ["[[11, 13]]"], [1.0]

    monkeypatch.setattr(refiner.model, "generate_text", fake)
    frames, times = video()
    refiner.refine("a man talks", 30.0, [[10.0, 14.0, 0.8]], frames=frames, timestamps=times,
                   captions=[Caption(11, 12, "hello")])
    assert all(8.0 <= t <= 16.0 for t in seen["times"]) and len(seen["times"]) == 4
    assert 'speech: "hello"' in seen["prompt"] and "Search region: [[8, 16]]" in seen["prompt"]


def test_missing_video_falls_back_and_bad_arguments_raise(refiner, tmp_path):
    stage2 = [[1.0, 2.0, 0.5]]
    assert refiner.refine("q", 10.0, stage2, video_path=str(tmp_path / "none.mp4")) == stage2
    assert refiner.stats.fallback_reasons["frames_unavailable"] == 1
    assert refiner.refine("q", 10.0, [], video_path=str(tmp_path / "none.mp4")) == [[0.0, 10.0, 0.0]]
    with pytest.raises(ValueError, match="video_path or frames"):
        refiner.refine("q", 10.0, stage2)
    with pytest.raises(ValueError, match="timestamps"):
        refiner.refine("q", 10.0, stage2, frames=video()[0])
    with pytest.raises(ValueError, match="duration"):
        refiner.refine("q", 0, stage2, frames=video()[0], timestamps=video()[1])


def test_refine_real_video_with_srt_dir(tiny_root, tmp_path):
    mp4 = SHARED / "data" / "media" / "charades_sample.mp4"
    if not mp4.is_file():
        pytest.skip(f"../shared not found: {mp4}")
    (tmp_path / "charades_sample.srt").write_text("1\n00:00:02,000 --> 00:00:04,000\nopen the door\n")
    r = CaptionRefiner.from_config({"model": {"arch": "c2f_tiny_caption_refiner", "model_type": "tiny",
                                              "variant": "interleaved", "tiny_assets": tiny_root,
                                              "vit_arch": TINY_VIT, "image_size": 32, "vit_precision": "fp32", "t5_precision": "fp32",
                                              "num_query_token": 4, "generation": {"num_beams": 1,
                                                                                   "max_new_tokens": 8}},
                                    "sampler": {"n_candidates": 8, "n_frames": 3}, "video_fps": 0.5,
                                    "captions_dir": str(tmp_path)})
    out = r.refine("a person opens a door", 30.0, [[2.0, 6.0, 0.7]], video_path=str(mp4))
    assert out and r.stats.n_total == 1 and "frames_unavailable" not in r.stats.fallback_reasons


def test_from_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown"):
        CaptionRefiner.from_config({"model": {}, "sampler": {}, "fps": 1})
    with pytest.raises(ConfigError, match="YAML not found"):
        CaptionRefiner.from_config({"model": str(tmp_path / "none.yaml")})
    with pytest.raises(ConfigError, match="missing"):
        CaptionRefiner.from_config({})


def test_package_import_does_not_import_the_refiner():
    code = ("import sys, lavis_c2f; from lavis.common.registry import registry;"
            "assert not any(m.startswith('lavis_c2f.models.refiner') for m in sys.modules), 'imported';"
            "assert 'c2f_caption_refiner' not in registry.mapping['model_name_mapping'];"
            "from lavis_c2f.models.refiner import ensure_registered; ensure_registered();"
            "assert registry.get_model_class('c2f_caption_refiner') is not None;"
            "assert registry.get_builder_class('c2f_refiner') is not None; print('ok')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.slow
def test_tiny_yaml_trains_and_evaluates_on_demo_corpus(tmp_path):
    code = ("import sys, lavis_c2f; from lavis_c2f.models.refiner import ensure_registered; ensure_registered();"
            "from lavis_c2f.launch import train_main;"
            f"sys.exit(train_main(['--cfg-path', 'projects/c2f/demo_stage3_refine.yaml', '--options',"
            f" 'run.max_epoch=1', 'run.output_dir={tmp_path}/out', 'run.batch_size_train=16']))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "C2F_CACHE": str(tmp_path / "cache"),
           "C2F_DEMO_ROOT": ""}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = list((tmp_path / "out").rglob("val_0_metrics.json"))
    assert metrics, out.stderr[-2000:]
