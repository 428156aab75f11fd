"""Tiny retriever configs and synthetic retrieval batches for the stage-1 tests."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from lavis_c2f.models.retriever import C2FTMassRetriever

TINY = dict(text_input_dim=24, video_input_dim=20, embed_dim=16, num_frames=5, num_heads=2, pool_dropout=0.0,
            num_trials=4, max_words=6, score_block_size=64)


def tiny_model(seed: int = 0, perturb: float = 0.05, **overrides: Any) -> C2FTMassRetriever:
    """A small model whose identity-initialised weights are perturbed (seeded), so that every
    layer matters in the tests."""
    torch.manual_seed(seed)
    m = C2FTMassRetriever(**{**TINY, **overrides})
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in m.parameters():
            if p.requires_grad and p.ndim >= 1:
                p.add_(perturb * torch.randn(p.shape, generator=g))
    return m.eval()


def random_batch(b: int = 5, lt: int = 7, lv: int = 9, dt: int = 24, dv: int = 20, seed: int = 0,
                 vids: Optional[list] = None) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    txt_mask = torch.ones(b, lt)
    vid_mask = torch.ones(b, lv)
    for i in range(b):
        txt_mask[i, 2 + i % (lt - 2):] = 0
        vid_mask[i, 1 + (3 * i) % lv:] = 0
    return {
        "src_txt": torch.randn(b, lt, dt, generator=g), "src_txt_mask": txt_mask,
        "txt_pooled": torch.randn(b, dt, generator=g),
        "src_vid": torch.randn(b, lv, dv, generator=g), "src_vid_mask": vid_mask,
        "vid": vids if vids is not None else [f"v{i}" for i in range(b)],
        "qid": list(range(b)), "query": [f"q{i}" for i in range(b)],
    }


def embed(model: C2FTMassRetriever, batch: Dict[str, Any]):
    with torch.no_grad():
        t = model.encode_text(batch["src_txt"], batch["src_txt_mask"], batch["txt_pooled"])
        v = model.encode_video(batch["src_vid"], batch["src_vid_mask"])
    return t, v
