"""Checkpoints and model YAMLs, each rule written once: read, save, strict load, "YAML to model node".

A checkpoint of this package is a dict saved with ``torch.save``::

    {"model": state_dict, "config": resolved config (plain dict), "arch": str,
     "epoch": int, "optimizer": ..., "scaler": ..., "best_agg_metric": float, ...}

Only tensors and plain containers go in, so it loads with ``weights_only=True``
(:func:`torch_load`; official QD-DETR files also pickle an ``argparse.Namespace``, which is
allow-listed; anything else needs ``trusted=True``).

* :func:`load_state_strict` is **the** strict-load rule: every missing, unexpected and
  mis-shaped key is listed in one :class:`~lavis_c2f.common.errors.CheckpointMismatchError`;
  keys the caller allows to be absent (frozen towers, ``allow_missing``) are not missing.
* :func:`model_node` is **the** "YAML (or mapping) to model node" loader: a YAML path
  (:func:`find_yaml`: the working directory, then ``lavis_c2f/configs``, then the checkout) or
  a mapping, whose ``model:`` (or other ``key:``) node is taken when present.
* :func:`load_model` builds a registered model from a model node or from the config stored in
  its checkpoint and loads the weights strictly; :func:`load_retriever` is it for stage 1. The
  grounder's checkpoint kinds (ours, the runner's, official QD-DETR) are read by
  :mod:`lavis_c2f.models.grounder.checkpoint`, which calls the same rule.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from omegaconf import OmegaConf

from lavis_c2f.common.errors import CheckpointMismatchError, ConfigError
from lavis_c2f.common.io import atomic_path
from lavis_c2f.data.cfg import to_plain
from lavis_c2f.paths import CONFIG_ROOT, PROJECT_ROOT, resolve_path
from lavis_c2f.registry_utils import get, with_model_defaults

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


# =========================================================================== files
def torch_load(path: PathLike, map_location: Any = "cpu", trusted: bool = False) -> Any:
    """``torch.load`` with weights-only unpickling (``argparse.Namespace`` allow-listed).

    A missing file raises ``FileNotFoundError``; a file needing other Python objects raises
    ``RuntimeError`` naming it unless ``trusted=True`` (then it is unpickled fully: only do
    that for files you trust).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle.UnpicklingError, zip errors, ...: re-raised with the path
        if not trusted:
            raise RuntimeError(f"cannot read checkpoint {path} with weights_only=True ({type(err).__name__}: "
                               f"{err}); if you trust this file, pass trusted=True to unpickle it fully") from err
        logger.warning("loading %s with weights_only=False (trusted=True)", path)
        return torch.load(path, map_location=map_location, weights_only=False)


def load_checkpoint_file(path: PathLike, map_location: Any = "cpu", trusted: bool = False) -> Dict[str, Any]:
    """A checkpoint dict (:func:`torch_load`); any other content raises naming the path."""
    obj = torch_load(path, map_location=map_location, trusted=trusted)
    if not isinstance(obj, dict):
        raise RuntimeError(f"checkpoint {os.fspath(path)} holds a {type(obj).__name__}, expected a dict")
    return obj


def save_checkpoint(obj: Mapping[str, Any], path: PathLike) -> str:
    """``torch.save`` to a temporary file beside ``path``, then rename (never half-written)."""
    with atomic_path(path) as tmp:
        torch.save(dict(obj), tmp)
    return str(path)


