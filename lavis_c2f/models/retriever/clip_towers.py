"""Optional end-to-end CLIP text/image towers for the retriever (local weights only).

``clip_path`` is a local folder written by ``transformers.CLIPModel.save_pretrained`` (the
package never downloads weights). The towers produce exactly the features the
features-only retriever consumes:

* text: ``text_projection`` applied to every token of the text transformer's last hidden
  state (tokens) and to its pooled EOS state (sentence, what ``get_text_features`` returns);
* video: ``get_image_features`` of each frame.
"""
from __future__ import annotations

import contextlib
import os
from typing import Tuple

import torch
from torch import nn

from lavis_c2f.common.errors import ConfigError


class ClipTowers(nn.Module):
    """A ``transformers.CLIPModel`` loaded from a local folder, frozen or trainable.

    Args:
        path: local ``CLIPModel`` folder (``config.json`` + weights).
        freeze: no gradients and always eval mode (dropout off) when True.
    """

    def __init__(self, path: str, freeze: bool = True):
        super().__init__()
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"clip_path: '{path}' is not a local CLIPModel folder (no config.json)")
        from transformers import CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised naming the folder
            raise ConfigError(f"clip_path: cannot load a CLIPModel from '{path}': {type(e).__name__}: {e}") from e
        self.freeze = bool(freeze)
        if self.freeze:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()

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
