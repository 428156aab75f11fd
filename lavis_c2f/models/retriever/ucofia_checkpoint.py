"""Official UCoFiA weights in the key names of :class:`~lavis_c2f.models.retriever.ucofia.C2FUCoFiA`
(reading, checking and mapping; :func:`~lavis_c2f.models.retriever.ucofia.load_ucofia_checkpoint`
builds the model).

The official checkpoint is what the trainer's ``save_model`` writes
(``pytorch_model.bin.N``: ``torch.save(model.state_dict())``, OpenAI CLIP key names under
``clip.``, CLIP's linear/conv/attention weights in float16) and the OpenAI CLIP file the
official code always reads beside it (``ViT-B-32.pt``). Every size comes from the weights.
Keys are mapped one to one and loaded strictly, with one official exception:

**Blocks 10 and 11** (``shift_attention``). The official ``from_pretrained`` copies every key
of ``ViT-B-32.pt`` that the checkpoint lacks, loads non-strictly and only then wraps the
attention of vision blocks 10 and 11 in the patch-shift module. A trainer-saved checkpoint
stores those blocks' attention as ``...resblocks.{10,11}.attn.net.*`` (the wrapped module),
which that load does not use: the official evaluation runs blocks 10 and 11 with the
**pretrained CLIP's attention weights**. ``shift_attention="pretrained"`` (default) does the
same and names the unused ``attn.net.*`` keys in a logged warning; ``"checkpoint"`` uses the
checkpoint's trained weights instead (what the trainer optimised, not what the released
numbers were computed with).

:func:`clip_init_state_dict` is the official trainer's start from OpenAI CLIP
(``frame_position_embeddings`` from CLIP's text positions, the temporal encoder from its first
text blocks, identity matrices, N(0, 0.02) patch scorer).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.models.checkpoint import CheckpointMismatchError, torch_load
from lavis_c2f.models.retriever.openai_clip import (OPENAI_META_KEYS, load_openai_clip_state_dict,
                                                    openai_block_to_transformers, openai_clip_sizes,
                                                    openai_to_transformers, strip_prefix)

logger = logging.getLogger(__name__)

SHIFT_ATTENTION = ("pretrained", "checkpoint")
OFFICIAL_SHIFT_LAYERS = (10, 11)
# official top-level names -> ours (the rest of the checkpoint is CLIP, transformerClip, the selector)
_RENAME = {
    "global_mat_weight": "global_mat_weight", "global_mat_weight_1": "global_mat_weight_1",
    "local_mat_weight": "local_mat_weight", "local_mat_weight1": "local_mat_weight1",
    "frame_logit_weight": "frame_isa.weight", "word_mat_weight": "word_isa.weight",
    "pixel_mat_weight": "pixel_isa.weight", "pixel_mat_weight2": "pixel_isa2.weight",
    "word_mat_weight2": "word_isa2.weight", "word_logit_weight": "word_logit_weight",
    "frame_mat_weight": "frame_mat_weight", "frame_mat_weight2": "frame_mat_weight2",
    "word_mat_weight_for_pixel": "word_mat_weight_for_pixel",
    "frame_position_embeddings.weight": "frame_position_embeddings.weight",
    "visual_token_selector.score_predictor.in_conv.0.weight": "patch_selector.norm.weight",
    "visual_token_selector.score_predictor.in_conv.0.bias": "patch_selector.norm.bias",
    "visual_token_selector.score_predictor.in_conv.1.weight": "patch_selector.in_proj.weight",
    "visual_token_selector.score_predictor.out_conv.0.weight": "patch_selector.hidden.weight",
    "visual_token_selector.score_predictor.out_conv.2.weight": "patch_selector.score.weight",
}
_REQUIRED = ("clip.visual.proj", "clip.text_projection", "word_logit_weight", "frame_logit_weight",
             "pixel_mat_weight", "frame_position_embeddings.weight",
             "visual_token_selector.score_predictor.in_conv.1.weight")
_TEMPORAL = re.compile(r"^transformerClip\.resblocks\.(\d+)\.(.+)$")
_NET = re.compile(r"^clip\.visual\.transformer\.resblocks\.(\d+)\.attn\.net\.(.+)$")


def _read_official(path: str, map_location) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"UCoFiA checkpoint not found: {path}")
    try:
        obj = torch_load(path, map_location=map_location)
    except RuntimeError as e:  # re-raised as a data error naming the file
        raise DataFormatError(f"cannot read a torch state dict: {type(e).__name__}: {e}", path=path) from e
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj.get("config"), Mapping):
        raise DataFormatError("a checkpoint of this package, not the official trainer's pytorch_model.bin.N; "
                              "load it with run.checkpoint (evaluate.py) or C2FUCoFiA's runner", path=path)
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise DataFormatError("not a state dict (a mapping of tensors), so not a UCoFiA checkpoint", path=path)
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise DataFormatError(f"not an official UCoFiA checkpoint: it lacks {missing}", path=path, field=missing[0])
    return dict(obj)


def checkpoint_sizes(sd: Mapping[str, torch.Tensor], path: str = "<checkpoint>") -> Dict[str, int]:
    """Every size of the model in an official checkpoint (``clip.`` OpenAI weights,
    ``word_logit_weight`` (L, L), ``frame_logit_weight`` (F, F), ``pixel_mat_weight``
    (F (1 + k), ...), ``transformerClip`` blocks, ``frame_position_embeddings``)."""
    try:
        sizes = openai_clip_sizes(strip_prefix(sd, "clip.")).as_dict()
    except KeyError as e:
        raise DataFormatError(f"not an official UCoFiA checkpoint: no clip.{e.args[0]}", path=path) from e
    f = int(sd["frame_logit_weight"].shape[0])
    rows = int(sd["pixel_mat_weight"].shape[0])
    if rows % f or rows // f < 2:
        raise DataFormatError(f"pixel_mat_weight has {rows} rows, not (1 + topk) x max_frames={f}", path=path,
                              field="pixel_mat_weight")
    temporal = {int(m.group(1)) for k in sd for m in [_TEMPORAL.match(k)] if m}
    sizes.update(max_words=int(sd["word_logit_weight"].shape[0]), max_frames=f, topk=rows // f - 1,
                 temporal_layers=max(temporal) + 1 if temporal else 0,
                 frame_positions=int(sd["frame_position_embeddings.weight"].shape[0]))
    if sizes["temporal_layers"] < 1:
        raise DataFormatError("not a seqTransf UCoFiA checkpoint: no transformerClip blocks", path=path,
                              field="transformerClip")
    return sizes


def _check_clip_file(clip_sd: Mapping[str, torch.Tensor], clip_sizes: Mapping[str, int],
                     ckpt: Mapping[str, torch.Tensor], sizes: Mapping[str, int], clip_path: str) -> None:
    """The CLIP file must describe the checkpoint's CLIP: same sizes, same tensor shapes."""
    diff = [f"{k}: CLIP file {v}, checkpoint {sizes[k]}" for k, v in clip_sizes.items() if sizes[k] != v]
    shapes = [f"{k}: CLIP file {tuple(v.shape)}, checkpoint {tuple(ckpt['clip.' + k].shape)}"
              for k, v in clip_sd.items() if "clip." + k in ckpt and tuple(v.shape) != tuple(ckpt["clip." + k].shape)]
    if diff or shapes:
        raise DataFormatError("the CLIP file's sizes disagree with the UCoFiA checkpoint ("
                              + "; ".join((diff + shapes)[:12]) + ")", path=clip_path)


