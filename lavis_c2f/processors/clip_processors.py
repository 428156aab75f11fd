"""LAVIS processors for end-to-end CLIP inputs: ``c2f_clip_frames``, ``c2f_clip_tokenizer`` and
``c2f_clip4clip_tokenizer``.

Frames (:class:`ClipFrameProcessor`), applied to all frames of one video at once (one crop /
flip per video), on float frames ``x = uint8 / 255`` of shape (F, 3, H, W):

* ``eval`` -- T-MASS's ``clip_test``: ``Resize(S, bicubic)`` of the shorter side (torchvision
  on tensors, antialiased, not clamped), ``CenterCrop(S)`` (torchvision's rounding),
  ``Normalize(CLIP mean, std)``.
* ``train`` -- T-MASS's ``clip_train``: ``RandomResizedCrop(S, scale=(0.5, 1.0),
  ratio=(3/4, 4/3))``, ``RandomHorizontalFlip(0.5)``, ``Normalize`` (its ``ColorJitter(0, 0, 0)``
  is the identity). The crop box and flip are drawn with torchvision's algorithm from an
  explicit ``torch.Generator`` (seeded by the dataset per (seed, epoch, item)), so an epoch's
  augmentations do not depend on the number of data-loader workers.

Text (:class:`ClipTokenizer`): transformers' ``CLIPTokenizer`` from a local CLIP folder,
``[BOS, tokens..., EOS]`` truncated to ``max_words`` and padded with the tokenizer's pad token
(the released CLIP tokenizer pads with EOS, which is the largest id, so CLIP still pools at
the first EOS) either to the longest text of the batch (``padding: longest``, T-MASS's
``padding=True``) or to ``max_words`` (``max_length``, CLIP4Clip / UCoFiA's fixed 32 words).

Text as CLIP4Clip / UCoFiA's loaders make it (:class:`Clip4ClipTokenizer`): OpenAI's BPE
(bundled with LAVIS, no folder needed), ``[SOT] + BPE(text)[:max_words - 2] + [EOT]`` padded
with **0** to ``max_words``; the attention mask is 1 on the real tokens.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.data.tokenizers import get_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("train", "eval")
PADDINGS = ("longest", "max_length")


def random_resized_crop_box(height: int, width: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                            generator: Optional[torch.Generator] = None) -> Tuple[int, int, int, int]:
    """``(top, left, h, w)`` of torchvision's ``RandomResizedCrop.get_params``: up to 10 draws
    of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, else the
    largest centred box within ``ratio``."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]),
                                                   generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@registry.register_processor("c2f_clip_frames")
