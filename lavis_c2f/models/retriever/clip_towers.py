"""Optional end-to-end CLIP text/image towers for the retriever (local weights only).

``clip_path`` is a local folder written by ``transformers.CLIPModel.save_pretrained`` (the
package never downloads weights). The towers produce exactly the features the
features-only retriever consumes:

* text: ``text_projection`` applied to every token of the text transformer's last hidden
  state (tokens) and to its pooled EOS state (sentence, what ``get_text_features`` returns);
* video: ``get_image_features`` of each frame, or every projected output token
  (:meth:`ClipTowers.encode_image_tokens`, UCoFiA's patch tokens).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch
from torch import nn

from lavis_c2f.common.errors import ConfigError


class ClipTowers(nn.Module):
    """A ``transformers.CLIPModel`` loaded from a local folder (or given), frozen or trainable.

    Args:
        path: local ``CLIPModel`` folder (``config.json`` + weights).
        freeze: no gradients and always eval mode (dropout off) when True.
        model: an already built ``CLIPModel`` instead of ``path`` (e.g. OpenAI CLIP weights
            renamed by :mod:`~lavis_c2f.models.retriever.openai_clip`).
    """

    def __init__(self, path: Optional[str] = None, freeze: bool = True, *, model: Optional[nn.Module] = None):
        super().__init__()
        if model is not None:
            self.model = model
        else:
            self.model = self._load(str(path))
        self.freeze = bool(freeze)
        if self.freeze:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()

    @staticmethod
    def _load(path: str) -> nn.Module:
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"clip_path: '{path}' is not a local CLIPModel folder (no config.json)")
        from transformers import CLIPModel

        try:
            return CLIPModel.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised naming the folder
            raise ConfigError(f"clip_path: cannot load a CLIPModel from '{path}': {type(e).__name__}: {e}") from e

    @property
    def projection_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def train(self, mode: bool = True) -> "ClipTowers":
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    def _ctx(self):
        return torch.no_grad() if self.freeze else contextlib.nullcontext()

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (B, L) -> tokens (B, L, P), token mask (B, L) float,
        sentence (B, P)."""
        with self._ctx():
            out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
            proj = self.model.text_projection
            tokens = proj(out.last_hidden_state)
            sentence = proj(out.pooler_output)
        return tokens, attention_mask.to(tokens.dtype), sentence

    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 3, H, W) -> (N, P) image features."""
        with self._ctx():
            return self.model.get_image_features(pixel_values=pixel_values)

    def encode_image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 3, H, W) -> (N, 1 + G*G, P): ``visual_projection(post_layernorm(.))``
        of every output token, the class token first (its row equals :meth:`encode_frames`)."""
        with self._ctx():
            vm = self.model.vision_model
            hidden = vm(pixel_values=pixel_values).last_hidden_state
            return self.model.visual_projection(vm.post_layernorm(hidden))
