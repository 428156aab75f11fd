"""CLIP text/image towers for the stage-1 retrievers (local weights only).

A :class:`ClipTowers` wraps one ``transformers.CLIPModel`` (kept as ``.model``, so its
parameters are ``clip.model.*`` inside a retriever). It is built one of three ways:

* :meth:`ClipTowers.from_path`: a local folder written by ``CLIPModel.save_pretrained``
  (``config.json`` + weights); the package never downloads weights;
* :meth:`ClipTowers.from_config`: ``CLIPConfig(**clip_config)`` with transformers' random
  initialisation, for weights that come from a checkpoint afterwards (an official T-MASS
  ``model_best.pth`` holds the whole CLIP) or for tiny random towers in tests;
* ``ClipTowers(model)``: an existing ``CLIPModel``.

Outputs (float32, not normalised), exactly what ``CLIPModel`` computes:

* text: ``text_projection`` of every token of the text transformer's last hidden state
  (tokens) and of its pooled EOS state (sentence = ``get_text_features``; transformers 4.26
  pools at ``argmax(input_ids)``, i.e. the first EOS when EOS is the largest id, as CLIP's);
* frames: ``get_image_features`` = ``visual_projection(post_layernorm(CLS))`` per frame, or
  every projected output token (:meth:`ClipTowers.encode_image_tokens`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

from lavis_c2f.common.errors import ConfigError


def clip_config_from_path(path: str) -> Dict[str, Any]:
    """The ``CLIPConfig`` keyword arguments stored in a local CLIP folder's ``config.json``
    (``ConfigError`` naming the folder when there is none)."""
    from transformers import CLIPConfig

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"clip_path: '{path}' is not a local CLIPModel folder (no config.json)")
    try:
        return CLIPConfig.from_pretrained(path, local_files_only=True).to_dict()
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise ConfigError(f"clip_path: cannot read a CLIPConfig from {cfg_file}: {type(e).__name__}: {e}") from e


def build_clip_config(clip_config: Mapping[str, Any]):
    """``transformers.CLIPConfig(**clip_config)``; a non-mapping or a config transformers
    rejects raises :class:`ConfigError`."""
    from transformers import CLIPConfig

    if not isinstance(clip_config, Mapping):
        raise ConfigError(f"clip_config: expected a mapping of transformers CLIPConfig arguments, "
                          f"got {type(clip_config).__name__}")
    try:
        return CLIPConfig(**dict(clip_config))
    except Exception as e:  # noqa: BLE001 - transformers raises assorted types
        raise ConfigError(f"clip_config: not a valid CLIPConfig: {type(e).__name__}: {e}") from e


class ClipTowers(nn.Module):
    """One ``transformers.CLIPModel``, frozen or trainable (see the module docstring).

    Args:
        model: the CLIP model.
        freeze: no gradients and always eval mode (dropout off) when True.
    """

    def __init__(self, model: nn.Module, freeze: bool = True):
        super().__init__()
        self.model = model
        self.freeze = bool(freeze)
        if self.freeze:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()

    @classmethod
    def from_path(cls, path: str, freeze: bool = True) -> "ClipTowers":
        """Towers with the pretrained weights of a local ``CLIPModel`` folder."""
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"clip_path: '{path}' is not a local CLIPModel folder (no config.json)")
        from transformers import CLIPModel

        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised naming the folder
            raise ConfigError(f"clip_path: cannot load a CLIPModel from '{path}': {type(e).__name__}: {e}") from e
        return cls(model, freeze=freeze)

    @classmethod
    def from_config(cls, clip_config: Mapping[str, Any], freeze: bool = True) -> "ClipTowers":
        """Randomly initialised towers of architecture ``CLIPConfig(**clip_config)``."""
        from transformers import CLIPModel

        return cls(CLIPModel(build_clip_config(clip_config)), freeze=freeze)

    @property
    def projection_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def logit_scale(self) -> nn.Parameter:
        """CLIP's own (log) logit scale parameter."""
        return self.model.logit_scale

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
        sentence (B, P) (= ``get_text_features``)."""
        with self._ctx():
            out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
            proj = self.model.text_projection
            tokens = proj(out.last_hidden_state)
            sentence = proj(out.pooler_output)
        return tokens, attention_mask.to(tokens.dtype), sentence

    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 3, H, W), CLIP-normalised -> (N, P) image features."""
        with self._ctx():
            return self.model.get_image_features(pixel_values=pixel_values)

    def encode_image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 3, H, W), CLIP-normalised -> (N, 1 + G*G, P):
        ``visual_projection(post_layernorm(.))`` of every output token, CLS first (its row is
        :meth:`encode_frames`; UCoFiA's frame and patch tokens)."""
        with self._ctx():
            vm = self.model.vision_model
            return self.model.visual_projection(vm.post_layernorm(vm(pixel_values=pixel_values).last_hidden_state))