def _map_official(ckpt: Mapping[str, torch.Tensor], clip_sd: Mapping[str, torch.Tensor],
                  shift_layers: List[int], shift_attention: str, clip_path: str
                  ) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """(our state dict, unused checkpoint keys, checkpoint keys replaced by the CLIP file)."""
    clip_w, clip_src = openai_to_transformers(ckpt, prefix="clip.")
    out = {f"clip.model.{k}": v for k, v in clip_w.items()}
    used = set(clip_src.values())
    for key, new in _RENAME.items():
        if key in ckpt:
            out[new] = ckpt[key]
            used.add(key)
    for key, value in ckpt.items():
        m = _TEMPORAL.match(key)
        if m:
            for name, t in openai_block_to_transformers(m.group(2), value).items():
                out[f"temporal.layers.{m.group(1)}.{name}"] = t
                used.add(key)
    net_keys = sorted(k for k in ckpt if _NET.match(k) and int(_NET.match(k).group(1)) in shift_layers)
    replaced: List[str] = []
    for i in shift_layers:
        prefix = f"clip.model.vision_model.encoder.layers.{i}."
        if shift_attention == "checkpoint":
            source = {m.group(2): ckpt[k] for k in net_keys for m in [_NET.match(k)] if int(m.group(1)) == i}
            used.update(k for k in net_keys if int(_NET.match(k).group(1)) == i)
        else:
            block = f"visual.transformer.resblocks.{i}.attn."
            source = {k[len(block):]: v for k, v in clip_sd.items() if k.startswith(block)}
            if not source:
                raise DataFormatError(f"has no attention weights for vision block {i} ({block}*), which the "
                                      "official loader takes from it (shift_attention='pretrained')", path=clip_path)
            replaced.extend(k for k in net_keys if int(_NET.match(k).group(1)) == i)
            used.update(k for k in net_keys if int(_NET.match(k).group(1)) == i)
        for rest, t in source.items():
            for name, tt in openai_block_to_transformers(f"attn.{rest}", t).items():
                out[prefix + name] = tt
    unused = sorted(k for k in ckpt if k not in used)
    return out, unused, replaced