class ClipFrameProcessor(BaseProcessor):
    """(F, H, W, 3) uint8 frames -> (F, 3, S, S) float32 CLIP input (module docstring).

    Args:
        image_size: ``S`` (the CLIP vision tower's ``image_size``; 224 for ViT-B/32).
        mode: ``eval`` | ``train``.
        scale, ratio: ``RandomResizedCrop`` ranges (train).
        flip_prob: horizontal flip probability (train).
        mean, std: per-channel normalisation (CLIP's by default).
    """

    def __init__(self, image_size: int = 224, mode: str = "eval", scale: Sequence[float] = (0.5, 1.0),
                 ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0), flip_prob: float = 0.5,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"c2f_clip_frames.mode: expected one of {MODES}, got {mode!r}")
        if int(image_size) < 1:
            raise ConfigError(f"c2f_clip_frames.image_size: expected a positive integer, got {image_size!r}")
        self.image_size, self.mode = int(image_size), mode
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_prob = float(flip_prob)
        self.mean = torch.tensor([float(x) for x in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([float(x) for x in std]).view(1, 3, 1, 1)

    def __call__(self, frames: Any, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """frames (F, H, W, 3) uint8 (numpy or torch) -> (F, 3, S, S) float32; ``generator``
        draws the train-mode crop and flip (default: torch's global generator)."""
        x = torch.as_tensor(frames)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"frames must be (F, H, W, 3) uint8, got {tuple(x.shape)} {x.dtype}")
        x = x.permute(0, 3, 1, 2).float() / 255.0
        s = self.image_size
        if self.mode == "eval":
            x = TF.resize(x, s, interpolation=InterpolationMode.BICUBIC, antialias=True)
            x = TF.center_crop(x, [s, s])
        else:
            top, left, h, w = random_resized_crop_box(x.shape[-2], x.shape[-1], self.scale, self.ratio, generator)
            x = TF.resized_crop(x, top, left, h, w, [s, s], interpolation=InterpolationMode.BILINEAR,
                                antialias=True)
            if torch.rand(1, generator=generator).item() < self.flip_prob:
                x = x.flip(-1)
        return (x - self.mean) / self.std

    @classmethod
    def from_config(cls, cfg: Any = None) -> "ClipFrameProcessor":
        d = check_keys(cfg, {"name", "image_size", "mode", "scale", "ratio", "flip_prob", "mean", "std"},
                       "c2f_clip_frames processor")
        d.pop("name", None)
        return cls(**d)

    def __repr__(self) -> str:
        return f"ClipFrameProcessor(image_size={self.image_size}, mode={self.mode!r})"


@registry.register_processor("c2f_clip4clip_tokenizer")
class Clip4ClipTokenizer(BaseProcessor):
    """Texts -> ``{"input_ids", "attention_mask"}`` (B, max_words) int64, the official
    CLIP4Clip / UCoFiA text arrays (module docstring)."""

    def __init__(self, max_words: int = 32):
        super().__init__()
        if isinstance(max_words, bool) or int(max_words) < 2:
            raise ConfigError(f"c2f_clip4clip_tokenizer.max_words: expected an integer >= 2, got {max_words!r}")
        self.bpe = get_tokenizer("clip")
        self.max_words = int(max_words)

    def __call__(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("nothing to tokenize")
        ids = torch.zeros(len(texts), self.max_words, dtype=torch.long)
        for i, text in enumerate(texts):
            row = self.bpe.tokenize(str(text), max_len=self.max_words)
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    @classmethod
    def from_config(cls, cfg: Any = None) -> "Clip4ClipTokenizer":
        d = check_keys(cfg, {"name", "max_words"}, "c2f_clip4clip_tokenizer processor")
        d.pop("name", None)
        return cls(**d)

    def __repr__(self) -> str:
        return f"Clip4ClipTokenizer(max_words={self.max_words})"


@registry.register_processor("c2f_clip_tokenizer")
class ClipTokenizer(BaseProcessor):
    """Texts -> ``{"input_ids", "attention_mask"}`` (B, L) int64 (module docstring).

    Args:
        path: local folder with the CLIP tokenizer files (``vocab.json``, ``merges.txt``; a
            saved CLIP model folder has them).
        max_words: token slots including BOS and EOS (T-MASS: 77 = CLIP's context; UCoFiA: 32).
        padding: ``longest`` | ``max_length``.
    """

    def __init__(self, path: str, max_words: int = 77, padding: str = "longest"):
        super().__init__()
        if padding not in PADDINGS:
            raise ConfigError(f"c2f_clip_tokenizer.padding: expected one of {PADDINGS}, got {padding!r}")
        if int(max_words) < 2:
            raise ConfigError(f"c2f_clip_tokenizer.max_words: expected an integer >= 2, got {max_words!r}")
        path = os.path.abspath(os.path.expanduser(str(path)))
        if not (os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt"))):
            raise ConfigError(f"c2f_clip_tokenizer.path: '{path}' has no CLIP tokenizer files (vocab.json, merges.txt)")
        from transformers import CLIPTokenizer

        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised naming the folder
            raise ConfigError(f"c2f_clip_tokenizer.path: cannot load the CLIP tokenizer from '{path}': "
                              f"{type(e).__name__}: {e}") from e
        self.path, self.max_words, self.padding = path, int(max_words), padding

    def __call__(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("nothing to tokenize")
        enc = self.tokenizer(list(texts), padding=True if self.padding == "longest" else "max_length",
                             truncation=True, max_length=self.max_words, return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    @classmethod
    def from_config(cls, cfg: Any = None) -> "ClipTokenizer":
        d = check_keys(cfg, {"name", "path", "max_words", "padding"}, "c2f_clip_tokenizer processor")
        d.pop("name", None)
        if not d.get("path"):
            raise ConfigError("c2f_clip_tokenizer.path: missing (a local CLIP folder with vocab.json, merges.txt)")
        return cls(**d)

    def __repr__(self) -> str:
        return f"ClipTokenizer(path={self.path!r}, max_words={self.max_words}, padding={self.padding!r})"
