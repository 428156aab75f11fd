"""Checkpoint I/O of the grounder.

* :func:`load_qd_detr_checkpoint` reads an **official** QD-DETR checkpoint
  (``{"model": state_dict, "opt": argparse.Namespace, "optimizer", "lr_scheduler", "epoch"}``
  as written by ``qd_detr/train.py``), builds :class:`QDDETR` from ``opt`` (layer counts,
  feature widths incl. TEF / audio, ``use_txt_pos``, ``n_input_proj`` ...) and loads the
  weights strictly.
* :func:`save_grounder_checkpoint` / :func:`read_checkpoint` handle **our** checkpoints
  ``{"format", "version", "arch", "model", "config", ...}``; the resolved model config is
  stored with the weights. Files written by the LAVIS runner
  (``{"model", "optimizer", "config": <full run config>, "epoch", ...}``) are read too.
* :func:`load_grounder` gives a ready grounder from a checkpoint of any of these kinds.

Reading files and the strict-load rule are :mod:`lavis_c2f.models.checkpoint`'s
(:func:`~lavis_c2f.models.checkpoint.torch_load`, :func:`~lavis_c2f.models.checkpoint.load_state_strict`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.checkpoint import load_state_strict, model_node, save_checkpoint, torch_load
from lavis_c2f.models.grounder.model import QDDETR
from lavis_c2f.models.grounder.postprocess import PostProcessConfig
from lavis_c2f.registry_utils import get

logger = logging.getLogger(__name__)

FORMAT = "lavis_c2f.grounder"
VERSION = 1


# ---------------------------------------------------------------------- official checkpoints
def _opt_get(opt: Mapping[str, Any], key: str, default: Any) -> Any:
    value = opt.get(key, default)
    return default if value is None and default is not None else value


def qd_detr_kwargs_from_opt(opt: Any, state_dict: Optional[Mapping[str, torch.Tensor]] = None
                            ) -> Dict[str, Any]:
    """Keyword arguments of :class:`QDDETR` from an official option set.

    Args:
        opt: ``argparse.Namespace`` or dict of official options (``opt.json`` or the pickled
            ``opt`` of a checkpoint; in the former ``v_feat_dim`` excludes the TEF columns).
        state_dict: when given, the input widths are read from it (the unambiguous source)
            and checked against ``opt``.
    Raises:
        ValueError: for options the official code cannot run (``pre_norm``, ``span_loss_type
            ce``, a position embedding other than sine) or widths contradicting the weights.
    """
    o = dict(vars(opt)) if isinstance(opt, argparse.Namespace) else dict(opt)
    if o.get("pre_norm"):
        raise ValueError("pre_norm=True is not supported: the official T2V pre-norm path only "
                         "works for exactly 75 clips")
    if _opt_get(o, "position_embedding", "sine") not in ("sine", "v2"):
        raise ValueError(f"position_embedding '{o['position_embedding']}' is not supported "
                         "(the official build only accepts 'sine')")
    aud_dim = int(o.get("a_feat_dim") or 0) if o.get("a_feat_dir") is not None else 0
    txt_dim, vid_dim = o.get("t_feat_dim"), o.get("v_feat_dim")
    if state_dict is not None:
        sd_txt = int(state_dict["input_txt_proj.0.LayerNorm.weight"].shape[0])
        sd_vid = int(state_dict["input_vid_proj.0.LayerNorm.weight"].shape[0]) - aud_dim
        if txt_dim is not None and int(txt_dim) != sd_txt:
            raise ValueError(f"opt.t_feat_dim={txt_dim} but the weights expect {sd_txt}")
        if vid_dim is not None and int(vid_dim) != sd_vid:
            tef_hint = (" (opt.json stores v_feat_dim before the +2 TEF columns)"
                        if int(vid_dim) + 2 == sd_vid else "")
            if not tef_hint:
                raise ValueError(f"opt.v_feat_dim={vid_dim} but the weights expect {sd_vid}")
            logger.info("v_feat_dim %s + 2 TEF = %s%s", vid_dim, sd_vid, tef_hint)
        txt_dim, vid_dim = sd_txt, sd_vid
    if txt_dim is None or vid_dim is None:
        raise ValueError("the options do not give t_feat_dim/v_feat_dim and no weights were given")
    return dict(
        txt_dim=int(txt_dim), vid_dim=int(vid_dim), aud_dim=aud_dim,
        hidden_dim=int(_opt_get(o, "hidden_dim", 256)), nheads=int(_opt_get(o, "nheads", 8)),
        enc_layers=int(_opt_get(o, "enc_layers", 2)), dec_layers=int(_opt_get(o, "dec_layers", 2)),
        dim_feedforward=int(_opt_get(o, "dim_feedforward", 1024)),
        num_queries=int(_opt_get(o, "num_queries", 10)),
        dropout=float(_opt_get(o, "dropout", 0.1)),
        input_dropout=float(_opt_get(o, "input_dropout", 0.5)),
        n_input_proj=int(_opt_get(o, "n_input_proj", 2)),
        use_txt_pos=bool(o.get("use_txt_pos", False)),
        max_q_l=int(_opt_get(o, "max_q_l", 32)), max_v_l=int(_opt_get(o, "max_v_l", 75)),
        aux_loss=bool(_opt_get(o, "aux_loss", True)),
        span_loss_type=str(_opt_get(o, "span_loss_type", "l1")),
        contrastive_align_loss=bool(o.get("contrastive_align_loss", False)),
        contrastive_hdim=int(_opt_get(o, "contrastive_hdim", 64)),
    )


def load_qd_detr_checkpoint(path: str, map_location: Any = "cpu", *,
                            t2v_mask_mode: str = "official", trusted: bool = False,
                            opt: Any = None) -> QDDETR:
    """Build and load an official QD-DETR checkpoint, strictly, in eval mode.

    Args:
        path: ``model_best.ckpt``-style file (a dict with ``model`` and ``opt``) or a bare
            state dict with an ``opt.json`` beside it.
        map_location: passed to ``torch.load``.
        t2v_mask_mode: ``"official"`` (default; bit-compatible batch-mixing mask) or
            ``"correct"`` (batch-independent; identical at batch size 1).
        trusted: allow full unpickling if the file holds more than tensors and a Namespace.
        opt: options to use instead of the ones stored in the file.
    Returns:
        :class:`QDDETR` in eval mode.
    Raises:
        CheckpointMismatchError: listing missing/unexpected keys when weights and options
            disagree.
    """
    ckpt = torch_load(path, map_location=map_location, trusted=trusted)
    if isinstance(ckpt, Mapping) and "model" in ckpt and isinstance(ckpt["model"], Mapping):
        state_dict = ckpt["model"]
        opt = opt if opt is not None else ckpt.get("opt")
    elif isinstance(ckpt, Mapping) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state_dict = ckpt
    else:
        raise ValueError(f"{path}: not a QD-DETR checkpoint (expected a dict with 'model')")
    if opt is None:
        opt_json = os.path.join(os.path.dirname(os.path.abspath(path)), "opt.json")
        if not os.path.isfile(opt_json):
            raise ValueError(f"{path}: no 'opt' in the checkpoint and no opt.json beside it")
        with open(opt_json, "r", encoding="utf-8") as f:
            opt = json.load(f)
    kwargs = qd_detr_kwargs_from_opt(opt, state_dict)
    model = QDDETR(**kwargs, t2v_mask_mode=t2v_mask_mode, neg_sampling="roll")
    load_state_strict(model, state_dict, source=path)
    return model.eval()


# ---------------------------------------------------------------------- our checkpoints
def save_grounder_checkpoint(module: nn.Module, path: str, *, arch: str,
                             config: Mapping[str, Any], exclude_prefixes: Iterable[str] = (),
                             extra: Optional[Mapping[str, Any]] = None) -> str:
    """Atomically save ``{"format", "version", "arch", "model", "config", **extra}``.

    Args:
        module: the model (its ``state_dict`` minus ``exclude_prefixes`` is stored).
        arch: registry name (e.g. ``c2f_qd_detr``).
        config: the resolved model config (plain JSON-like values).
        exclude_prefixes: state-dict key prefixes not to store (frozen towers).
        extra: more entries (epoch, metrics ...).
    Returns:
        ``path``.
    """
    prefixes = tuple(exclude_prefixes)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()
             if not (prefixes and k.startswith(prefixes))}
    payload: Dict[str, Any] = {"format": FORMAT, "version": VERSION, "arch": arch,
                               "model": state, "config": dict(config)}
    if extra:
        payload.update(dict(extra))
    save_checkpoint(payload, path)
    return path


def read_checkpoint(path: str, map_location: Any = "cpu", trusted: bool = False
                    ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]], str]:
    """Read a grounder checkpoint of any supported layout.

    Returns:
        ``(state_dict, model_config or None, kind)`` with kind ``"ours"`` (our format or a
        LAVIS runner checkpoint with a ``config``), ``"official"`` (official QD-DETR: the
        returned config is None, use :func:`load_qd_detr_checkpoint`) or ``"state_dict"``.
    """
    ckpt = torch_load(path, map_location=map_location, trusted=trusted)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: unsupported checkpoint content {type(ckpt).__name__}")
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        state = dict(ckpt["model"])
        if "opt" in ckpt:
            return state, None, "official"
        config = ckpt.get("config")
        if isinstance(config, Mapping):
            config = dict(config)
            if isinstance(config.get("model"), Mapping):  # a full LAVIS run config
                config = dict(config["model"])
            return state, config, "ours"
        return state, None, "state_dict"
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt), None, "state_dict"
    raise ValueError(f"{path}: no 'model' state dict found")


# ---------------------------------------------------------------------- any grounder checkpoint
GROUNDER_ARCHS = ("c2f_qd_detr", "c2f_mesm_qd_detr")


def load_grounder(checkpoint: str, model_cfg: Any = None, device: Any = "cpu", trusted: bool = False
                  ) -> Tuple[nn.Module, PostProcessConfig]:
    """A stage-2 grounder in eval mode from a checkpoint of any supported kind: ours / the
    runner's (config stored with the weights; rebuilt by the registered wrapper's
    ``from_checkpoint``), an official QD-DETR one (:func:`load_qd_detr_checkpoint`; user videos
    have any length, so windows are clamped to the duration, not the official 150 s, and
    duplicates are removed by NMS), or a bare state dict with ``model_cfg`` (a model YAML or
    mapping, :func:`~lavis_c2f.models.checkpoint.model_node`).

    Returns:
        ``(model, postprocess settings)``.
    """
    path = os.fspath(checkpoint)
    _state, config, kind = read_checkpoint(path, trusted=trusted)
    if kind == "official":
        return load_qd_detr_checkpoint(path, trusted=trusted).to(device).eval(), PostProcessConfig(nms_threshold=0.7)
    if model_cfg is not None:
        node = model_node(model_cfg, "grounder_cfg")
        arch = node.get("arch", "c2f_qd_detr")
    elif kind == "ours":
        node = None
        arch = config.get("arch") or "c2f_qd_detr"
    else:
        raise ConfigError(f"{path}: a bare state dict without a model config; pass grounder_cfg (the model YAML)")
    if arch not in GROUNDER_ARCHS:
        raise ConfigError(f"{path}: arch '{arch}' is not a stage-2 grounder (expected one of {GROUNDER_ARCHS})")
    cls = get("model", arch)          # the registered wrapper (lavis_models imports this module)
    if node is None:
        model = cls.from_checkpoint(path, trusted=trusted)
    else:
        model = cls.from_config(node)
        model.load_checkpoint(path, strict=True, trusted=trusted)
    return model.to(device).eval(), model.postprocess
