"""Official T-MASS checkpoints: read, map to this package's names, load strictly.

The official trainer (``github.com/Jiamian-Wang/T-MASS-text-video-retrieval``,
``BaseTrainer._save_checkpoint``) writes ``{"epoch", "state_dict", "optimizer"}`` with the
``CLIPStochastic`` state dict and no config. Key mapping (official -> ``C2FTMassRetriever``):

=========================================  ==========================================
``clip.<HF CLIPModel key>``                ``clip.model.<HF CLIPModel key>``
``pool_frames.cross_attn.{q,k,v,out}_proj`` ``pool.{q,k,v,out}_proj``
``pool_frames.{linear_proj,layer_norm1..3}`` ``pool.{linear_proj,layer_norm1..3}``
``stochastic.std_branch.linear_proj``      ``stochastic.linear_proj``
``stochastic.std_branch.learnable_scalar`` dropped (never used by the official forward)
``*.embeddings.position_ids``              dropped / allowed missing (buffers persistent in
                                           transformers <= 4.30, not since 4.31)
=========================================  ==========================================

Everything else that is missing or unexpected, and every shape mismatch, is an error listing
the keys (:class:`~lavis_c2f.models.checkpoint.CheckpointMismatchError`). The embedding
width ``D`` and frame count ``F`` come from ``stochastic.std_branch.linear_proj.weight`` (D, F);
the CLIP architecture must be given (``clip_config`` or a local CLIP folder): the file does not
record it. :func:`lavis_c2f.models.retriever.load_tmass_checkpoint` builds the model.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.models.checkpoint import CheckpointMismatchError, load_checkpoint_file, load_state_strict

RADIUS_KEY = "stochastic.std_branch.linear_proj.weight"
DROPPED = ("stochastic.std_branch.learnable_scalar",)
_PREFIXES = (("clip.", "clip.model."), ("pool_frames.cross_attn.", "pool."), ("pool_frames.", "pool."),
             ("stochastic.std_branch.", "stochastic."))


def read_tmass_checkpoint(path: "str | os.PathLike", map_location: "str | torch.device" = "cpu"
                          ) -> Dict[str, torch.Tensor]:
    """The ``state_dict`` of an official checkpoint (loaded with ``weights_only=True``).

    Raises :class:`DataFormatError` naming the file when it is another kind of checkpoint
    (this package's, QD-DETR's, a bare state dict of another model).
    """
    path = os.fspath(path)
    ck = load_checkpoint_file(path, map_location=map_location)
    sd = ck.get("state_dict")
    if not isinstance(sd, Mapping):
        if "model" in ck and "config" in ck:
            hint = ("a lavis-c2f checkpoint (keys 'model', 'config'): load it with evaluate.py run.checkpoint / "
                    "lavis_c2f.predictor.load_retriever")
        elif "model" in ck and "opt" in ck:
            hint = "a Moment-DETR / QD-DETR checkpoint (keys 'model', 'opt')"
        else:
            hint = f"top-level keys {sorted(map(str, ck))[:10]}"
        raise DataFormatError(f"not an official T-MASS checkpoint (expected {{'epoch', 'state_dict', 'optimizer'}} "
                              f"as written by T-MASS's trainer); this is {hint}", path=path)
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    need = [RADIUS_KEY, "pool_frames.cross_attn.q_proj.weight", "clip.text_projection.weight",
            "clip.visual_projection.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise DataFormatError(f"'state_dict' lacks the T-MASS keys {absent} (weights of another codebase?); "
                              f"it has e.g. {sorted(sd)[:8]}", path=path)
    return sd


def tmass_dims(state_dict: Mapping[str, torch.Tensor]) -> Tuple[int, int]:
    """``(embed_dim D, num_frames F)`` from the radius layer's weight (D, F)."""
    d, f = state_dict[RADIUS_KEY].shape
    return int(d), int(f)


def map_tmass_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official keys -> this package's (module docstring); unknown keys pass unchanged (and
    are then reported as unexpected), :data:`DROPPED` keys are removed."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k in DROPPED:
            continue
        for old, new in _PREFIXES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def load_tmass_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                          source: str = "<state_dict>") -> None:
    """Load an official ``state_dict`` into a ``C2FTMassRetriever`` built for it (a CLIP tower,
    no projections, ``logit_scale_source: clip``). Widths and every key are checked; the error
    names ``source``."""
    d, f = tmass_dims(state_dict)
    if (d, f) != (int(model.embed_dim), int(model.num_frames)):
        raise CheckpointMismatchError(
            source, [], [], [(RADIUS_KEY + " = (embed_dim, num_frames)", (d, f),
                              (int(model.embed_dim), int(model.num_frames)))])
    own = model.state_dict()
    mapped = map_tmass_keys(state_dict)
    pos: List[str] = [k for k in own if k.endswith("embeddings.position_ids")]
    mapped = {k: v for k, v in mapped.items() if not (k.endswith("embeddings.position_ids") and k not in own)}
    load_state_strict(model, mapped, source=source, strict=True, allow_missing=pos)
