"""A tiny random CLIP in OpenAI's state-dict layout (the ``ViT-B-32.pt`` key names), for UCoFiA
tests that need a CLIP file of their own."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch


def _block(prefix: str, w: int, g: torch.Generator) -> Dict[str, torch.Tensor]:
    r = lambda *s: 0.05 * torch.randn(*s, generator=g)  # noqa: E731
    return {f"{prefix}.attn.in_proj_weight": r(3 * w, w), f"{prefix}.attn.in_proj_bias": r(3 * w),
            f"{prefix}.attn.out_proj.weight": r(w, w), f"{prefix}.attn.out_proj.bias": r(w),
            f"{prefix}.ln_1.weight": 1 + r(w), f"{prefix}.ln_1.bias": r(w),
            f"{prefix}.mlp.c_fc.weight": r(4 * w, w), f"{prefix}.mlp.c_fc.bias": r(4 * w),
            f"{prefix}.mlp.c_proj.weight": r(w, 4 * w), f"{prefix}.mlp.c_proj.bias": r(w),
            f"{prefix}.ln_2.weight": 1 + r(w), f"{prefix}.ln_2.bias": r(w)}


def openai_clip_state_dict(embed: int = 16, width: int = 16, vision_layers: int = 2, text_layers: int = 2,
                           patch: int = 4, grid: int = 7, context: int = 77, vocab: int = 49408,
                           seed: int = 0) -> Dict[str, torch.Tensor]:
    """A random OpenAI CLIP (ViT) state dict: the vision and text widths are ``width``."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.05 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {"positional_embedding": r(context, width), "text_projection": r(width, embed),
          "logit_scale": torch.tensor(4.6052), "token_embedding.weight": r(vocab, width),
          "ln_final.weight": 1 + r(width), "ln_final.bias": r(width),
          "visual.class_embedding": r(width), "visual.positional_embedding": r(grid * grid + 1, width),
          "visual.proj": r(width, embed), "visual.conv1.weight": r(width, 3, patch, patch),
          "visual.ln_pre.weight": 1 + r(width), "visual.ln_pre.bias": r(width),
          "visual.ln_post.weight": 1 + r(width), "visual.ln_post.bias": r(width)}
    for i in range(vision_layers):
        sd.update(_block(f"visual.transformer.resblocks.{i}", width, g))
    for i in range(text_layers):
        sd.update(_block(f"transformer.resblocks.{i}", width, g))
    return {k: v.half() for k, v in sd.items()}


def write_openai_clip(path: Path, **kw) -> Path:
    torch.save(openai_clip_state_dict(**kw), path)
    return path
