"""Checkpoint I/O of the grounder.

* :func:`load_qd_detr_checkpoint` reads an **official** QD-DETR checkpoint
  (``{"model": state_dict, "opt": argparse.Namespace, "optimizer", "lr_scheduler", "epoch"}``
  as written by ``qd_detr/train.py``), builds :class:`QDDETR` from ``opt`` (layer counts,
  feature widths incl. TEF / audio, ``use_txt_pos``, ``n_input_proj`` ...) and loads the
  weights strictly.
* :func:`load_mesm_checkpoint` reads an **official** MESM checkpoint (same file layout as
  QD-DETR's, written by MESM's ``train.py`` without the frozen CLIP text tower), builds
  :class:`~.mesm.MESMQDDETR` from ``opt`` and loads the mapped weights strictly.
* :func:`grounder_checkpoint_kind` tells which of these layouts a file holds.
* :func:`save_grounder_checkpoint` / :func:`read_checkpoint` handle **our** checkpoints
  ``{"format", "version", "arch", "model", "config", ...}``; the resolved model config is
  stored with the weights. Files written by the LAVIS runner
  (``{"model", "optimizer", "config": <full run config>, "epoch", ...}``) are read too.
* :func:`load_grounder` gives a ready grounder from a checkpoint of any of these kinds.
* :func:`checkpoint_feature_streams` reads the order of the video feature streams a
  checkpoint was trained on.

Reading files and the strict-load rule are :mod:`lavis_c2f.models.checkpoint`'s
(:func:`~lavis_c2f.models.checkpoint.torch_load`, :func:`~lavis_c2f.models.checkpoint.load_state_strict`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.checkpoint import load_state_strict, model_node, save_checkpoint, torch_load
from lavis_c2f.models.grounder.mesm import MESMQDDETR
from lavis_c2f.models.grounder.model import QDDETR
from lavis_c2f.models.grounder.postprocess import PostProcessConfig
from lavis_c2f.ops.linear import set_linear_kernel
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
                            opt: Any = None, linear_kernel: str = "onednn") -> QDDETR:
    """Build and load an official QD-DETR checkpoint, strictly, in eval mode.

    Args:
        path: ``model_best.ckpt``-style file (a dict with ``model`` and ``opt``) or a bare
            state dict with an ``opt.json`` beside it.
        map_location: passed to ``torch.load``.
        t2v_mask_mode: ``"official"`` (default; bit-compatible batch-mixing mask) or
            ``"correct"`` (batch-independent; identical at batch size 1).
        trusted: allow full unpickling if the file holds more than tensors and a Namespace.
        opt: options to use instead of the ones stored in the file.
        linear_kernel: kernel of the float32 CPU products (:mod:`lavis_c2f.ops.linear`).
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
    set_linear_kernel(model, linear_kernel)
    return model.eval()


# ---------------------------------------------------------------------- official MESM
# official MESM state-dict prefixes -> ours (first match wins; the rest is identical)
MESM_KEY_MAP: Tuple[Tuple[str, str], ...] = (
    ("enhance_encoder.t2v_encoder.", "enhance_encoder."),
    ("t2v_encoder.t2v_encoder.", "transformer.t2v_encoder."),
    ("ss_reconstructor.recon_trans.", "ss_reconstructor."),
    ("ss_reconstructor.masked_sent_token", "ss_mask_token"),
    ("ss_reconstructor.output_sent_proj.", "ss_output_sent_proj."),
    ("masked_token", "fw_mask_token"),
    ("unknown_token", "fw_unknown_token"),
)
# every official MESM state dict has these keys (its T2V aligner); QD-DETR's is inside
# ``transformer``
_MESM_MARKER = "t2v_encoder.t2v_encoder."


def map_mesm_state_dict(state_dict: Mapping[str, torch.Tensor], rec_fw: bool = True
                        ) -> Dict[str, torch.Tensor]:
    """Official MESM keys -> :class:`~.mesm.MESMQDDETR` keys (:data:`MESM_KEY_MAP`).

    With ``rec_fw=False`` the official model still builds (and saves) its enhancement
    encoder but never runs it; those ``enhance_encoder.*`` weights are dropped.
    """
    kept = {k: v for k, v in state_dict.items()
            if rec_fw or not k.startswith("enhance_encoder.")}
    return _rename_prefixes(kept, MESM_KEY_MAP)


