"""Typed config schemas of the registered grounder models.

``from_config`` reads a LAVIS ``model:`` node only through :func:`resolve_config`, which
rejects unknown keys (the package's one check, :func:`lavis_c2f.data.cfg.check_keys`: a
:class:`~lavis_c2f.common.errors.ConfigError` naming the key and a close match), checks types
and fills defaults. LAVIS's own keys (``arch``, ``model_type``, ``load_finetuned``,
``load_pretrained``, ``pretrained``, ``finetuned``) are accepted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import LAVIS_KEYS, check_keys, to_plain as plain

REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """One config key: ``kind`` in {int, float, bool, str, mapping}; ``optional`` allows null."""

    kind: str
    default: Any = REQUIRED
    optional: bool = False
    choices: Optional[Tuple[Any, ...]] = None
    doc: str = ""


QD_DETR_FIELDS: Dict[str, Field] = {
    # input widths come from the dataset's feature config
    "txt_dim": Field("int", doc="query token feature width"),
    "vid_dim": Field("int", doc="clip feature width incl. the 2 TEF columns when used"),
    "aud_dim": Field("int", 0, doc="audio feature width concatenated to the video (0 = none)"),
    "hidden_dim": Field("int", 256), "nheads": Field("int", 8),
    "enc_layers": Field("int", 2), "t2v_layers": Field("int", None, optional=True),
    "dec_layers": Field("int", 2), "dim_feedforward": Field("int", 1024),
    "num_queries": Field("int", 10), "dropout": Field("float", 0.1),
    "input_dropout": Field("float", 0.5), "n_input_proj": Field("int", 2, choices=(1, 2, 3)),
    "use_txt_pos": Field("bool", False), "max_q_l": Field("int", 32), "max_v_l": Field("int", 75),
    "aux_loss": Field("bool", True), "span_loss_type": Field("str", "l1", choices=("l1",)),
    "contrastive_align_loss": Field("bool", False), "contrastive_hdim": Field("int", 64),
    "t2v_mask_mode": Field("str", "official", choices=("official", "correct"),
                           doc="T2V mask in training (models/grounder/transformer.py)"),
    "eval_t2v_mask_mode": Field("str", "correct", choices=("official", "correct"),
                                doc="T2V mask in predict_batch: correct = batch-independent"),
    "neg_sampling": Field("str", "roll", choices=("roll", "other_video")),
    "global_token_masked": Field("bool", False, doc="key-mask the global token in the encoder "
                                                    "(MESM: true, QD-DETR: false)"),
    "anchor_init": Field("str", "official", choices=("official", "spread"),
                         doc="anchors' (cx, w) logits: official = N(0, 1) from the seed; spread = "
                             "the same law on fixed Halton points (models/grounder/model.py)"),
    "train_neg_pass": Field("bool", True, doc="run the negative-pair pass in training (false: "
                                              "ablation without the negative-pair saliency terms)"),
    "linear_kernel": Field("str", "onednn", choices=("torch", "onednn"),
                           doc="kernel of the float32 CPU products (lavis_c2f/ops/linear.py)"),
    "dropout_kernel": Field("str", "bits", choices=("torch", "bits"),
                            doc="how CPU dropout masks are drawn (lavis_c2f/ops/dropout.py)"),
    # matcher
    "set_cost_class": Field("float", 4.0), "set_cost_span": Field("float", 10.0),
    "set_cost_giou": Field("float", 1.0),
    # losses
    "span_loss_coef": Field("float", 10.0), "giou_loss_coef": Field("float", 1.0),
    "label_loss_coef": Field("float", 4.0), "lw_saliency": Field("float", 1.0),
    "eos_coef": Field("float", 0.1), "saliency_margin": Field("float", 0.2),
    "use_margin_loss": Field("bool", True), "rank_divisor": Field("float", 12.0),
    "contrastive_align_loss_coef": Field("float", 0.0),
    # inference
    "postprocess": Field("mapping", None, optional=True),
}

MESM_FIELDS: Dict[str, Field] = dict(QD_DETR_FIELDS)
MESM_FIELDS.update({
    "txt_dim": Field("int", None, optional=True,
                     doc="query feature width; with a runtime text encoder its hidden size"),
    "neg_sampling": Field("str", "other_video", choices=("roll", "other_video")),
    "global_token_masked": Field("bool", True, doc="key-mask the global token (as MESM)"),
    "rec_fw": Field("bool", True), "rec_ss": Field("bool", True),
    "num_recfw_layers": Field("int", 2), "num_recss_layers": Field("int", 4),
    "fw_share_ffn": Field("bool", True), "vocab_size": Field("int", 5000),
    "num_word_classes": Field("int", None, optional=True,
                              doc="word classes (null: vocab_size + 3, MESM's CLIP tokenizer)"),
    "predict_with_groups": Field("bool", False,
                                 doc="predict_batch groups queries as the batch's 'group' (MESM's "
                                     "evaluation on grouped splits); false: each query alone"),
    "ss_group_video": Field("str", "own", choices=("own", "concat"),
                            doc="video a group's sentences are rebuilt from (MESM QVHighlights: "
                                "concat, Charades-STA/TACoS: own)"),
    "fw_mask_level": Field("str", "features", choices=("features", "tokens"),
                           doc="runtime text tower: mask word features (MESM) or token "
                               "embeddings"),
    "mesm_input_dropout": Field("bool", False,
                                doc="input dropout where MESM draws it (FW tokens projected once "
                                    "per batch, SS group video projected again); false: FW "
                                    "rows replaced then projected, SS reuses the projected video"),
    "fw_word_weights": Field("str", "pos", choices=("pos", "inverse_frequency"),
                             doc="masked-word weights: MESM's part-of-speech weights or inverse "
                                 "token frequency"),
    "pos_tagger": Field("str", None, optional=True,
                        doc="averaged-perceptron tagger data (an nltk_data folder or a tagger "
                            "file/folder); null: nltk's data path, then the textblob-aptagger "
                            "package"),
    "vocab_counts": Field("str", None, optional=True, doc="token-count file (lavis-c2f vocab)"),
    "fw_tokenizer": Field("str", "clip", choices=("clip", "whitespace")),
    "fw_text_special_tokens": Field("bool", True,
                                    doc="precomputed text features include start/end rows"),
    "fw_mask_ratio": Field("float", 1.0 / 3.0), "fw_loss_positions": Field(
        "str", "all", choices=("all", "masked")),
    "fw_label_smoothing": Field("float", 0.1),
    "loss_recfw_coef": Field("float", 0.5), "loss_recss_coef": Field("float", 0.1),
    "iou_gamma": Field("float", 0.9), "recss_tau": Field("float", 0.5),
    "text_encoder": Field("mapping", None, optional=True,
                          doc="{checkpoint | model_dir, max_words_l: 32, normalize: true} or null"),
})

TEXT_ENCODER_FIELDS: Dict[str, Field] = {
    "checkpoint": Field("str", None, optional=True,
                        doc="OpenAI-layout CLIP text tower (MESM's clip_text_encoder.pth)"),
    "model_dir": Field("str", None, optional=True,
                       doc="Hugging Face CLIPTextModel / CLIPModel folder"),
    "max_words_l": Field("int", 32), "normalize": Field("bool", True),
}


def to_plain(cfg: Any) -> Dict[str, Any]:
    """A model config (OmegaConf node or mapping, :func:`lavis_c2f.data.cfg.to_plain`) as a plain
    dict; None gives ``{}``."""
    if cfg is None:
        return {}
    cfg = plain(cfg)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"model config must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def _coerce(where: str, field: Field, value: Any) -> Any:
    if value is None:
        if field.optional:
            return None
        raise ConfigError(f"'{where}' must not be null")
    kind = field.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"'{where}' must be true/false, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"'{where}' must be an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{where}' must be a number, got {value!r}")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"'{where}' must be a string, got {value!r}")
    elif kind == "mapping":
        value = to_plain(value)
    if field.choices is not None and value not in field.choices:
        raise ConfigError(f"'{where}' must be one of {list(field.choices)}, got {value!r}")
    return value


def resolve_config(cfg: Any, fields: Mapping[str, Field], where: str = "model",
                   ignore: Sequence[str] = LAVIS_KEYS) -> Dict[str, Any]:
    """Validated config: every key of ``fields`` with defaults filled in.

    Raises:
        ConfigError: naming an unknown key, a missing required key or a wrongly typed value.
    """
    values = check_keys(cfg, set(fields) | set(ignore), where)
    out: Dict[str, Any] = {}
    for key, field in fields.items():
        if key in values:
            out[key] = _coerce(f"{where}.{key}", field, values[key])
        elif field.default is REQUIRED:
            raise ConfigError(f"missing required key '{where}.{key}' ({field.doc})")
        else:
            out[key] = field.default
    return out
