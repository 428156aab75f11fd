"""UCoFiA test helpers: a tiny random CLIP in OpenAI's state-dict layout (the ``ViT-B-32.pt`` key
names), a tiny UCoFiA model and random UCoFiA embeddings (scoring tests need no CLIP forward)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from lavis_c2f.models.retriever import C2FUCoFiA, UCoFiAText, UCoFiAVideo
from lavis_c2f.models.retriever.modules import l2norm


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


E, F, L, K = 16, 4, 6, 3                # embedding width, frames, words, top-k


def tiny_ucofia(seed=0, **kw):
    """A UCoFiA of tiny sizes (no patch shift) with perturbed scoring weights, in eval mode."""
    torch.manual_seed(seed)
    m = C2FUCoFiA(embed_dim=E, vision_width=16, vision_layers=1, vision_patch_size=4, image_resolution=28,
                  text_width=E, text_layers=1, context_length=77, vocab_size=100, max_words=L, max_frames=F,
                  temporal_layers=1, frame_positions=77, topk=K, shift_layers=[], **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.startswith("clip."):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m.eval()


def random_videos(n, seed=0):
    """Videos with 1..F real frames; a frame's CLS row is its first patch row, as the encoder's."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(n, F, E, generator=g)
    lengths = torch.randint(1, F + 1, (n,), generator=g)
    mask = (torch.arange(F)[None] < lengths[:, None]).float()
    sel = torch.randn(n, F, K, E, generator=g)
    patches = torch.cat([frames.unsqueeze(2), sel], 2).reshape(n, F * (1 + K), E)
    return UCoFiAVideo(frames, mask, patches, l2norm(torch.randn(n, E, generator=g)))


def random_texts(n, seed=1, words=L):
    """Texts with ``words`` real tokens of L (the rest padding rows)."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(L) < words).float().expand(n, L).clone()
    return UCoFiAText(torch.randn(n, E, generator=g), torch.randn(n, L, E, generator=g), mask)
