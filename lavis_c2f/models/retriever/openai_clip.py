"""OpenAI CLIP weights (the ``ViT-B-32.pt`` layout) on the package's one CLIP implementation,
``transformers.CLIPModel``.

Checkpoints of CLIP4Clip-family models (UCoFiA) store OpenAI's key names
(``visual.conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``, ...). This module
reads every size from such a state dict (:func:`openai_clip_sizes`), builds the matching
``CLIPConfig`` (:func:`transformers_clip_config`) and renames the weights
(:func:`openai_to_transformers`). The two layouts compute the same function:

* a residual block ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` is transformers'
  ``layer_norm1``/``self_attn``/``layer_norm2``/``mlp`` with QuickGELU; the packed
  ``attn.in_proj_weight`` (3W, W) splits row-wise into ``q_proj``/``k_proj``/``v_proj``;
* ``text_projection`` (W, E) and ``visual.proj`` (Wv, E) are the transposed weights of the
  bias-free ``text_projection`` / ``visual_projection`` linears;
* OpenAI's heads are ``width // 64``; every LayerNorm uses eps 1e-5.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Optional

import torch

from lavis_c2f.models.checkpoint import torch_load

HEAD_WIDTH = 64  # OpenAI CLIP: heads = width // 64
# keys a TorchScript ``ViT-B-32.pt`` state dict carries besides the weights
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")

_BLOCK = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
}
_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_RESBLOCK = re.compile(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class OpenAIClipSizes:
    """Sizes of an OpenAI ViT CLIP, all read from its weights."""

    embed_dim: int
    vision_width: int
    vision_layers: int
    vision_patch_size: int
    image_resolution: int
    text_width: int
    text_layers: int
    context_length: int
    vocab_size: int

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


def _layers(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}\.resblocks\.(\d+)\.")
    idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(idx) + 1 if idx else 0


def openai_clip_sizes(sd: Mapping[str, torch.Tensor]) -> OpenAIClipSizes:
    """Sizes of the ViT CLIP in ``sd`` (OpenAI key names, no prefix), as OpenAI's
    ``build_model`` reads them. Raises ``KeyError`` naming a missing key (e.g. a ResNet CLIP,
    which has no ``visual.proj``)."""
    for k in ("visual.proj", "visual.conv1.weight", "visual.positional_embedding", "text_projection",
              "positional_embedding", "token_embedding.weight", "ln_final.weight"):
        if k not in sd:
            raise KeyError(k)
    conv = sd["visual.conv1.weight"]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return OpenAIClipSizes(
        embed_dim=int(sd["text_projection"].shape[1]), vision_width=int(conv.shape[0]),
        vision_layers=_layers(sd, "visual.transformer"), vision_patch_size=int(conv.shape[-1]),
        image_resolution=int(conv.shape[-1]) * grid, text_width=int(sd["ln_final.weight"].shape[0]),
        text_layers=_layers(sd, "transformer"), context_length=int(sd["positional_embedding"].shape[0]),
        vocab_size=int(sd["token_embedding.weight"].shape[0]))


def heads(width: int) -> int:
    """OpenAI CLIP's number of attention heads of a ``width``-wide transformer."""
    return max(1, int(width) // HEAD_WIDTH)


def transformers_clip_config(sizes: OpenAIClipSizes):
    """The ``transformers.CLIPConfig`` computing OpenAI CLIP of these sizes."""
    from transformers import CLIPConfig

    text = dict(vocab_size=sizes.vocab_size, hidden_size=sizes.text_width, intermediate_size=4 * sizes.text_width,
                num_hidden_layers=sizes.text_layers, num_attention_heads=heads(sizes.text_width),
                max_position_embeddings=sizes.context_length, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                dropout=0.0, attention_dropout=0.0)
    vision = dict(hidden_size=sizes.vision_width, intermediate_size=4 * sizes.vision_width,
                  num_hidden_layers=sizes.vision_layers, num_attention_heads=heads(sizes.vision_width),
                  image_size=sizes.image_resolution, patch_size=sizes.vision_patch_size, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5, dropout=0.0, attention_dropout=0.0)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sizes.embed_dim)


def openai_block_to_transformers(rest: str, value: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One residual-block entry (``ln_1.weight``, ``attn.in_proj_weight``, ...) in
    transformers' ``CLIPEncoderLayer`` names; ``{}`` for a name that is not a block weight."""
    if rest in _BLOCK:
        return {_BLOCK[rest]: value}
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        q, k, v = value.chunk(3, dim=0)
        kind = rest.rsplit("_", 1)[1]
        return {f"self_attn.q_proj.{kind}": q, f"self_attn.k_proj.{kind}": k, f"self_attn.v_proj.{kind}": v}
    return {}


def openai_to_transformers(sd: Mapping[str, torch.Tensor], *, prefix: str = ""
                           ) -> tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Rename the OpenAI CLIP weights under ``prefix`` to ``CLIPModel`` state-dict keys.

    Returns ``(weights, sources)``: the renamed tensors and, for each new key, the source key it
    came from. Keys under ``prefix`` that are not CLIP weights are left out (the caller decides
    whether that is an error); :data:`OPENAI_META_KEYS` are ignored.
    """
    out: Dict[str, torch.Tensor] = {}
    src: Dict[str, str] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if k in OPENAI_META_KEYS:
            continue
        new: Dict[str, torch.Tensor] = {}
        if k in _TOP:
            new = {_TOP[k]: value}
        elif k in _TRANSPOSED:
            new = {_TRANSPOSED[k]: value.t().contiguous()}
        else:
            m = _RESBLOCK.match(k)
            if m:
                tower = "vision_model" if m.group(1) == "visual.transformer" else "text_model"
                block = openai_block_to_transformers(m.group(3), value)
                new = {f"{tower}.encoder.layers.{m.group(2)}.{n}": t for n, t in block.items()}
        for n, t in new.items():
            out[n] = t
            src[n] = key
    return out, src


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries of ``sd`` under ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_openai_clip_state_dict(path: str, map_location: "str | torch.device" = "cpu"
                                ) -> Dict[str, torch.Tensor]:
    """The state dict of an OpenAI CLIP file: a TorchScript archive (``ViT-B-32.pt`` as
    released) or a ``torch.save``d state dict, as the official ``CLIP.get_config`` accepts.
    Raises ``FileNotFoundError`` / ``ValueError`` naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP weights not found: {path}")
    err: Optional[Exception] = None
    try:
        return {k: v for k, v in torch.jit.load(path, map_location=map_location).state_dict().items()}
    except Exception as e:  # noqa: BLE001 - not TorchScript: try a plain state dict
        err = e
    try:
        obj = torch_load(path, map_location=map_location)
    except RuntimeError as e:  # re-raised naming both readings
        raise ValueError(f"{path}: neither a TorchScript CLIP archive ({type(err).__name__}) nor a state dict "
                         f"({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: not an OpenAI CLIP state dict (expected a mapping of tensors)")
    return dict(obj)