def mesm_state_dict_to_official(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """:class:`~.mesm.MESMQDDETR` keys -> the official MESM layout (the inverse of
    :func:`map_mesm_state_dict`), e.g. to hand our weights to MESM's own code."""
    return _rename_prefixes(state_dict, tuple((ours, theirs) for theirs, ours in MESM_KEY_MAP))


def _rename_prefixes(state_dict: Mapping[str, torch.Tensor],
                     pairs: Tuple[Tuple[str, str], ...]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for old, new in pairs:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def _opt_dict(opt: Any) -> Dict[str, Any]:
    return dict(vars(opt)) if isinstance(opt, argparse.Namespace) else dict(opt)


def mesm_kwargs_from_opt(opt: Any, state_dict: Optional[Mapping[str, torch.Tensor]] = None
                         ) -> Dict[str, Any]:
    """Keyword arguments of :class:`~.mesm.MESMQDDETR` from an official MESM option set.

    Every size comes from ``opt`` (hidden size, heads, the five layer counts, queries,
    vocabulary, ``max_words_l``) and the input widths from the weights when given (``opt.json``
    stores ``v_feat_dim`` before the 2 TEF columns). The model is the official one: batch-mixing
    T2V mask, key-masked global token, negatives from another group, word classes
    ``vocab_size + 3`` for the CLIP tokenizer and ``+ 1`` for GloVe, the group video of SS-MESM
    concatenated for QVHighlights (``dataset_name``) and the query's own video otherwise.

    Raises:
        ValueError: for options the official code cannot run (``pre_norm``, ``span_loss_type
            ce``, a position embedding other than sine) or widths contradicting the weights.
    """
    o = _opt_dict(opt)
    base = qd_detr_kwargs_from_opt({**o, "max_v_l": o.get("max_video_l"), "a_feat_dir": None},
                                   state_dict)
    rec_fw, rec_ss = bool(o.get("rec_fw", False)), bool(o.get("rec_ss", False))
    vocab_size = int(_opt_get(o, "vocab_size", 1111))
    tokenizer = str(_opt_get(o, "tokenizer_type", "CLIP"))
    max_words_l = int(_opt_get(o, "max_words_l", 32))
    base.update(
        t2v_layers=int(_opt_get(o, "t2v_layers", 2)),
        max_q_l=max_words_l + 1 if rec_ss else max_words_l,
        rec_fw=rec_fw, rec_ss=rec_ss,
        num_recfw_layers=int(_opt_get(o, "num_recfw_layers", 2)),
        num_recss_layers=int(_opt_get(o, "num_recss_layers", 4)),
        fw_share_ffn=bool(o.get("share_MLP", False)),
        vocab_size=vocab_size,
        num_word_classes=vocab_size + (3 if tokenizer == "CLIP" else 1),
        ss_group_video="concat" if o.get("dataset_name") == "qvhighlights" else "own",
        t2v_mask_mode="official", neg_sampling="other_video", global_token_masked=True)
    base.pop("contrastive_align_loss", None)
    base.pop("contrastive_hdim", None)
    if state_dict is not None and rec_fw and "output_txt_proj.1.weight" in state_dict:
        n_cls = int(state_dict["output_txt_proj.1.weight"].shape[0])
        if n_cls != base["num_word_classes"]:
            raise ValueError(f"opt.vocab_size={vocab_size} with tokenizer_type {tokenizer} gives "
                             f"{base['num_word_classes']} word classes but the weights have {n_cls}")
    return base


def grounder_checkpoint_kind(ckpt: Any) -> str:
    """Which layout a loaded grounder checkpoint has.

    Args:
        ckpt: the object ``torch.load`` returned.
    Returns:
        ``"official_mesm"`` / ``"official_qd_detr"`` (a dict with ``model`` and ``opt``, told
        apart by MESM's top-level ``t2v_encoder.t2v_encoder.*`` keys), ``"ours"`` (a
        ``config`` stored with the weights: our format or a LAVIS runner's) or
        ``"state_dict"`` (bare weights).
    Raises:
        ValueError: for anything else.
    """
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"unsupported checkpoint content {type(ckpt).__name__}")
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        if "opt" in ckpt:
            is_mesm = any(str(k).startswith(_MESM_MARKER) for k in ckpt["model"])
            return "official_mesm" if is_mesm else "official_qd_detr"
        return "ours" if isinstance(ckpt.get("config"), Mapping) else "state_dict"
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return "state_dict"
    raise ValueError("no 'model' state dict found")


def load_mesm_checkpoint(path: str, map_location: Any = "cpu", *, trusted: bool = False,
                         opt: Any = None, linear_kernel: str = "onednn") -> MESMQDDETR:
    """Build and load an official MESM checkpoint, strictly, in eval mode.

    Args:
        path: ``model_val_best.ckpt``-style file (``{"model", "optimizer", "lr_scheduler",
            "epoch", "opt"}``; the frozen CLIP text tower is not in it: the returned model
            consumes the tower's word features, ``src_txt``).
        map_location: passed to ``torch.load``.
        trusted: allow full unpickling if the file holds more than tensors and a Namespace.
        opt: options to use instead of the ones stored in the file.
        linear_kernel: kernel of the float32 CPU products (:mod:`lavis_c2f.ops.linear`).
    Returns:
        :class:`~.mesm.MESMQDDETR` in eval mode (official T2V mask).
    Raises:
        CheckpointMismatchError: listing missing/unexpected/mis-shaped keys.
        ValueError: not a MESM checkpoint, or options the official code cannot run.
    """
    ckpt = torch_load(path, map_location=map_location, trusted=trusted)
    try:
        kind = grounder_checkpoint_kind(ckpt)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if kind != "official_mesm":
        raise ValueError(f"{path}: not an official MESM checkpoint (found: {kind}); expected a "
                         "dict with 'model' (holding t2v_encoder.t2v_encoder.* keys) and 'opt'")
    opt = ckpt["opt"] if opt is None else opt
    kwargs = mesm_kwargs_from_opt(opt, ckpt["model"])
    model = MESMQDDETR(**kwargs)
    load_state_strict(model, map_mesm_state_dict(ckpt["model"], kwargs["rec_fw"]), source=path)
    set_linear_kernel(model, linear_kernel)
    return model.eval()


def load_official_grounder(path: str, map_location: Any = "cpu", *, trusted: bool = False
                           ) -> QDDETR:
    """An official QD-DETR or MESM checkpoint, routed by :func:`grounder_checkpoint_kind` to
    :func:`load_qd_detr_checkpoint` / :func:`load_mesm_checkpoint` (eval mode)."""
    kind = grounder_checkpoint_kind(torch_load(path, map_location=map_location, trusted=trusted))
    if kind == "official_mesm":
        return load_mesm_checkpoint(path, map_location, trusted=trusted)
    if kind == "official_qd_detr":
        return load_qd_detr_checkpoint(path, map_location, trusted=trusted)
    raise ValueError(f"{path}: not an official QD-DETR or MESM checkpoint (found: {kind})")


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
        ``(state_dict, model_config or None, kind)`` with kind from
        :func:`grounder_checkpoint_kind`: ``"ours"`` (our format or a LAVIS runner checkpoint
        with a ``config``), ``"official_qd_detr"`` / ``"official_mesm"`` (the returned
        config is None, see :func:`load_qd_detr_checkpoint` / :func:`load_mesm_checkpoint`;
        MESM keys are returned mapped to ours) or ``"state_dict"``.
    """
    ckpt = torch_load(path, map_location=map_location, trusted=trusted)
    try:
        kind = grounder_checkpoint_kind(ckpt)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if kind == "state_dict" and "model" not in ckpt:
        return dict(ckpt), None, kind
    state = dict(ckpt["model"])
    if kind == "official_mesm":
        rec_fw = bool(_opt_dict(ckpt["opt"]).get("rec_fw", False))
        return map_mesm_state_dict(state, rec_fw), None, kind
    if kind == "ours":
        config = dict(ckpt["config"])
        if isinstance(config.get("model"), Mapping):  # a full LAVIS run config
            config = dict(config["model"])
        return state, config, kind
    return state, None, kind


# ---------------------------------------------------------------------- feature streams
def _recorded_feature_paths(ckpt: Mapping[str, Any]) -> Optional[List[str]]:
    """Feature stream paths a checkpoint records, in input-column order (None: none)."""
    opt = ckpt.get("opt")
    if opt is not None:
        o = dict(vars(opt)) if isinstance(opt, argparse.Namespace) else dict(opt) if isinstance(opt, Mapping) else {}
        for key in ("v_feat_dirs", "feat_files"):  # official QD-DETR / Moment-DETR; official MESM
            if o.get(key):
                return [str(p) for p in o[key]]
        return None
    config = ckpt.get("config")
    if isinstance(config, Mapping) and isinstance(config.get("datasets"), Mapping):  # a runner checkpoint
        for ds in config["datasets"].values():
            streams = ds.get("video_features") if isinstance(ds, Mapping) else None
            if streams:
                return [str(s.get("path", "")) if isinstance(s, Mapping) else str(s) for s in streams]
    return None


def checkpoint_feature_streams(path: str, names: Iterable[str], trusted: bool = False) -> Optional[List[str]]:
    """The video feature streams a grounder checkpoint was trained on, in its input order, as
    names among ``names`` (e.g. ``["slowfast", "clip"]``).

    The order is read from the feature paths the checkpoint records: official QD-DETR /
    Moment-DETR ``opt.v_feat_dirs`` (``slowfast_features`` then ``clip_features``), official
    MESM ``opt.feat_files`` (``clip_image.hdf5`` then ``slowfast.hdf5``), a runner checkpoint's
    dataset ``video_features``. A path is named by the name its last component contains (else
    the whole path). Returns None when the checkpoint records no paths; raises ``ValueError``
    when a path matches none of ``names`` (the message lists them).
    """
    ckpt = torch_load(path, trusted=trusted)
    paths = _recorded_feature_paths(ckpt) if isinstance(ckpt, Mapping) else None
    if not paths:
        return None
    names = sorted(set(names), key=lambda n: -len(n))
    out = []
    for p in paths:
        base = os.path.basename(p.rstrip("/\\")).lower()
        hit = next((n for n in names if n.lower() in base), None) or next((n for n in names if n.lower() in p.lower()),
                                                                         None)
        if hit is None:
            raise ValueError(f"{path}: the grounder was trained on the feature stream {p!r}, which is none of the "
                             f"index's streams {sorted(names)}")
        out.append(hit)
    return out


# ---------------------------------------------------------------------- any grounder checkpoint
GROUNDER_ARCHS = ("c2f_qd_detr", "c2f_mesm_qd_detr")


def load_grounder(checkpoint: str, model_cfg: Any = None, device: Any = "cpu", trusted: bool = False
                  ) -> Tuple[nn.Module, PostProcessConfig]:
    """A stage-2 grounder in eval mode from a checkpoint of any supported kind: ours / the
    runner's (config stored with the weights; rebuilt by the registered wrapper's
    ``from_checkpoint``), an official QD-DETR or MESM one (told apart by
    :func:`grounder_checkpoint_kind`, built by :func:`load_official_grounder`; user videos
    have any length, so windows are clamped to the duration, not the official 150 s, and
    duplicates are removed by NMS), or a bare state dict with ``model_cfg`` (a model YAML or
    mapping, :func:`~lavis_c2f.models.checkpoint.model_node`).

    Returns:
        ``(model, postprocess settings)``.
    """
    path = os.fspath(checkpoint)
    _state, config, kind = read_checkpoint(path, trusted=trusted)
    if kind.startswith("official_"):
        detr = load_official_grounder(path, trusted=trusted)
        return detr.to(device).eval(), PostProcessConfig(nms_threshold=0.7)
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
