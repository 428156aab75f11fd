"""Checkpoint files of this package: atomic save with the resolved config, strict load.

A checkpoint is a dict saved with ``torch.save``::

    {"model": state_dict, "config": resolved config (plain dict), "arch": str,
     "epoch": int, "optimizer": ..., "scaler": ..., "best_agg_metric": float, ...}

Only tensors and plain containers go in, so it loads with ``weights_only=True``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch

from lavis_c2f.common.io import atomic_path


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not match the model; the message lists them."""

    def __init__(self, source: str, missing, unexpected, shape_mismatch):
        self.missing, self.unexpected, self.shape_mismatch = list(missing), list(unexpected), list(shape_mismatch)
        lines = [f"checkpoint {source} does not match the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {', '.join(self.missing[:30])}"
                         + (" ..." if len(self.missing) > 30 else ""))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected[:30])}"
                         + (" ..." if len(self.unexpected) > 30 else ""))
        for k, a, b in self.shape_mismatch[:30]:
            lines.append(f"  shape mismatch for {k}: checkpoint {tuple(a)} vs model {tuple(b)}")
        super().__init__("\n".join(lines))


def save_checkpoint(obj: Mapping[str, Any], path: "str | os.PathLike") -> str:
    """``torch.save`` to a temporary file beside ``path``, then rename (never half-written)."""
    with atomic_path(path) as tmp:
        torch.save(dict(obj), tmp)
    return str(path)


def load_checkpoint_file(path: "str | os.PathLike", map_location: "str | torch.device" = "cpu") -> Dict[str, Any]:
    """Load a checkpoint dict; a missing or unreadable file raises naming the path."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise RuntimeError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise RuntimeError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def extract_state_dict(ckpt: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint dict (``model`` / ``state_dict`` / bare), without ``module.``."""
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(sd, Mapping):
        raise RuntimeError("checkpoint has no 'model' state_dict")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def frozen_keys(model: torch.nn.Module) -> set:
    """State-dict keys that are not trainable parameters (frozen parameters and buffers)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k for k in model.state_dict() if k not in trainable}


def model_state_for_checkpoint(model: torch.nn.Module) -> Tuple[Dict[str, torch.Tensor], str]:
    """``(state_dict, kind)`` to save: the model's ``trainable_state_dict()`` when it defines one
    (large frozen backbones such as BLIP-2's stay out of checkpoints; kind ``"trainable"``),
    else the full ``state_dict()`` (kind ``"full"``)."""
    if hasattr(model, "trainable_state_dict"):
        return model.trainable_state_dict(), "trainable"
    return model.state_dict(), "full"


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                           source: str = "<state_dict>", strict: bool = True,
                           allow_missing: Iterable[str] = ()):
    """Load weights; with ``strict`` raise :class:`CheckpointMismatchError` listing missing,
    unexpected and wrongly shaped keys. Keys in ``allow_missing`` (e.g. the frozen weights of a
    ``"trainable"`` checkpoint) may be absent. Returns ``(missing, unexpected)``."""
    own = model.state_dict()
    allowed = set(allow_missing)
    missing = [k for k in own if k not in state_dict and k not in allowed]
    unexpected = [k for k in state_dict if k not in own]
    shape_mismatch = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
                      if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if strict and (missing or unexpected or shape_mismatch):
        raise CheckpointMismatchError(source, missing, unexpected, shape_mismatch)
    if shape_mismatch:
        raise CheckpointMismatchError(source, [], [], shape_mismatch)
    model.load_state_dict(state_dict, strict=False)
    return missing, unexpected


def load_model_weights(model: torch.nn.Module, path: "str | os.PathLike", strict: bool = True,
                       map_location: "str | torch.device" = "cpu") -> Optional[Dict[str, Any]]:
    """Load a checkpoint file's weights into ``model`` (strict by default); returns the checkpoint dict.

    A checkpoint saved with ``state_dict_kind: "trainable"`` may lack the model's frozen weights.
    """
    ckpt = load_checkpoint_file(path, map_location=map_location)
    load_checkpoint_weights(model, ckpt, source=str(path), strict=strict)
    return ckpt


def load_checkpoint_weights(model: torch.nn.Module, ckpt: Mapping[str, Any], source: str = "<checkpoint>",
                            strict: bool = True):
    """Load an already-read checkpoint dict's weights into ``model`` (see :func:`load_model_weights`:
    a ``"trainable"`` checkpoint may lack the frozen weights). Returns ``(missing, unexpected)``."""
    allow = frozen_keys(model) if ckpt.get("state_dict_kind") == "trainable" else ()
    return load_state_dict_strict(model, extract_state_dict(ckpt), source=source, strict=strict, allow_missing=allow)
