"""Every stage-1 / stage-2 / c2f project YAML loads through LAVIS's Config and uses only known keys."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
# stage 3 / CALCE projects build BLIP-2-sized refiners: validated by tests/unit/refiner instead
PROJECTS = sorted(p for p in (REPO / "projects" / "c2f").glob("*.yaml")
                  if "stage3" not in p.name and "calce" not in p.name)
EXPECTED = {f"{ds}_{kind}.yaml" for ds in ("qvh", "charades_sta", "tacos")
            for kind in ("stage1", "stage2", "stage2_mesm", "c2f")} | {"demo_stage1.yaml", "demo_stage2.yaml",
                                                                        "demo_c2f.yaml", "msrvtt_tmass.yaml",
                                                                        "msrvtt_ucofia.yaml"}


def _runner_keys():
    from lavis_c2f.runners import c2f_runner

    doc = c2f_runner.__doc__
    start = doc.index("keys read here")
    block = doc[doc.index("):", start) + 2:]                 # after "(all optional except ...):"
    block = block[block.index("``") + 2:]
    keys = {k.strip() for k in block[:block.index("``")].split(",")}
    assert {"device", "max_epoch", "resume_ckpt_path"} <= keys   # the docstring format did not change
    return keys | {"task", "runner", "find_unused_parameters", "lr_decay_rate"}


def test_all_projects_exist():
    assert EXPECTED <= {p.name for p in PROJECTS}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP with CLIP ViT-B's 512-d projection, for projects with a CLIP tower."""
    from frames_helpers import write_tiny_clip

    d = tmp_path_factory.mktemp("clip512")
    write_tiny_clip(d, width=16, proj=512, layers=1, image_size=32)
    return d


@pytest.mark.parametrize("path", PROJECTS, ids=lambda p: p.name)
def test_project_yaml_is_valid(path, monkeypatch, tmp_path, clip_dir):
    import lavis_c2f  # noqa: F401
    from lavis.common.config import Config
    from lavis.common.registry import registry

    from lavis_c2f.datasets.builders import parse_dataset_config
    from lavis_c2f.datasets.frames_builders import C2FFramesDatasetBuilder
    from lavis_c2f.models.grounder.config_schema import resolve_config, to_plain

    monkeypatch.setenv("C2F_OUTPUT", str(tmp_path))
    monkeypatch.setenv("C2F_CLIP_PATH", str(clip_dir))
    from ucofia_helpers import write_openai_clip

    monkeypatch.setenv("C2F_UCOFIA_CLIP", str(write_openai_clip(tmp_path / "ViT-B-32.pt", embed=512, width=512,
                                                                vision_layers=1, text_layers=1, vocab=64)))
    cfg = Config(argparse.Namespace(cfg_path=str(path), options=None))
    run = cfg.run_cfg
    task_cls = registry.get_task_class(run.task)
    unknown = set(run.keys()) - _runner_keys() - set(task_cls.TASK_OPTIONS)
    assert not unknown, f"{path.name}: unknown run keys {sorted(unknown)}"
    task = task_cls.setup_task(cfg=cfg)                       # validates the task options
    assert run.runner == "c2f_runner"
    for split_key in ("train_splits", "valid_splits", "test_splits"):
        assert all(isinstance(s, str) for s in run.get(split_key, []))
    # datasets: every key known (files are not opened)
    for name in cfg.datasets_cfg:
        builder = registry.get_builder_class(name)
        if issubclass(builder, C2FFramesDatasetBuilder):            # video files: parsed, not opened
            assert run.task == "c2f_video_retrieval", path.name
            annotations = builder(cfg.datasets_cfg[name]).annotations
        else:
            spec = parse_dataset_config(cfg.datasets_cfg[name], name, builder.EXTRA_KEYS, None)
            expected = {"c2f_video_retrieval": "video_retrieval"}.get(run.task, "moment_retrieval")
            assert spec.dataset_type == expected, path.name
            annotations = spec.annotations
        for s in set(run.get("train_splits", [])) | set(run.get("valid_splits", [])) | set(run.get("test_splits", [])):
            assert s in annotations, f"{path.name}: split {s} has no annotations"
    # model: every key known; small models are built
    model_cfg = cfg.model_cfg
    cls = registry.get_model_class(model_cfg.arch)
    if hasattr(cls, "FIELDS"):
        resolve_config(to_plain(model_cfg), cls.FIELDS)
        if "demo" in path.name:
            cls.from_config(model_cfg)
    else:
        model = cls.from_config(model_cfg)
        if run.task == "c2f_video_retrieval":
            widths = [getattr(model, k, model.embed_dim) for k in ("text_input_dim", "video_input_dim")]
            assert widths == [512, 512]                      # CLIP ViT-B widths (UCoFiA: its embed_dim)
    if run.task == "c2f_corpus_moment_retrieval":
        src = task.stage1_source("val")
        assert src is None or src.endswith("val_best_ranks.jsonl")
    out = str(run.output_dir)
    assert out.startswith(str(tmp_path)) and re.search(path.stem.replace("_stage2_mesm", "_stage2_mesm"), out)