def read_clip_file(clip_weights: str, map_location: "str | torch.device" = "cpu"
                   ) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """The OpenAI CLIP file's weights (without TorchScript's meta entries) and its sizes."""
    clip_sd = {k: v for k, v in load_openai_clip_state_dict(str(clip_weights), map_location).items()
               if k not in OPENAI_META_KEYS}
    try:
        sizes = openai_clip_sizes(clip_sd).as_dict()
    except KeyError as e:
        raise DataFormatError(f"not an OpenAI ViT CLIP state dict: no {e.args[0]}", path=str(clip_weights)) from e
    return clip_sd, sizes


def shifted_blocks(vision_layers: int, requested: Sequence[int] = OFFICIAL_SHIFT_LAYERS) -> List[int]:
    """The patch-shifted vision blocks: ``requested`` ones that exist (the official code wraps
    blocks 10 and 11 by index; a smaller CLIP has fewer)."""
    return [int(i) for i in requested if int(i) < int(vision_layers)]


def read_ucofia_checkpoint(path: str, clip_weights: str, map_location: "str | torch.device" = "cpu"
                           ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, int]]:
    """``(checkpoint, clip weights, sizes)`` of an official checkpoint and its CLIP file, both
    checked (not UCoFiA, or a CLIP of other sizes: ``DataFormatError`` naming the file)."""
    ckpt = _read_official(str(path), map_location)
    sizes = checkpoint_sizes(ckpt, str(path))
    clip_sd, clip_sizes = read_clip_file(str(clip_weights), map_location)
    _check_clip_file(clip_sd, clip_sizes, ckpt, sizes, str(clip_weights))
    return ckpt, clip_sd, sizes


def official_state_dict(ckpt: Mapping[str, torch.Tensor], clip_sd: Mapping[str, torch.Tensor],
                        shift_layers: Sequence[int], shift_attention: str, path: str, clip_path: str
                        ) -> Dict[str, torch.Tensor]:
    """The checkpoint in the model's key names (module docstring); a checkpoint key the model
    has no place for raises :class:`CheckpointMismatchError`; the ``attn.net.*`` keys replaced by
    the CLIP file's attention are named in a logged warning."""
    if shift_attention not in SHIFT_ATTENTION:
        raise ConfigError(f"shift_attention must be one of {SHIFT_ATTENTION}, got {shift_attention!r}")
    state, unused, replaced = _map_official(ckpt, clip_sd, list(shift_layers), shift_attention, clip_path)
    if unused:
        raise CheckpointMismatchError(path, [], unused, [])
    if replaced:
        logger.warning("%s: vision blocks %s use the pretrained CLIP's attention weights from %s, as the official "
                       "loader does; the checkpoint's %d unused keys: %s (shift_attention='checkpoint' uses them)",
                       path, list(shift_layers), clip_path, len(replaced), ", ".join(replaced))
    return state


def clip_init_state_dict(clip_sd: Mapping[str, torch.Tensor], temporal_layers: int) -> Dict[str, torch.Tensor]:
    """The official trainer's start from CLIP: the CLIP towers, ``frame_position_embeddings`` =
    CLIP's text positions and temporal block i = CLIP text block i (for i < ``temporal_layers``)."""
    weights, _ = openai_to_transformers(clip_sd)
    state = {f"clip.model.{k}": v for k, v in weights.items()}
    state["frame_position_embeddings.weight"] = clip_sd["positional_embedding"]
    for key, value in clip_sd.items():
        m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)$", key)
        if m and int(m.group(1)) < int(temporal_layers):
            for name, t in openai_block_to_transformers(m.group(2), value).items():
                state[f"temporal.layers.{m.group(1)}.{name}"] = t
    return state
