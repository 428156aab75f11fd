"""The refiner's project YAMLs parse through LAVIS's Config and our strict builders."""
import argparse
from pathlib import Path

import pytest

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.refiner import ensure_registered
from lavis_c2f.models.refiner.data import RefinerDatasetBuilder
from lavis_c2f.models.refiner.model import C2FCaptionRefiner
from lavis_c2f.registry_utils import get as registry_get

REPO = Path(__file__).resolve().parents[3]


def load(name):
    from lavis.common.config import Config

    ensure_registered()
    return Config(argparse.Namespace(cfg_path=str(REPO / "projects" / "c2f" / name), options=None))


@pytest.mark.parametrize("name,n_frames", [("qvh_stage3_refine_coarse.yaml", 24), ("qvh_stage3_refine.yaml", 12)])
def test_qvh_yamls_need_local_weights(name, n_frames, tmp_path, monkeypatch):
    monkeypatch.setenv("C2F_BLIP2_ROOT", str(tmp_path / "blip2"))
    cfg = load(name)
    b = RefinerDatasetBuilder(cfg.datasets_cfg.c2f_refiner)
    assert b.sampler.n_frames == n_frames and b.splits == ["train", "val"]
    assert cfg.model_cfg.finetune == "lora" and cfg.run_cfg.task == "c2f_moment_retrieval"
    with pytest.raises(ConfigError, match=r"model\.bert_dir: directory not found: .*blip2/bert-base-uncased"):
        C2FCaptionRefiner.from_config(cfg.model_cfg)
    for d in ("bert-base-uncased", "flan-t5-xl"):
        (tmp_path / "blip2" / d).mkdir(parents=True)
    (tmp_path / "blip2" / "bert-base-uncased" / "config.json").write_text("{}")
    (tmp_path / "blip2" / "bert-base-uncased" / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(ConfigError, match=r"model\.t5_dir: .*flan-t5-xl has none of \['config.json'\]"):
        C2FCaptionRefiner.from_config(cfg.model_cfg)


def test_demo_yaml_builds_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("C2F_CACHE", str(tmp_path))
    cfg = load("demo_stage3_refine.yaml")
    b = RefinerDatasetBuilder(cfg.datasets_cfg.c2f_refiner)
    assert b.demo and b.stage2_paths == {} and b.image_size == 32
    assert cfg.model_cfg.arch == "c2f_tiny_caption_refiner"
    model = registry_get("model", cfg.model_cfg.arch).from_config(cfg.model_cfg)
    assert isinstance(model, C2FCaptionRefiner) and model.variant == "interleaved"
    assert model.visual_encoder.image_size == 32 and (tmp_path / "tiny_refiner" / "t5" / "tokenizer.json").is_file()


@pytest.mark.parametrize("name,stage,n_frms,bias", [("qvh_calce_stage1.yaml", 1, 75, (1, 1)),
                                                     ("qvh_calce_stage2.yaml", 2, 150, (3, 1)),
                                                     ("charades_sta_calce_stage1.yaml", 1, 60, (1, 1)),
                                                     ("charades_sta_calce_stage2.yaml", 2, 120, (3, 2))])
def test_calce_projects_carry_calce_recipes(name, stage, n_frms, bias, tmp_path, monkeypatch):
    from lavis_c2f.models.refiner.model import CalceSettings

    monkeypatch.setenv("C2F_BLIP2_ROOT", str(tmp_path / "blip2"))
    cfg = load(name)
    b = RefinerDatasetBuilder(cfg.datasets_cfg.c2f_refiner)
    assert b.variant == "calce" and b.calce.stage == stage and b.calce.n_frms == n_frms
    assert all(a["format"] == "calce" for a in b.annotations.values())
    s = CalceSettings.from_mapping(cfg.model_cfg.calce)
    assert (s.stage, s.bias1, s.bias2, s.num_clusters) == (stage, bias[0], bias[1], 12)
    m = cfg.model_cfg
    assert m.variant == "calce" and m.lora.target_modules[-1] == "lm_head" and m.qformer_init_from_bert
    run = cfg.run_cfg
    assert run.lr_sched == "c2f_linear_warmup_cosine_lr" and run.batch_size_train == 1
    assert run.max_epoch == (50 if stage == 1 else 15)
    if stage == 2:
        assert run.resume_model_only and run.resume_ckpt_path.endswith("_calce_stage1/calce/checkpoint_best.pth")
        assert set(b.stage2_paths) == set(b.annotations)
    with pytest.raises(ConfigError, match=r"model\.bert_dir: directory not found"):
        C2FCaptionRefiner.from_config(cfg.model_cfg)
