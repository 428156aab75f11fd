"""LAVIS models of the stage-2 grounder: ``c2f_qd_detr`` and ``c2f_mesm_qd_detr``.

Both consume the "Moment-retrieval batch" of ``docs/ARCHITECTURE.md``:

* ``forward(samples)`` (training) returns ``{"loss": weighted total, "loss_span", "loss_giou",
  "loss_label", "loss_saliency", aux ``loss_*_i`` ...}`` (components detached);
* ``predict_batch(samples)`` returns official prediction rows
  ``{qid, query, vid, pred_relevant_windows: [[st, ed, score], ...], pred_saliency_scores}``
  without the negative pass. It requires eval mode and raises ``RuntimeError`` in training
  mode (dropout would make predictions random).

Checkpoints: :meth:`C2FQDDETR.save_checkpoint` stores the resolved config with the weights;
:meth:`C2FQDDETR.load_checkpoint` loads ours, LAVIS runner checkpoints and official QD-DETR
checkpoints strictly (listing missing/unexpected keys), :meth:`C2FMESMQDDETR.load_checkpoint`
also official MESM ones; :meth:`C2FQDDETR.from_checkpoint` rebuilds the model from a checkpoint
alone (the kind of file is told by :func:`~.checkpoint.grounder_checkpoint_kind`).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional

import torch
from lavis.common.registry import registry

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.base import C2FBaseModel
from lavis_c2f.models.checkpoint import frozen_keys, load_state_strict, torch_load
from lavis_c2f.models.grounder.checkpoint import (mesm_kwargs_from_opt, qd_detr_kwargs_from_opt,
                                                  read_checkpoint, save_grounder_checkpoint)
from lavis_c2f.models.grounder.config_schema import (MESM_FIELDS, QD_DETR_FIELDS,
                                                     TEXT_ENCODER_FIELDS, resolve_config, to_plain)
from lavis_c2f.models.grounder.criterion import SetCriterion
from lavis_c2f.models.grounder.matcher import HungarianMatcher
from lavis_c2f.models.grounder.mesm import (MESMCriterion, MESMQDDETR, gt_clip_mask,
                                            merged_moments)
from lavis_c2f.models.grounder.model import QDDETR, negative_text_index
from lavis_c2f.models.grounder.pos_weights import get_pos_tagger, pos_token_weights
from lavis_c2f.models.grounder.postprocess import PostProcessConfig, postprocess_batch
from lavis_c2f.models.grounder.text_encoder import RuntimeTextEncoder
from lavis_c2f.models.grounder.vocab import ReconstructionVocab, get_tokenizer
from lavis_c2f.ops.dropout import set_dropout_kernel
from lavis_c2f.ops.linear import set_linear_kernel
from lavis_c2f.paths import config_path, resolve_path

logger = logging.getLogger(__name__)

_MODEL_KEYS = ("txt_dim", "vid_dim", "aud_dim", "hidden_dim", "nheads", "enc_layers",
               "t2v_layers", "dec_layers", "dim_feedforward", "num_queries", "dropout",
               "input_dropout", "n_input_proj", "use_txt_pos", "max_q_l", "max_v_l", "aux_loss",
               "span_loss_type", "contrastive_align_loss", "contrastive_hdim", "t2v_mask_mode",
               "neg_sampling", "global_token_masked", "anchor_init")


def _as_list(x: Any) -> List[Any]:
    if torch.is_tensor(x):
        return x.tolist()
    return list(x)


def _criterion_kwargs(c: Mapping[str, Any]) -> Dict[str, Any]:
    if c["contrastive_align_loss_coef"] != 0:
        raise ConfigError("'model.contrastive_align_loss_coef' must be 0: the official "
                          "contrastive-alignment loss is degenerate (its text memory is empty "
                          "after the T2V layers) and is not implemented")
    return dict(matcher=HungarianMatcher(c["set_cost_class"], c["set_cost_span"],
                                         c["set_cost_giou"]),
                span_loss_coef=c["span_loss_coef"], giou_loss_coef=c["giou_loss_coef"],
                label_loss_coef=c["label_loss_coef"], saliency_loss_coef=c["lw_saliency"],
                eos_coef=c["eos_coef"], saliency_margin=c["saliency_margin"],
                use_margin_loss=c["use_margin_loss"], rank_divisor=c["rank_divisor"],
                aux_loss=c["aux_loss"], aux_layers=c["dec_layers"] - 1)


@registry.register_model("c2f_qd_detr")
class C2FQDDETR(C2FBaseModel):
    """QD-DETR grounder as a LAVIS model (see module doc).

    Args:
        detr: the network. criterion: its losses. postprocess: inference settings.
        config: the resolved model config (stored in checkpoints).
    """

    ARCH = "c2f_qd_detr"
    FIELDS = QD_DETR_FIELDS
    PRETRAINED_MODEL_CONFIG_DICT = {
        "default": config_path("models/c2f_qd_detr_qvh_clip.yaml"),
        "qvh_clip": config_path("models/c2f_qd_detr_qvh_clip.yaml"),
        "qvh_clip_slowfast": config_path("models/c2f_qd_detr_qvh_clip_slowfast.yaml"),
        "demo": config_path("models/c2f_qd_detr_demo.yaml"),
    }
    # prefixes of frozen sub-modules whose weights are not stored in our checkpoints
    FROZEN_PREFIXES: tuple = ()
    # the official checkpoint layout this class builds from (checkpoint.grounder_checkpoint_kind)
    OFFICIAL_KIND = "official_qd_detr"

    def __init__(self, *, detr: QDDETR, criterion: SetCriterion, postprocess: PostProcessConfig,
                 config: Mapping[str, Any]):
        super().__init__()
        self.detr = detr
        self.criterion = criterion
        self.postprocess = postprocess
        self.config = dict(config)

    @classmethod
    def default_config_path(cls, model_type: str) -> str:
        """Absolute YAML path of ``model_type`` (LAVIS would join it with its own root)."""
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise ConfigError(f"unknown model_type '{model_type}' for {cls.ARCH}; known: "
                              f"{sorted(cls.PRETRAINED_MODEL_CONFIG_DICT)}")
        return cls.PRETRAINED_MODEL_CONFIG_DICT[model_type]

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg: Any) -> "C2FQDDETR":
        """Build from a LAVIS ``model:`` node (unknown keys raise :class:`ConfigError`).

        ``load_finetuned: true`` + ``finetuned: PATH`` or ``load_pretrained: true`` +
        ``pretrained: PATH`` load that checkpoint (ours or official) strictly.
        """
        raw = to_plain(cfg)
        c = resolve_config(raw, cls.FIELDS)
        model = cls._build(c)
        model._load_from_lavis_keys(raw)
        return model

    @classmethod
    def _build(cls, c: Dict[str, Any]) -> "C2FQDDETR":
        postprocess = PostProcessConfig.from_mapping(c["postprocess"], "model.postprocess")
        try:
            detr = QDDETR(**{k: c[k] for k in _MODEL_KEYS})
        except ValueError as err:
            raise ConfigError(f"invalid model config: {err}") from err
        set_linear_kernel(detr, c["linear_kernel"])
        set_dropout_kernel(detr, c["dropout_kernel"])
        criterion = SetCriterion(**_criterion_kwargs(c))
        return cls(detr=detr, criterion=criterion, postprocess=postprocess,
                   config=dict(c, arch=cls.ARCH))

    def _load_from_lavis_keys(self, raw: Mapping[str, Any]) -> None:
        for flag, key in (("load_finetuned", "finetuned"), ("load_pretrained", "pretrained")):
            if raw.get(flag) and raw.get(key):
                self.load_checkpoint(resolve_path(raw[key]), strict=True)
                return

    @classmethod
    def from_checkpoint(cls, path: str, map_location: Any = "cpu", trusted: bool = False,
                        overrides: Optional[Mapping[str, Any]] = None) -> "C2FQDDETR":
        """Rebuild a model from a checkpoint (ours, a LAVIS runner's, or official) and load it
        strictly. ``overrides`` replace config values (e.g. ``{"postprocess": {...}}``)."""
        state, config, kind = read_checkpoint(path, map_location, trusted)
        if kind == cls.OFFICIAL_KIND:
            config = cls.config_from_official_opt(
                torch_load(path, map_location, trusted)["opt"], state)
        elif kind.startswith("official_"):
            other = "C2FMESMQDDETR" if kind == "official_mesm" else "C2FQDDETR"
            raise ValueError(f"{path}: an {kind} checkpoint; load it with {other}.from_checkpoint "
                             "(or lavis_c2f.models.grounder.load_grounder, which routes by kind)")
        elif config is None:
            raise ValueError(f"{path}: the checkpoint stores no model config; build the model "
                             "from its YAML and call load_checkpoint instead")
        elif config.get("arch", cls.ARCH) != cls.ARCH:
            raise ValueError(f"{path}: a '{config['arch']}' checkpoint, not {cls.ARCH}")
        config = {k: v for k, v in config.items() if k != "arch"}
        config.update(dict(overrides or {}))
        model = cls.from_config(config)
        model.load_checkpoint(path, strict=True, map_location=map_location, trusted=trusted)
        return model

    @classmethod
    def config_from_official_opt(cls, opt: Any, state_dict: Mapping[str, torch.Tensor]
                                 ) -> Dict[str, Any]:
        """Our model config equivalent to an official option set (mask mode ``official``)."""
        o = dict(vars(opt)) if not isinstance(opt, Mapping) else dict(opt)
        cfg = qd_detr_kwargs_from_opt(o, state_dict)
        cfg.update(t2v_mask_mode="official", eval_t2v_mask_mode="official", neg_sampling="roll")
        for ours, theirs in (("set_cost_class", "set_cost_class"),
                             ("set_cost_span", "set_cost_span"),
                             ("set_cost_giou", "set_cost_giou"),
                             ("span_loss_coef", "span_loss_coef"),
                             ("giou_loss_coef", "giou_loss_coef"),
                             ("label_loss_coef", "label_loss_coef"),
                             ("lw_saliency", "lw_saliency"), ("eos_coef", "eos_coef"),
                             ("saliency_margin", "saliency_margin")):
            if o.get(theirs) is not None:
                cfg[ours] = float(o[theirs])
        cfg["postprocess"] = {"max_ts_val": 150.0}
        return cfg

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str, extra: Optional[Mapping[str, Any]] = None) -> str:
        """Atomically save weights + resolved config (frozen towers excluded)."""
        return save_grounder_checkpoint(self, path, arch=self.ARCH, config=self.config,
                                        exclude_prefixes=self.FROZEN_PREFIXES, extra=extra)

    def load_checkpoint(self, url_or_filename: str, strict: bool = True,
                        map_location: Any = "cpu", trusted: bool = False) -> Dict[str, Any]:
        """Load ours / LAVIS-runner / official weights (QD-DETR's, or MESM's into the MESM model).

        Args:
            url_or_filename: a local path (URLs are not fetched).
            strict: raise :class:`~lavis_c2f.common.errors.CheckpointMismatchError` listing missing, unexpected and
                mis-shaped keys; with ``strict=False`` the matching keys are loaded and the
                lists are returned.
        Returns:
            ``{"kind", "missing", "unexpected", "mismatched"}``.
        """
        state, _config, kind = read_checkpoint(url_or_filename, map_location, trusted)
        own_keys = set(self.state_dict())
        if not any(k in own_keys for k in state) and any(f"detr.{k}" in own_keys for k in state):
            state = {f"detr.{k}": v for k, v in state.items()}  # official / bare QDDETR layout
        report = load_state_strict(self, state, source=url_or_filename, strict=strict,
                                   allow_missing=frozen_keys(self, buffers=False),
                                   allow_missing_prefixes=self.FROZEN_PREFIXES)
        return {"kind": kind, **report}

    # ------------------------------------------------------------------ batches
    def _inputs(self, samples: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        dev = self.device
        for key in ("src_vid", "src_vid_mask", "src_txt", "src_txt_mask"):
            if key not in samples:
                raise KeyError(f"batch has no '{key}' (see the Moment-retrieval batch in "
                               "docs/ARCHITECTURE.md)")
        return {k: samples[k].to(dev).float() for k in
                ("src_txt", "src_txt_mask", "src_vid", "src_vid_mask")}

    def _targets(self, samples: Mapping[str, Any]) -> Dict[str, Any]:
        dev = self.device
        if "span_labels" not in samples:
            raise KeyError("training batch has no 'span_labels'")
        targets: Dict[str, Any] = {"span_labels": [torch.as_tensor(s, dtype=torch.float32).reshape(-1, 2).to(dev)
                                                   for s in samples["span_labels"]]}
        for key in ("saliency_pos_labels", "saliency_neg_labels"):
            if samples.get(key) is not None:
                targets[key] = torch.as_tensor(samples[key]).long().to(dev)
        if samples.get("saliency_all_labels") is not None:
            targets["saliency_all_labels"] = torch.as_tensor(samples["saliency_all_labels"]).float().to(dev)
        if samples.get("has_labels") is not None:
            targets["has_labels"] = torch.as_tensor(samples["has_labels"]).bool()
        return targets

    def _neg_index(self, samples: Mapping[str, Any], batch_size: int):
        vids = samples.get("vid")
        return negative_text_index(batch_size, self.detr.neg_sampling,
                                   None if vids is None else list(vids))

    def forward(self, samples: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """Losses of a training batch (see module doc)."""
        x = self._inputs(samples)
        bsz = x["src_vid"].shape[0]
        neg_index, neg_valid = self._neg_index(samples, bsz)
        out = self.detr(**x, compute_neg=self.training and self.config["train_neg_pass"],
                        neg_index=neg_index)
        out["saliency_neg_valid"] = neg_valid.to(self.device)
        losses = self.criterion(out, self._targets(samples))
        return self._loss_dict(losses)

    def _loss_dict(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        total = self.criterion.weighted_total(losses)
        result = {"loss": total}
        result.update({k: (v.detach() if torch.is_tensor(v) else torch.tensor(float(v)))
                       for k, v in losses.items()})
        return result

    @torch.no_grad()
    def predict_batch(self, samples: Mapping[str, Any]) -> List[Dict[str, Any]]:
        """Official prediction rows of a batch (no negative pass). Requires eval mode."""
        if self.training:
            raise RuntimeError(f"{type(self).__name__}.predict_batch needs eval mode: call "
                               "model.eval() first (dropout would randomise predictions)")
        out = self.detr(**self._inputs(samples), compute_neg=False,
                        t2v_mask_mode=self.config["eval_t2v_mask_mode"])
        return self._rows(out, samples)

    def _rows(self, out: Mapping[str, torch.Tensor], samples: Mapping[str, Any]) -> List[Dict[str, Any]]:
        bsz = out["pred_logits"].shape[0]
        durations = _as_list(samples["duration"])
        clip_lengths = _as_list(samples["clip_length"])
        return postprocess_batch(
            out, qids=_as_list(samples.get("qid", [None] * bsz)),
            queries=_as_list(samples.get("query", [""] * bsz)),
            vids=_as_list(samples.get("vid", [None] * bsz)), durations=durations,
            clip_lengths=clip_lengths, config=self.postprocess)


@registry.register_model("c2f_mesm_qd_detr")
class C2FMESMQDDETR(C2FQDDETR):
    """MESM on top of QD-DETR (see :mod:`.mesm`), every part switchable in YAML.

    Extra config: ``rec_fw``, ``rec_ss``, ``num_recfw_layers``, ``num_recss_layers``,
    ``fw_share_ffn``, ``vocab_size``, ``num_word_classes``, ``vocab_counts`` (ours or MESM's
    ``*_tokenized_count.txt``; needed to *train* with ``rec_fw``; inference and checkpoint
    loading work without it), ``fw_tokenizer``, ``fw_text_special_tokens``, ``fw_mask_ratio``,
    ``fw_word_weights`` (``pos``: MESM's; ``inverse_frequency``), ``pos_tagger``,
    ``fw_mask_level``, ``mesm_input_dropout``, ``fw_loss_positions``, ``fw_label_smoothing``,
    ``loss_recfw_coef``, ``loss_recss_coef``, ``iou_gamma``, ``recss_tau``, ``ss_group_video``,
    ``global_token_masked``, ``predict_with_groups``, ``text_encoder`` ({checkpoint: MESM's
    clip_text_encoder.pth | model_dir: a Hugging Face folder, max_words_l, normalize} for the
    runtime CLIP text tower; null = precomputed token features). Batches may carry ``group``
    (MESM's grouped items: SS groups and negatives) and ``clip_mask`` (MESM's GT clips).

    Token alignment (precomputed features): the query is tokenised with ``fw_tokenizer``
    (with start/end tokens when ``fw_text_special_tokens``); token i is taken to be feature
    row i. When the query has fewer tokens than valid feature rows the sample is left out of
    the word-reconstruction loss (``fw_aligned_frac`` in the outputs reports the share kept);
    a longer token list is cut to the feature length (the features were truncated).
    """

    ARCH = "c2f_mesm_qd_detr"
    FIELDS = MESM_FIELDS
    PRETRAINED_MODEL_CONFIG_DICT = {
        "default": config_path("models/c2f_mesm_qd_detr_qvh_clip.yaml"),
        "qvh_clip": config_path("models/c2f_mesm_qd_detr_qvh_clip.yaml"),
        "qvh_clip_slowfast": config_path("models/c2f_mesm_qd_detr_qvh_clip_slowfast.yaml"),
        "demo": config_path("models/c2f_mesm_qd_detr_demo.yaml"),
    }
    FROZEN_PREFIXES = ("detr.text_encoder.",)
    OFFICIAL_KIND = "official_mesm"

    def __init__(self, *, vocab: Optional[ReconstructionVocab] = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.vocab = vocab
        self.detr: MESMQDDETR
        self._fw_cache: Dict[Any, Any] = {}

    @classmethod
    def config_from_official_opt(cls, opt: Any, state_dict: Mapping[str, torch.Tensor]
                                 ) -> Dict[str, Any]:
        """Our model config equivalent to an official MESM option set (``state_dict`` in our
        key names, as :func:`~.checkpoint.read_checkpoint` returns it)."""
        o = dict(vars(opt)) if not isinstance(opt, Mapping) else dict(opt)
        cfg = mesm_kwargs_from_opt(o, state_dict)  # the widths' keys are the same in both
        for ours, theirs in (("set_cost_class", "set_cost_class"),
                             ("set_cost_span", "set_cost_span"),
                             ("set_cost_giou", "set_cost_giou"),
                             ("span_loss_coef", "loss_span_coef"),
                             ("giou_loss_coef", "loss_giou_coef"),
                             ("label_loss_coef", "loss_label_coef"),
                             ("lw_saliency", "loss_saliency_coef"), ("eos_coef", "eos_coef"),
                             ("saliency_margin", "saliency_margin"),
                             ("rank_divisor", "rank_coef"),
                             ("loss_recfw_coef", "loss_recfw_coef"),
                             ("loss_recss_coef", "loss_recss_coef"),
                             ("iou_gamma", "iou_gamma"), ("recss_tau", "recss_tau")):
            if o.get(theirs) is not None:
                cfg[ours] = float(o[theirs])
        cfg["use_margin_loss"] = bool(o.get("use_triplet", False))
        cfg["eval_t2v_mask_mode"] = "official"
        cfg["fw_tokenizer"] = "clip" if o.get("tokenizer_type", "CLIP") == "CLIP" else "whitespace"
        cfg["postprocess"] = {"max_ts_val": float(o.get("max_ts_val") or 150.0)}
        return cfg

    @classmethod
    def _build(cls, c: Dict[str, Any]) -> "C2FMESMQDDETR":
        postprocess = PostProcessConfig.from_mapping(c["postprocess"], "model.postprocess")
        text_encoder = None
        if c["text_encoder"] is not None:
            te = resolve_config(c["text_encoder"], TEXT_ENCODER_FIELDS, "model.text_encoder",
                                ignore=())
            c["text_encoder"] = te
            if (te["checkpoint"] is None) == (te["model_dir"] is None):
                raise ConfigError("'model.text_encoder' needs exactly one of 'checkpoint' (an "
                                  "OpenAI-layout clip_text_encoder.pth) and 'model_dir' (a "
                                  "Hugging Face CLIP folder)")
            try:
                text_encoder = RuntimeTextEncoder(
                    None if te["model_dir"] is None else resolve_path(te["model_dir"]),
                    te["max_words_l"], te["normalize"],
                    checkpoint=None if te["checkpoint"] is None else resolve_path(te["checkpoint"]))
            except (OSError, ValueError) as err:
                raise ConfigError(f"'model.text_encoder': {err}") from err
            if c["txt_dim"] is None:
                c["txt_dim"] = text_encoder.hidden_size
            elif c["txt_dim"] != text_encoder.hidden_size:
                raise ConfigError(f"'model.txt_dim' {c['txt_dim']} != the text encoder's hidden "
                                  f"size {text_encoder.hidden_size}")
            if c["fw_tokenizer"] != "clip":
                raise ConfigError("'model.fw_tokenizer' must be 'clip' with a runtime CLIP text "
                                  "encoder")
        elif c["txt_dim"] is None:
            raise ConfigError("missing required key 'model.txt_dim' (query token feature width)")
        vocab = None
        if c["rec_fw"] and c["vocab_counts"]:
            try:
                vocab = ReconstructionVocab.from_counts_file(
                    resolve_path(c["vocab_counts"]), c["vocab_size"], c["fw_tokenizer"])
            except FileNotFoundError as err:
                raise ConfigError(f"'model.vocab_counts': {err}") from err
        kwargs = {k: c[k] for k in _MODEL_KEYS}
        try:
            detr = MESMQDDETR(rec_fw=c["rec_fw"], rec_ss=c["rec_ss"],
                              num_recfw_layers=c["num_recfw_layers"],
                              num_recss_layers=c["num_recss_layers"],
                              fw_share_ffn=c["fw_share_ffn"], vocab_size=c["vocab_size"],
                              num_word_classes=c["num_word_classes"],
                              fw_mask_ratio=c["fw_mask_ratio"],
                              ss_group_video=c["ss_group_video"],
                              fw_mask_level=c["fw_mask_level"],
                              mesm_input_dropout=c["mesm_input_dropout"],
                              text_encoder=text_encoder,
                              **kwargs)
            criterion = MESMCriterion(recfw_coef=c["loss_recfw_coef"],
                                      recss_coef=c["loss_recss_coef"], iou_gamma=c["iou_gamma"],
                                      recss_tau=c["recss_tau"],
                                      fw_label_smoothing=c["fw_label_smoothing"],
                                      fw_loss_positions=c["fw_loss_positions"],
                                      **_criterion_kwargs(c))
        except ValueError as err:
            raise ConfigError(f"invalid model config: {err}") from err
        set_linear_kernel(detr, c["linear_kernel"])
        set_dropout_kernel(detr, c["dropout_kernel"])
        return cls(detr=detr, criterion=criterion, postprocess=postprocess,
                   config=dict(c, arch=cls.ARCH), vocab=vocab)

    # ------------------------------------------------------------------ text
    def _text(self, samples: Mapping[str, Any]) -> Dict[str, Any]:
        """Text inputs: runtime token ids or precomputed features, plus token lists."""
        if self.detr.text_encoder is not None:
            if "query" not in samples:
                raise KeyError("a model with a runtime text encoder needs the batch's 'query'")
            ids, mask, tokens = self.detr.text_encoder.tokenize(list(samples["query"]))
            return {"src_txt": None, "src_txt_mask": mask.to(self.device),
                    "txt_ids": ids.to(self.device), "tokens": tokens}
        x = {"src_txt": samples["src_txt"].to(self.device).float(),
             "src_txt_mask": samples["src_txt_mask"].to(self.device).float(),
             "txt_ids": None, "tokens": None}
        return x

    #: queries whose word-reconstruction targets are kept (:meth:`_fw_sample`)
    FW_CACHE_SIZE = 1 << 16

    def _fw_targets(self, samples: Mapping[str, Any], text: Dict[str, Any], length: int):
        """(labels (B, Lt) with -100 = none, mask weights (B, Lt), unknown (B, Lt) bool,
        aligned (B,) bool)."""
        bsz = text["src_txt_mask"].shape[0]
        labels = torch.full((bsz, length), -100, dtype=torch.long)
        weights = torch.zeros(bsz, length)
        unknown = torch.zeros(bsz, length, dtype=torch.bool)
        aligned = torch.zeros(bsz, dtype=torch.bool)
        n_valid = text["src_txt_mask"].sum(1).long().tolist()
        queries = list(samples.get("query", []))
        for i in range(bsz):
            tokens = None if text["tokens"] is None else tuple(text["tokens"][i])
            if tokens is None and not queries:
                raise KeyError("word reconstruction needs the batch's 'query' texts")
            target = self._fw_sample(queries[i] if queries else None, tokens, n_valid[i])
            if target is None:
                continue
            lab, w, unk = target
            labels[i, :len(lab)] = torch.tensor(lab)
            weights[i, :len(w)] = torch.tensor(w)
            unknown[i, :len(unk)] = torch.tensor(unk, dtype=torch.bool)
            aligned[i] = True
        return labels, weights, unknown, aligned

    def _fw_sample(self, query: Optional[str], tokens: Optional[tuple], n_valid: int):
        """(labels, masking weights, unknown flags) of one query's ``n_valid`` feature rows, or
        None when the query has fewer tokens than rows (see the class doc). Tokenising and POS
        tagging run once per query: the result is kept (up to :attr:`FW_CACHE_SIZE` queries;
        the vocabulary and tokenizer settings are fixed when the model is built)."""
        cache = self._fw_cache
        key = (query, tokens, n_valid)
        if key in cache:
            return cache[key]
        vocab = self.vocab
        tok = get_tokenizer(vocab.tokenizer)
        start, end = getattr(tok, "start_token", None), getattr(tok, "end_token", None)
        # features with start/end rows but a tokenizer without special tokens (whitespace):
        # wrap the words with sentinels so row j of the features is token j
        wrap = start is None and bool(self.config["fw_text_special_tokens"])
        if wrap:
            start, end = "<start>", "<end>"
        if tokens is None:
            tokens = tok.tokenize(query)
            if vocab.tokenizer == "clip" and not self.config["fw_text_special_tokens"]:
                tokens = tokens[1:-1]
            elif wrap:
                tokens = [start] + list(tokens) + [end]
        result = None
        if len(tokens) >= n_valid:
            tokens = list(tokens)[:n_valid]
            lab, w, unk = vocab.encode(tokens, start, end)
            if self.config["fw_word_weights"] == "pos":
                if query is None:
                    raise KeyError("POS weights need the batch's 'query' texts")
                w = pos_token_weights(query, tokens, tok, get_pos_tagger(self.config["pos_tagger"]),
                                      start, end)
            result = (list(lab), list(w), list(unk))
        if len(cache) >= self.FW_CACHE_SIZE:
            cache.clear()
        cache[key] = result
        return result

    def _detr_kwargs(self, samples: Mapping[str, Any], text: Dict[str, Any]) -> Dict[str, Any]:
        dev = self.device
        for key in ("src_vid", "src_vid_mask"):
            if key not in samples:
                raise KeyError(f"batch has no '{key}'")
        groups = samples.get("group", samples.get("vid"))
        return {"src_txt": text["src_txt"], "src_txt_mask": text["src_txt_mask"],
                "txt_ids": text["txt_ids"], "src_vid": samples["src_vid"].to(dev).float(),
                "src_vid_mask": samples["src_vid_mask"].to(dev).float(),
                "vids": None if groups is None else list(groups)}

    def forward(self, samples: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """Losses of a training batch incl. ``loss_rec_fw`` / ``loss_rec_ss`` when enabled."""
        text = self._text(samples)
        kw = self._detr_kwargs(samples, text)
        targets = self._targets(samples)
        bsz, n_clips = kw["src_vid"].shape[:2]
        vmask = kw["src_vid_mask"]
        if samples.get("clip_mask") is not None:  # the dataset's (MESM's rule)
            gcm = torch.as_tensor(samples["clip_mask"]).bool()
        else:
            gcm = gt_clip_mask([s.cpu() for s in targets["span_labels"]],
                               _as_list(samples["duration"]), _as_list(samples["clip_length"]),
                               vmask.sum(1).long().tolist(), n_clips)
        fw_weights = fw_unknown = None
        aligned = None
        if self.detr.rec_fw and self.training:
            if self.vocab is None:
                raise ConfigError("training with rec_fw: true needs 'model.vocab_counts' (make "
                                  "it with `lavis-c2f vocab --ann TRAIN.jsonl --out COUNTS.json`)")
            labels, fw_weights, fw_unknown, aligned = self._fw_targets(
                samples, text, text["src_txt_mask"].shape[1])
            targets["fw_labels"] = labels.to(self.device)
            targets["words_mask"] = text["src_txt_mask"]
        if self.detr.rec_ss:
            targets["ss_moments"], _ = merged_moments([s.cpu() for s in targets["span_labels"]])
            targets["vids"] = kw["vids"]
        out = self.detr(**kw, gt_clip_mask=gcm.to(self.device), fw_weights=fw_weights,
                        fw_unknown=fw_unknown,
                        compute_neg=self.training and self.config["train_neg_pass"],
                        compute_rec=self.training)
        if "fw_valid" in out and aligned is not None:
            out["fw_valid"] = out["fw_valid"] & aligned.to(self.device)
        losses = self.criterion(out, targets)
        result = self._loss_dict(losses)
        if aligned is not None:
            result["fw_aligned_frac"] = aligned.float().mean()
        return result

    @torch.no_grad()
    def predict_batch(self, samples: Mapping[str, Any]) -> List[Dict[str, Any]]:
        """Official prediction rows (no negative pass, no reconstruction; SS groups of one).
        Eval mode only."""
        if self.training:
            raise RuntimeError(f"{type(self).__name__}.predict_batch needs eval mode: call "
                               "model.eval() first (dropout would randomise predictions)")
        text = self._text(samples)
        kwargs = self._detr_kwargs(samples, text)
        # default: each query's sentence token is rebuilt from its own video only (the corpus
        # setting: other queries of the same video are unknown at inference), so predictions do
        # not depend on the batch composition; predict_with_groups: MESM's evaluation, whose
        # items group the queries of a video (grouped eval splits, datasets.*.group_splits)
        if not self.config["predict_with_groups"]:
            kwargs["vids"] = None
        out = self.detr(**kwargs, compute_neg=False, compute_rec=False,
                        t2v_mask_mode=self.config["eval_t2v_mask_mode"])
        return self._rows(out, samples)