def extract_state_dict(ckpt: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint dict (``model`` / ``state_dict`` / bare), without ``module.``."""
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(sd, Mapping):
        raise RuntimeError("checkpoint has no 'model' state_dict")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def model_state_for_checkpoint(model: torch.nn.Module) -> Tuple[Dict[str, torch.Tensor], str]:
    """``(state_dict, kind)`` to save: the model's ``trainable_state_dict()`` when it defines one
    (large frozen backbones such as BLIP-2's stay out of checkpoints; kind ``"trainable"``),
    else the full ``state_dict()`` (kind ``"full"``)."""
    if hasattr(model, "trainable_state_dict"):
        return model.trainable_state_dict(), "trainable"
    return model.state_dict(), "full"


# =========================================================================== the strict-load rule
def frozen_keys(model: torch.nn.Module, buffers: bool = True) -> set:
    """State-dict keys that are not trainable parameters: frozen parameters, and the buffers
    too when ``buffers`` (what a ``"trainable"`` checkpoint leaves out)."""
    if not buffers:
        return {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k for k in model.state_dict() if k not in trainable}


def load_state_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "<state_dict>",
                      *, strict: bool = True, allow_missing: Iterable[str] = (),
                      allow_missing_prefixes: Iterable[str] = ()) -> Dict[str, list]:
    """Load ``state_dict`` into ``model`` by the one rule of the package.

    A key of the model absent from ``state_dict`` is *missing* unless it is in
    ``allow_missing`` or starts with one of ``allow_missing_prefixes`` (frozen weights kept out
    of checkpoints); a key of ``state_dict`` the model lacks is *unexpected*; a key with another
    shape is *mismatched*. With ``strict`` any of them raises
    :class:`~lavis_c2f.common.errors.CheckpointMismatchError` listing them all, naming
    ``source``; without, the keys that match are loaded, the others logged.

    Returns:
        ``{"missing", "unexpected", "mismatched"}`` (lists; empty after a strict load).
    """
    own = model.state_dict()
    allowed, prefixes = set(allow_missing), tuple(allow_missing_prefixes)
    missing = [k for k in own if k not in state_dict and k not in allowed and not (prefixes and k.startswith(prefixes))]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        err = CheckpointMismatchError(source, missing, unexpected, mismatched)
        if strict:
            raise err
        logger.warning("%s", err)
    bad = {k for k, _, _ in mismatched}
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own and k not in bad}, strict=False)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def load_checkpoint_weights(model: torch.nn.Module, ckpt: Mapping[str, Any], source: str = "<checkpoint>",
                            strict: bool = True) -> Dict[str, list]:
    """Load an already-read checkpoint dict's weights into ``model`` (:func:`load_state_strict`;
    a checkpoint saved with ``state_dict_kind: "trainable"`` may lack the frozen weights)."""
    allow = frozen_keys(model) if ckpt.get("state_dict_kind") == "trainable" else ()
    return load_state_strict(model, extract_state_dict(ckpt), source=source, strict=strict, allow_missing=allow)


def load_model_weights(model: torch.nn.Module, path: PathLike, strict: bool = True,
                       map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint file's weights into ``model`` (strict by default); returns the checkpoint dict."""
    ckpt = load_checkpoint_file(path, map_location=map_location)
    load_checkpoint_weights(model, ckpt, source=os.fspath(path), strict=strict)
    return ckpt


# =========================================================================== YAML to model node
def find_yaml(path: PathLike, where: str, base: Optional[PathLike] = None) -> str:
    """The absolute path of a YAML named on the command line or in a config: ``path`` as given
    (absolute, or relative to the working directory), else relative to ``base`` (the folder of
    the config that names it), to ``lavis_c2f/configs``, then to the checkout. A missing file
    raises :class:`ConfigError` naming ``where``."""
    p = os.path.expandvars(os.path.expanduser(os.fspath(path)))
    if os.path.isabs(p):
        candidates = [p]
    else:
        rel = p.split(os.sep, 1)[1] if p.startswith("configs" + os.sep) else p
        candidates = [os.path.join(os.getcwd(), p)] + ([os.path.join(os.fspath(base), p)] if base else []) + [
            os.path.join(str(CONFIG_ROOT), rel), os.path.join(str(PROJECT_ROOT), p)]
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    raise ConfigError(f"{where}: YAML not found: {resolve_path(p)} (also looked in lavis_c2f/configs and the "
                      "checkout)")


def model_node(cfg: Any, where: str, key: str = "model") -> Dict[str, Any]:
    """A model config as a plain dict.

    Args:
        cfg: a YAML path (:func:`find_yaml`) or a mapping (plain or OmegaConf).
        where: names ``cfg`` in errors (``--model-cfg``, ``grounder_cfg``, ``run.refine.config``).
        key: the node taken when the YAML or mapping has one (``model``, ``refiner``).
    Raises:
        ConfigError: the file is missing or unreadable, or holds no mapping.
    """
    return model_node_from(cfg, where, key)[0]


def model_node_from(cfg: Any, where: str, key: str = "model") -> Tuple[Dict[str, Any], Optional[str]]:
    """:func:`model_node` and the YAML file it was read from (None for a mapping)."""
    path = None
    if isinstance(cfg, (str, os.PathLike)):
        path = find_yaml(cfg, where)
        try:
            node = to_plain(OmegaConf.load(path))
        except Exception as e:  # OmegaConf / yaml raise several types for bad files
            raise ConfigError(f"{where}: cannot read {path}: {e}") from None
    else:
        node = to_plain(cfg)
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where}: {path or 'the config'} holds no mapping (expected {key} keys or a '{key}:' "
                          f"node), got {type(node).__name__}")
    if isinstance(node.get(key), Mapping):
        node = node[key]
    return dict(node), path


