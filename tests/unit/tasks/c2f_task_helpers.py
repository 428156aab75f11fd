"""Tiny demo corpora, datasets and models for the task tests (seconds on a CPU)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

TINY_CORPUS = dict(n_videos=12, queries_per_video=(2, 3), video_dim=16, text_dim=16, latent_dim=8,
                   min_clips=6, max_clips=12, min_window_clips=1, max_window_clips=3)


def make_corpus(root: Path, **overrides: Any) -> Path:
    from lavis_c2f.data.demo_corpus import make_demo_corpus

    make_demo_corpus(str(root), **{**TINY_CORPUS, **overrides})
    return root


def write_fake_ranks(splits: Dict[str, Any], folder: Path, seed: int = 0) -> str:
    """Fake stage-1 ranks: every query ranks every video of its split (seeded random scores, so
    its GT video lands at a varying place), one ``{split}_best_ranks.jsonl`` per split in
    ``folder``. Returns the ``run.stage1_ranks`` template (``.../{split}_best_ranks.jsonl``)."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    for split, ds in splits.items():
        vids = sorted({r.vid for r in ds.records})
        with open(folder / f"{split}_best_ranks.jsonl", "w") as f:
            for rec in ds.records:
                scores = rng.normal(size=len(vids))
                order = np.argsort(-scores)
                f.write(json.dumps({"qid": rec.qid, "query": rec.query,
                                    "ranked_vids": [[vids[j], float(scores[j])] for j in order]}) + "\n")
    return str(folder / "{split}_best_ranks.jsonl")


def build_splits(root: Path, dataset_type: str, **overrides: Any) -> Dict[str, Any]:
    """{split: dataset} of the corpus at ``root`` through the c2f_demo builder."""
    from omegaconf import OmegaConf

    from lavis_c2f.datasets.builders import DemoCorpusBuilder
    from lavis_c2f.paths import config_path

    cfg = OmegaConf.load(config_path("datasets/demo/defaults.yaml")).datasets.c2f_demo
    cfg.data_root = str(root)
    cfg.dataset_type = dataset_type
    cfg.auto_generate = False
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    return DemoCorpusBuilder(cfg).build_datasets()


def tiny_retriever(seed: int = 0, **overrides: Any):
    from lavis_c2f.models.retriever import C2FTMassRetriever

    torch.manual_seed(seed)
    cfg = dict(text_input_dim=16, video_input_dim=16, embed_dim=16, num_frames=4, num_heads=2, pool_dropout=0.0,
               num_trials=3, max_words=6, score_block_size=32, use_frame_sentence=True)
    cfg.update(overrides)
    m = C2FTMassRetriever(**cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in m.parameters():
            if p.requires_grad and p.ndim >= 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


def tiny_grounder(seed: int = 0, **overrides: Any):
    from lavis_c2f.models.grounder import C2FQDDETR

    torch.manual_seed(seed)
    cfg = dict(arch="c2f_qd_detr", txt_dim=16, vid_dim=18, hidden_dim=16, nheads=2, enc_layers=1, dec_layers=1,
               dim_feedforward=24, num_queries=4, max_v_l=75, postprocess={"max_after_nms": 3, "nms_threshold": 0.7,
                                                                          "max_before_nms": 4})
    cfg.update(overrides)
    return C2FQDDETR.from_config(cfg).eval()