# =========================================================================== models from checkpoints
def load_model(checkpoint: Optional[PathLike], model_cfg: Any = None, *, default_arch: str,
               where: str = "model_cfg", device: Any = "cpu", requires: Optional[str] = None,
               kind: str = "model") -> torch.nn.Module:
    """A registered model in eval mode: built from ``model_cfg`` (:func:`model_node`, merged over
    its ``model_type`` defaults) or else from the config stored in ``checkpoint`` (ours / the
    runner's), then the checkpoint's weights loaded strictly (config keys the class lists in
    ``START_WEIGHTS_KEYS``, such as T-MASS's ``tmass_checkpoint``, name weights the checkpoint
    replaces: they are dropped then). ``checkpoint=None`` (``model_cfg`` required) gives the
    freshly built model. ``where`` names ``model_cfg`` in errors; a class
    without the attribute ``requires`` is not a ``kind`` (:class:`ConfigError`)."""
    path = os.fspath(checkpoint) if checkpoint is not None else None
    ck = load_checkpoint_file(path) if path is not None else None
    if model_cfg is not None:
        node = with_model_defaults(model_node(model_cfg, where), default_arch)
    elif ck is None:
        raise ConfigError(f"{where}: a {kind} needs a model YAML or a checkpoint that stores its config")
    else:
        stored = ck.get("config")
        if not isinstance(stored, Mapping):
            raise ConfigError(f"{path}: the checkpoint stores no model config; pass {where} (the model YAML "
                              "it was trained with)")
        node = dict(stored["model"]) if isinstance(stored.get("model"), Mapping) else dict(stored)
    arch = node.get("arch", default_arch)
    cls = get("model", arch)
    if requires is not None and not hasattr(cls, requires):
        raise ConfigError(f"{path or where}: arch '{arch}' is not a {kind}")
    if ck is not None:  # the checkpoint's weights replace those of a start point the config names
        node = {k: v for k, v in node.items() if k not in getattr(cls, "START_WEIGHTS_KEYS", ())}
    model = cls.from_config(node)
    if ck is not None:
        load_checkpoint_weights(model, ck, source=path, strict=True)
    return model.to(device).eval()


def load_retriever(checkpoint: Optional[PathLike], model_cfg: Any = None, device: Any = "cpu",
                   where: str = "retriever_cfg") -> torch.nn.Module:
    """A stage-1 retriever (:func:`load_model`, default arch ``c2f_tmass_retriever``; the class
    must have a ``fingerprint``, which the stage-1 index checks)."""
    return load_model(checkpoint, model_cfg, default_arch="c2f_tmass_retriever", where=where, device=device,
                      requires="fingerprint", kind="stage-1 retriever")


__all__ = ["CheckpointMismatchError", "extract_state_dict", "frozen_keys", "load_checkpoint_file",
           "load_checkpoint_weights", "load_model", "load_model_weights", "load_retriever", "load_state_strict",
           "find_yaml", "model_node", "model_node_from", "model_state_for_checkpoint", "save_checkpoint", "torch_load"]
