"""``c2f_caption_refiner``: stage 3, CALCE (caption-assisted BLIP-2 T5 moment retrieval).

Built from LAVIS's BLIP-2 T5 parts (EVA ViT + ``ln_vision`` + Q-Former + ``t5_proj`` + T5, the
same attribute names as :class:`lavis.models.blip2_models.blip2_t5.Blip2T5`, so LAVIS BLIP-2 and
CALCE checkpoints load unchanged), every part read from **local** paths:

* ``vit_checkpoint``: the EVA ViT state dict (LAVIS's ``eva_vit_g.pth``); ``vit_arch``: its
  sizes as ``create_eva_vit_g`` passes them (``img_size, patch_size, embed_dim, depth,
  num_heads, mlp_ratio, qkv_bias, use_mean_pooling, norm_layer_eps``; null = EVA ViT-g);
  without ``vit_checkpoint`` the ViT is random (tiny test models);
* ``bert_dir``: ``config.json`` + ``vocab.txt`` of ``bert-base-uncased`` (Q-Former sizes and
  tokenizer) and, with ``qformer_init_from_bert``, its weights;
* ``t5_dir``: a Flan-T5 folder (``config.json``, weights, ``tokenizer.json`` or ``spiece.model``);
* ``pretrained`` (with ``load_pretrained: true``): LAVIS's ``blip2_pretrained_flant5xl.pth``.

Two input designs (``variant``) share every part above, the LoRA, the checkpoints and scoring:

* ``calce`` (default): CALCE itself (tjhd1475/CALCE). All ``n_frms`` frames of the video go in;
  key frames come from DPC-KNN clustering (stage 2: guided by coarse windows, budget ``T/2``);
  non-key frames are compressed by ``query_proj`` (32 -> 8 tokens); frame tokens are
  interleaved with integer timestamps, followed by the subtitle block and the text prompt;
  the answer is ``str(windows)`` parsed by :func:`calce_post_process`. The Q-Former keeps its
  text path (BERT embeddings, text FFNs, ``cls``) for the subtitle filter. Inputs, loss and
  generation: :mod:`lavis_c2f.models.refiner.calce`; settings under ``calce:``
  (:class:`CalceSettings`). :func:`load_calce_checkpoint` loads CALCE's released checkpoints.
* ``interleaved`` (the earlier c2f design, kept as a variant): the dataset picks ``n_frames``
  k-means key frames inside the stage-2 search region; prompt ``<frame> t=12s speech:"..."``
  (:mod:`.prompt`); answer parsed by :mod:`.parsing`. The Q-Former text path is removed.

LAVIS's ``init_Qformer``/``init_tokenizer``/``Blip2T5.__init__`` would fetch ``bert-base-uncased``
and ``t5_model`` from the hub; this class never calls them. A missing path raises
:class:`~lavis_c2f.common.errors.ConfigError` naming the key and the path.

Precision: weights stay float32 except the ViT with ``vit_precision: fp16``; on CUDA the visual
part runs under fp16 autocast (``vit_precision: fp16``) and T5 under ``t5_precision`` autocast
(``bf16``: CALCE's GPU numerics). On CPU everything computes in float32.

LoRA: peft's (r 8, alpha 8, dropout 0.05 on ``q k v o wi_0 wi_1 wo lm_head`` for CALCE), so the
factors are named ``t5_model.base_model.model.<path>.lora_{A,B}.default.weight`` as in CALCE's
checkpoints. ``finetune``: ``lora`` (CALCE's ``qformer_freeze_lora``: LoRA, ``t5_proj``,
``ln_vision`` and ``query_proj`` train; Q-Former, query tokens, T5 frozen), ``qformer``
(Q-Former, query tokens, ``t5_proj``, ``ln_vision``; T5 frozen), ``lora_qformer`` (both),
``none``. The ViT is frozen unless ``freeze_vit: false``.

Batches (``samples``) are made by :mod:`lavis_c2f.models.refiner.data`. ``forward(samples)``
returns ``{"loss"}``; ``predict_batch(samples)`` returns official prediction rows (eval mode
required) and updates :attr:`refine_stats`; ``generate_text(samples)`` the raw generations.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import LayerNorm, disabled_train
from lavis.models.blip2_models.blip2_t5 import Blip2T5
from lavis.models.blip2_models.modeling_t5 import T5Config, T5ForConditionalGeneration
from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel
from lavis.models.eva_vit import VisionTransformer, convert_weights_to_fp16, interpolate_pos_embed
from peft import LoraConfig, get_peft_model
from transformers import BertTokenizer, T5Tokenizer, T5TokenizerFast

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import check_keys, to_plain
from lavis_c2f.models.checkpoint import frozen_keys, load_state_strict, torch_load
from lavis_c2f.models.refiner.calce import (build_calce_inputs, calce_generate_output, calce_teacher_forcing,
                                            collate_calce_inputs)
from lavis_c2f.models.refiner.calce_text import (TALK_KEYWORDS, annoying_replacement, calce_post_process,
                                                 calce_windows, find_annoying_numbers)
from lavis_c2f.models.refiner.parsing import (ParseConfig, ParseResult, RefineStats, parse_windows,
                                              windows_with_scores)
from lavis_c2f.models.refiner.prompt import PromptConfig, RefinerPrompt, build_prompt, format_windows
from lavis_c2f.paths import config_path, resolve_path

logger = logging.getLogger(__name__)

LAVIS_KEYS = {"arch", "model_type", "load_finetuned", "finetuned", "load_pretrained", "pretrained"}
VARIANTS = ("calce", "interleaved")
FINETUNE_MODES = ("lora", "qformer", "lora_qformer", "none")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
EVA_VIT_G = {"patch_size": 14, "embed_dim": 1408, "depth": 39, "num_heads": 1408 // 88, "mlp_ratio": 4.3637,
             "qkv_bias": True, "use_mean_pooling": False, "norm_layer_eps": 1e-6}
VIT_ARCH_KEYS = set(EVA_VIT_G) | {"img_size"}
DEFAULTS: Dict[str, Any] = {
    "variant": "calce",
    "vit_arch": None, "vit_checkpoint": None, "image_size": 224, "vit_precision": "fp16",
    "drop_path_rate": 0.0, "use_grad_checkpoint": False, "freeze_vit": True,
    "bert_dir": None, "qformer_init_from_bert": False, "num_query_token": 32, "cross_attention_freq": 2,
    "t5_dir": None, "t5_precision": "bf16",
    "finetune": "lora", "lora": None, "calce": None, "generation": None,
    "prompt": None, "output": None, "max_piece_tokens": 512, "max_target_tokens": 64,
    "score_mode": "stage2", "keep_stage2_tail": True, "tail_iou_threshold": 0.7, "max_pred_windows": 10,
}
LORA_DEFAULTS = {"r": 8, "alpha": 8.0, "dropout": 0.05,
                 "target_modules": ["q", "k", "v", "o", "wi_0", "wi_1", "wo", "lm_head"]}
GENERATION_DEFAULTS = {"num_beams": 5, "max_new_tokens": 70, "min_length": 1,
                       "length_penalty": 1.0, "repetition_penalty": 1.0}
# The Q-Former's text path: absent from LAVIS's BLIP-2 T5 checkpoints (Blip2T5 deletes it);
# CALCE keeps it (bert-base-uncased weights) for the subtitle filter.
TEXT_PATH_PREFIXES = ("Qformer.cls.", "Qformer.bert.embeddings.word_embeddings.",
                      "Qformer.bert.embeddings.position_embeddings.")
CALCE_ARCHS = {"blip2_calce_stage1": 1, "blip2_calce_stage2": 2}


@dataclass(frozen=True)
class CalceSettings:
    """CALCE's settings (model ``calce:`` node; official names in brackets).

    Attributes:
        stage: 1 (whole video) or 2 (coarse windows in the prompt and guiding key frames).
        num_clusters: DPC-KNN clusters [num_clusters 12]. cluster_k: neighbours of the density [5].
        bias1: dilation of key frames [bias1: 1 stage 1, 3 stage 2]. bias2: dilation of the
            stage-2 frame filter [bias2: 1 QVHighlights, 2 Charades-STA].
        top_labels: labels of the coarse windows kept by the stage-2 filter [8].
        query_combine_rate: a non-key frame keeps ``num_query_token / rate`` tokens [4].
        max_txt_len: BERT padding and T5 truncation length [max_txt_len 200].
        subtitle_topk, subtitle_threshold: subtitles kept by CLS similarity [5, 0.9].
        use_items: write the ``Items:`` line (CALCE's ``..._item`` task; stage 2 always does).
        talk_keywords: substrings that make a query talk-relative.
    """

    stage: int = 1
    num_clusters: int = 12
    cluster_k: int = 5
    bias1: int = 1
    bias2: int = 1
    top_labels: int = 8
    query_combine_rate: int = 4
    max_txt_len: int = 200
    subtitle_topk: int = 5
    subtitle_threshold: float = 0.9
    use_items: bool = True
    talk_keywords: Tuple[str, ...] = TALK_KEYWORDS

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]], where: str = "model.calce") -> "CalceSettings":
        d = check_keys(cfg, {f.name for f in fields(cls)}, where)
        for k, v in d.items():
            want = type(getattr(cls(), k))
            if want is int and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"{where}.{k}: expected a non-negative integer, got {v!r}")
            if want is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"{where}.{k}: expected a number, got {v!r}")
            if want is bool and not isinstance(v, bool):
                raise ConfigError(f"{where}.{k}: expected true/false, got {v!r}")
        if "talk_keywords" in d:
            d["talk_keywords"] = tuple(str(x) for x in d["talk_keywords"])
        out = cls(**d)
        if out.stage not in (1, 2):
            raise ConfigError(f"{where}.stage: expected 1 or 2, got {out.stage!r}")
        if out.stage == 2 and not out.use_items:
            raise ConfigError(f"{where}.use_items: stage 2 always writes the items (CALCE)")
        if out.query_combine_rate < 1 or out.num_clusters < 1:
            raise ConfigError(f"{where}: query_combine_rate and num_clusters must be >= 1")
        return out

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["talk_keywords"] = list(self.talk_keywords)
        return d


# =========================================================================== local parts
def _plain(cfg: Any) -> Dict[str, Any]:
    d = to_plain(cfg) if cfg is not None else {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"model config must be a mapping, got {type(d).__name__}")
    return dict(d)


def _require_dir(path: Optional[str], key: str, files: Sequence[Sequence[str]] = ()) -> str:
    """Absolute ``path`` after checking it is a directory holding, for each group of
    ``files``, at least one of the names (ConfigError naming ``key`` and the path)."""
    if not path:
        raise ConfigError(f"model.{key}: missing (a local directory is required; nothing is "
                          "downloaded)")
    p = resolve_path(path)
    if not os.path.isdir(p):
        raise ConfigError(f"model.{key}: directory not found: {p}")
    for group in files:
        if not any(os.path.isfile(os.path.join(p, f)) for f in group):
            raise ConfigError(f"model.{key}: {p} has none of {list(group)}")
    return p


def _require_file(path: Optional[str], key: str) -> str:
    if not path:
        raise ConfigError(f"model.{key}: missing (a local file is required; nothing is downloaded)")
    p = resolve_path(path)
    if not os.path.isfile(p):
        raise ConfigError(f"model.{key}: file not found: {p}")
    return p


def _torch_load(path: str, map_location: Any = "cpu") -> Any:
    """:func:`~lavis_c2f.models.checkpoint.torch_load` of a file named in the refiner's config
    (trusted: LAVIS / CALCE checkpoints may hold numpy objects besides the tensors)."""
    return torch_load(path, map_location=map_location, trusted=True)


BERT_WEIGHTS = ("pytorch_model.bin", "model.safetensors")


def has_bert_weights(bert_dir: str) -> bool:
    """Whether ``bert_dir`` holds BERT weights (not only its config and vocabulary)."""
    return any(os.path.isfile(os.path.join(resolve_path(bert_dir), f)) for f in BERT_WEIGHTS)


def vit_sizes(vit_arch: Optional[Mapping[str, Any]], image_size: int) -> Dict[str, Any]:
    """The ViT's constructor sizes: ``vit_arch`` (every key of EVA ViT-g's list, ``img_size``
    optional and equal to ``image_size``) or EVA ViT-g's when None."""
    if vit_arch is None:
        return {**EVA_VIT_G, "img_size": image_size}
    d = check_keys(vit_arch, VIT_ARCH_KEYS, "model.vit_arch")
    missing = sorted(set(EVA_VIT_G) - set(d))
    if missing:
        raise ConfigError(f"model.vit_arch: missing {missing} (every size of create_eva_vit_g's call)")
    if "img_size" in d and int(d["img_size"]) != int(image_size):
        raise ConfigError(f"model.vit_arch.img_size {d['img_size']} differs from model.image_size {image_size}")
    return {**d, "img_size": image_size}


def build_vision_encoder(vit_arch: Optional[Mapping[str, Any]], image_size: int, vit_checkpoint: Optional[str],
                         precision: str, drop_path_rate: float, use_grad_checkpoint: bool) -> nn.Module:
    """LAVIS's EVA ``VisionTransformer`` with ``vit_arch`` sizes (module doc), loaded from
    ``vit_checkpoint`` as ``create_eva_vit_g`` does (position embeddings interpolated); every
    weight of the model must be in the file, with the same shape."""
    a = vit_sizes(vit_arch, image_size)
    if vit_arch is None and not vit_checkpoint:
        raise ConfigError("model.vit_checkpoint: missing (EVA ViT-g weights, LAVIS's eva_vit_g.pth; a random ViT "
                          "needs explicit vit_arch sizes)")
    path = _require_file(vit_checkpoint, "vit_checkpoint") if vit_checkpoint else None
    vit = VisionTransformer(img_size=int(a["img_size"]), patch_size=int(a["patch_size"]),
                            use_mean_pooling=bool(a["use_mean_pooling"]), embed_dim=int(a["embed_dim"]),
                            depth=int(a["depth"]), num_heads=int(a["num_heads"]), mlp_ratio=float(a["mlp_ratio"]),
                            qkv_bias=bool(a["qkv_bias"]), drop_path_rate=drop_path_rate,
                            norm_layer=partial(nn.LayerNorm, eps=float(a["norm_layer_eps"])),
                            use_checkpoint=use_grad_checkpoint)
    if path is not None:
        state = _torch_load(path)
        state = state.get("model", state) if isinstance(state, dict) else state
        if not isinstance(state, Mapping):
            raise ConfigError(f"model.vit_checkpoint: {path} holds no state dict")
        state = dict(state)
        interpolate_pos_embed(vit, state)
        own = vit.state_dict()
        bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        missing = [k for k in own if k not in state]
        if bad or missing:
            raise ConfigError(f"model.vit_checkpoint: {path} does not fit vit_arch {a}: missing "
                              f"{missing[:5]}, shape mismatch {bad[:5]}")
        vit.load_state_dict(state, strict=False)
    if precision == "fp16":
        convert_weights_to_fp16(vit)
    elif precision != "fp32":
        raise ConfigError(f"model.vit_precision: expected 'fp16' or 'fp32', got {precision!r}")
    return vit


def build_qformer(bert_dir: str, num_query_token: int, vision_width: int, cross_attention_freq: int,
                  init_from_bert: bool) -> Tuple[nn.Module, nn.Parameter]:
    """LAVIS's Q-Former (``BertLMHeadModel`` with cross-attention) from a local BERT folder."""
    cfg = BertConfig.from_pretrained(bert_dir, local_files_only=True)
    cfg.encoder_width = vision_width
    cfg.add_cross_attention = True
    cfg.cross_attention_freq = cross_attention_freq
    cfg.query_length = num_query_token
    if init_from_bert:
        _require_dir(bert_dir, "bert_dir", [BERT_WEIGHTS])
        qformer = BertLMHeadModel.from_pretrained(bert_dir, config=cfg, local_files_only=True)
    else:
        qformer = BertLMHeadModel(config=cfg)
    query_tokens = nn.Parameter(torch.zeros(1, num_query_token, cfg.hidden_size))
    query_tokens.data.normal_(mean=0.0, std=cfg.initializer_range)
    return qformer, query_tokens


def load_bert_tokenizer(bert_dir: str):
    """The Q-Former's BERT tokenizer (``vocab.txt``) with LAVIS's ``[DEC]`` bos token."""
    tok = BertTokenizer.from_pretrained(bert_dir, local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def load_t5(t5_dir: str):
    """``(tokenizer, T5ForConditionalGeneration)`` (LAVIS's T5 with ``dense_act_fn='gelu'``, as
    BLIP-2 and CALCE set it); the fast tokenizer when the folder has ``tokenizer.json``."""
    if os.path.isfile(os.path.join(t5_dir, "tokenizer.json")):
        tok = T5TokenizerFast.from_pretrained(t5_dir, local_files_only=True)
    else:
        tok = T5Tokenizer.from_pretrained(t5_dir, local_files_only=True)
    cfg = T5Config.from_pretrained(t5_dir, local_files_only=True)
    cfg.dense_act_fn = "gelu"
    model = T5ForConditionalGeneration.from_pretrained(t5_dir, config=cfg, local_files_only=True)
    return tok, model


def apply_lora(t5: nn.Module, r: int, alpha: float, dropout: float, target_modules: Sequence[str]) -> nn.Module:
    """peft's LoRA on the T5 as CALCE applies it (``bias="none"``, ``task_type="CAUSAL_LM"``);
    returns the ``PeftModel``. A target that names no layer raises ConfigError."""
    names = {n.rsplit(".", 1)[-1] for n, m in t5.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(target_modules) - names)
    if unknown:
        raise ConfigError(f"model.lora.target_modules: {unknown} name no linear layer of the T5 "
                          f"(its linear layers: {sorted(names)})")
    cfg = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout),
                     target_modules=list(target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(t5, cfg)


# =========================================================================== model
@registry.register_model("c2f_caption_refiner")
class C2FCaptionRefiner(Blip2T5):
    """Stage-3 refiner (see module doc). Build with :meth:`from_config` or
    :func:`load_calce_checkpoint`."""

    ARCH = "c2f_caption_refiner"
    PRETRAINED_MODEL_CONFIG_DICT = {
        "calce_flant5xl": "models/c2f_caption_refiner_calce_flant5xl.yaml",
        "qvh_flant5xl": "models/c2f_caption_refiner_qvh_flant5xl.yaml",
        "tiny": "models/c2f_caption_refiner_tiny.yaml",
    }

    def __init__(self, *, variant: str = "calce", vit_arch: Optional[Mapping[str, Any]] = None,
                 vit_checkpoint: Optional[str] = None, image_size: int = 224, vit_precision: str = "fp16",
                 drop_path_rate: float = 0.0, use_grad_checkpoint: bool = False, freeze_vit: bool = True,
                 bert_dir: Optional[str] = None, qformer_init_from_bert: bool = False,
                 num_query_token: int = 32, cross_attention_freq: int = 2,
                 t5_dir: Optional[str] = None, t5_precision: str = "bf16", finetune: str = "lora",
                 lora: Optional[Mapping[str, Any]] = None, calce: Optional[CalceSettings] = None,
                 generation: Optional[Mapping[str, Any]] = None, prompt: Optional[PromptConfig] = None,
                 output: Optional[ParseConfig] = None, max_piece_tokens: int = 512, max_target_tokens: int = 64,
                 score_mode: str = "stage2", keep_stage2_tail: bool = True, tail_iou_threshold: float = 0.7,
                 max_pred_windows: int = 10):
        # Blip2T5.__init__ would download bert-base-uncased and the T5: build the same parts
        # from local paths instead (nn.Module init through Blip2Base/BaseModel).
        super(Blip2T5, self).__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"model.variant: expected one of {VARIANTS}, got {variant!r}")
        if finetune not in FINETUNE_MODES:
            raise ConfigError(f"model.finetune: expected one of {FINETUNE_MODES}, got {finetune!r}")
        if t5_precision not in AUTOCAST_DTYPES:
            raise ConfigError(f"model.t5_precision: expected one of {sorted(AUTOCAST_DTYPES)}, got {t5_precision!r}")
        if score_mode not in ("stage2", "generation", "product"):
            raise ConfigError(f"model.score_mode: expected stage2, generation or product, got {score_mode!r}")
        self.variant = variant
        bert_dir = _require_dir(bert_dir, "bert_dir", [("config.json",), ("vocab.txt",)])
        t5_dir = _require_dir(t5_dir, "t5_dir", [("config.json",),
                                                 ("pytorch_model.bin", "pytorch_model.bin.index.json",
                                                  "model.safetensors", "model.safetensors.index.json"),
                                                 ("tokenizer.json", "spiece.model")])
        self.tokenizer = load_bert_tokenizer(bert_dir)
        self.visual_encoder = build_vision_encoder(vit_arch, image_size, vit_checkpoint, vit_precision,
                                                   drop_path_rate, use_grad_checkpoint)
        self.vit_dtype = torch.float16 if vit_precision == "fp16" else torch.float32
        self.vit_autocast_dtype = torch.float16 if vit_precision == "fp16" else None
        self.ln_vision = LayerNorm(self.visual_encoder.num_features)
        self.freeze_vit = freeze_vit
        self.qformer_init_from_bert = bool(qformer_init_from_bert)
        self.Qformer, self.query_tokens = build_qformer(bert_dir, num_query_token,
                                                        self.visual_encoder.num_features,
                                                        cross_attention_freq, self.qformer_init_from_bert)
        if variant == "interleaved":  # the text path of the Q-Former is unused (as in Blip2T5)
            self.Qformer.cls = None
            self.Qformer.bert.embeddings.word_embeddings = None
            self.Qformer.bert.embeddings.position_embeddings = None
            for layer in self.Qformer.bert.encoder.layer:
                layer.output = None
                layer.intermediate = None
        self.t5_tokenizer, t5 = load_t5(t5_dir)
        self.t5_autocast_dtype = AUTOCAST_DTYPES[t5_precision]
        self.num_query_token = num_query_token
        self.calce = calce or CalceSettings()
        if variant == "calce":
            n_compressed = num_query_token // self.calce.query_combine_rate
            if n_compressed < 1:
                raise ConfigError(f"model.calce.query_combine_rate {self.calce.query_combine_rate} leaves no "
                                  f"token of {num_query_token}")
            self.query_proj = nn.Linear(num_query_token, n_compressed)
            annoying = find_annoying_numbers(
                lambda x: self.t5_tokenizer(x, add_special_tokens=False)["input_ids"], 200)
            self.annoying_table = annoying_replacement(annoying)
        self.t5_proj = nn.Linear(self.Qformer.config.hidden_size, t5.config.hidden_size)
        self.finetune = finetune
        self.lora_cfg = {**LORA_DEFAULTS, **dict(lora or {})}
        if "lora" in finetune:
            t5 = apply_lora(t5, self.lora_cfg["r"], self.lora_cfg["alpha"], self.lora_cfg["dropout"],
                            self.lora_cfg["target_modules"])
        self.t5_model = t5
        self.prompt_cfg = prompt or PromptConfig()
        self.parse_cfg = output or ParseConfig()
        self.generation_cfg = {**GENERATION_DEFAULTS, **dict(generation or {})}
        self.max_piece_tokens = max_piece_tokens
        self.max_target_tokens = max_target_tokens
        self.score_mode = score_mode
        self.keep_stage2_tail = keep_stage2_tail
        self.tail_iou_threshold = tail_iou_threshold
        self.max_pred_windows = max_pred_windows
        self.prompt = ""
        self.max_txt_len = max_piece_tokens
        self._apply_lemmatizer, self._lemmatizer = False, None
        self.refine_stats = RefineStats()
        self.config: Dict[str, Any] = {}
        self._set_trainable()

    # ------------------------------------------------------------------ building
    @property
    def lora_layers(self) -> List[str]:
        """Qualified names (inside the T5) of the layers carrying LoRA factors, sorted."""
        return sorted({n.split(".lora_A.")[0].replace("base_model.model.", "", 1)
                       for n, _ in self.t5_model.named_parameters() if ".lora_A." in n})

    def _set_trainable(self) -> None:
        """requires_grad per ``finetune`` (module doc)."""
        for p in self.parameters():
            p.requires_grad = False
        if "lora" in self.finetune:
            for n, p in self.t5_model.named_parameters():
                p.requires_grad = ".lora_A." in n or ".lora_B." in n
            for p in self.ln_vision.parameters():
                p.requires_grad = True
        if "qformer" in self.finetune:
            for m in (self.Qformer, self.ln_vision):
                for p in m.parameters():
                    p.requires_grad = True
            self.query_tokens.requires_grad = True
        if self.finetune != "none":
            extra = [self.t5_proj] + ([self.query_proj] if self.variant == "calce" else [])
            for m in extra:
                for p in m.parameters():
                    p.requires_grad = True
        if self.freeze_vit:
            self.visual_encoder = self.visual_encoder.eval()
            self.visual_encoder.train = disabled_train
        else:
            for p in self.visual_encoder.parameters():
                p.requires_grad = True

    @classmethod
    def default_config_path(cls, model_type: str) -> str:
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise ConfigError(f"unknown model_type '{model_type}' for {cls.ARCH}; known: "
                              f"{sorted(cls.PRETRAINED_MODEL_CONFIG_DICT)}")
        return config_path(cls.PRETRAINED_MODEL_CONFIG_DICT[model_type])

    @classmethod
    def from_config(cls, cfg: Any) -> "C2FCaptionRefiner":
        """Build from a ``model:`` node; unknown keys raise :class:`ConfigError`.

        ``load_pretrained: true`` + ``pretrained: PATH`` loads a LAVIS BLIP-2 checkpoint;
        ``load_finetuned: true`` + ``finetuned: PATH`` then loads a refiner checkpoint (ours or
        CALCE's ``checkpoint_best.pth``).
        """
        raw = check_keys(cfg, set(DEFAULTS) | LAVIS_KEYS, "model")
        c = {**DEFAULTS, **{k: v for k, v in raw.items() if k in DEFAULTS}}
        kwargs = dict(c)
        kwargs["lora"] = {**LORA_DEFAULTS, **check_keys(c["lora"], LORA_DEFAULTS, "model.lora")}
        kwargs["generation"] = {**GENERATION_DEFAULTS,
                                **check_keys(c["generation"], GENERATION_DEFAULTS, "model.generation")}
        kwargs["calce"] = CalceSettings.from_mapping(c["calce"])
        kwargs["prompt"] = PromptConfig.from_mapping(_plain(c["prompt"]) if c["prompt"] else None)
        kwargs["output"] = ParseConfig.from_mapping(_plain(c["output"]) if c["output"] else None)
        kwargs["vit_arch"] = _plain(c["vit_arch"]) if c["vit_arch"] is not None else None
        model = cls(**kwargs)
        model.config = {**c, "lora": kwargs["lora"], "generation": kwargs["generation"],
                        "calce": kwargs["calce"].to_dict(), "prompt": kwargs["prompt"].to_dict(),
                        "output": vars(kwargs["output"]).copy(), "arch": cls.ARCH}
        if raw.get("load_pretrained") and raw.get("pretrained"):
            model.load_blip2_checkpoint(raw["pretrained"])
        if raw.get("load_finetuned") and raw.get("finetuned"):
            model.load_checkpoint(raw["finetuned"])
        return model

    # ------------------------------------------------------------------ checkpoints
    BLIP2_REQUIRED = ("Qformer.", "query_tokens", "t5_proj.", "ln_vision.")

    @staticmethod
    def is_text_path_key(key: str) -> bool:
        """Whether a state-dict key belongs to the Q-Former's text path (module doc)."""
        if key.startswith(TEXT_PATH_PREFIXES):
            return True
        parts = key.split(".")
        return (key.startswith("Qformer.bert.encoder.layer.") and len(parts) > 5
                and parts[5] in ("intermediate", "output"))

    def load_blip2_checkpoint(self, path: str) -> Dict[str, List[str]]:
        """Load a LAVIS BLIP-2 T5 checkpoint (``{"model": state_dict}``): every Q-Former,
        query-token, ``t5_proj`` and ``ln_vision`` weight must be in it, except the Q-Former's
        text path when it came from BERT weights (``qformer_init_from_bert``)."""
        path = _require_file(path, "pretrained")
        ckpt = _torch_load(path)
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, Mapping):
            raise ConfigError(f"model.pretrained: {path} holds no state dict")
        own = self.state_dict()
        missing = [k for k in own if k.startswith(self.BLIP2_REQUIRED) and k not in state
                   and not k.endswith("position_ids")]
        text = [k for k in missing if self.is_text_path_key(k)]
        other = [k for k in missing if not self.is_text_path_key(k)]
        if other:
            raise ConfigError(f"model.pretrained: {path} is not a BLIP-2 checkpoint for this model: "
                              f"missing {len(other)} keys, e.g. {other[:5]}")
        if text and not self.qformer_init_from_bert:
            raise ConfigError(
                f"model.pretrained: {path} lacks the Q-Former text path ({len(text)} keys, e.g. {text[:3]}), "
                "which CALCE's subtitle filter needs: put bert-base-uncased's weights (pytorch_model.bin or "
                "model.safetensors) in model.bert_dir and set qformer_init_from_bert: true")
        shape_bad = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if shape_bad:
            raise ConfigError(f"model.pretrained: {path}: shape mismatch for {shape_bad[:5]}")
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        unexpected = sorted(k for k in state if k not in own)
        logger.info("loaded BLIP-2 checkpoint %s (%d keys ignored)", path, len(unexpected))
        return {"missing": text, "unexpected": unexpected}

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """What a checkpoint keeps, as LAVIS's runner writes it: the state dict minus every
        parameter that ``named_parameters()`` reports frozen (LoRA, ``t5_proj``, ``ln_vision``,
        ``query_proj``, plus aliases of tied frozen weights and buffers, which CALCE's released
        checkpoints carry too). A few MB instead of the ~16 GB model."""
        frozen = {n for n, p in self.named_parameters() if not p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k not in frozen}

    def load_checkpoint(self, url_or_filename: str, strict: bool = True,
                        map_location: Any = "cpu") -> Dict[str, List[str]]:
        """Load a refiner checkpoint: ours (the runner's, trainable tensors) or CALCE's
        ``checkpoint_best.pth`` (same layout), by the package's strict-load rule
        (:func:`~lavis_c2f.models.checkpoint.load_state_strict`): every trainable parameter must
        be present and no key may be unknown or mis-shaped (``strict``:
        :class:`~lavis_c2f.common.errors.CheckpointMismatchError` listing them); frozen weights
        may be absent (they come from the base files). Returns the key report
        ``{missing, unexpected, mismatched}``."""
        path = _require_file(url_or_filename, "finetuned")
        ckpt = _torch_load(path, map_location)
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, Mapping):
            raise ConfigError(f"model.finetuned: {path} holds no state dict")
        return load_state_strict(self, state, source=path, strict=strict, allow_missing=frozen_keys(self))

    # ------------------------------------------------------------------ shared
    def _autocast(self, dtype: Optional[torch.dtype]):
        if dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def _check_variant(self, variant: str, what: str) -> None:
        if self.variant != variant:
            raise RuntimeError(f"{what} is part of the {variant!r} input design; this model is {self.variant!r}")

    def forward(self, samples: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """T5 cross-entropy of the answer text. Returns ``{"loss"}``."""
        if self.variant == "calce":
            inputs = self.calce_inputs(samples)
            targets = [calce_windows(w) for w in samples["target_windows"]]
            return {"loss": calce_teacher_forcing(self, inputs, targets)["loss"]}
        inputs, att, _ = self.build_inputs(samples)
        targets = self.t5_tokenizer(self.target_texts(samples), padding="longest", truncation=True,
                                    max_length=self.max_target_tokens, return_tensors="pt").to(inputs.device)
        labels = targets.input_ids.masked_fill(targets.input_ids == self.t5_tokenizer.pad_token_id, -100)
        with self._autocast(self.t5_autocast_dtype):
            out = self.t5_model(inputs_embeds=inputs, attention_mask=att,
                                decoder_attention_mask=targets.attention_mask, labels=labels,
                                return_dict=True)
        return {"loss": out.loss}

    # ------------------------------------------------------------------ CALCE batches
    def calce_inputs(self, samples: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """The T5 inputs of a CALCE batch (:func:`build_calce_inputs` per sample, batched with
        :func:`collate_calce_inputs`). In eval mode each sample is seeded with ``calce_seed[i]``
        when the batch has it (the dataset's per-sample seed makes clustering reproducible)."""
        self._check_variant("calce", "calce_inputs")
        per = []
        b = len(samples["query"])
        seeds = samples.get("calce_seed") or [None] * b
        srt_paths = samples.get("srt_path") or [None] * b
        for i in range(b):
            if seeds[i] is not None and not self.training:   # training keeps the runner's RNG stream
                torch.manual_seed(int(seeds[i]))
            coarse = samples["coarse_windows"][i] if self.calce.stage == 2 else None
            per.append(build_calce_inputs(
                self, samples["frames"][i], samples["timestamps"][i], float(samples["duration"][i]),
                samples["query"][i], samples["items"][i], samples["srt_text"][i], coarse,
                srt_path=srt_paths[i] or "<srt>"))
        if len(per) == 1:
            x = per[0]
            return {"input_ids": x["input_ids"][None], "inputs_embeds": x["inputs_embeds"][None],
                    "attention_mask": x["attention_mask"][None]}
        pad = self.t5_model.get_input_embeddings().weight[self.t5_tokenizer.pad_token_id]
        return collate_calce_inputs(per, self.t5_tokenizer.pad_token_id, pad)

    # ------------------------------------------------------------------ interleaved variant
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) frames -> (N, num_query_token, d_t5) T5-space frame tokens."""
        with self._autocast(self.vit_autocast_dtype):
            x = frames.to(self.vit_dtype) if self.device.type != "cuda" else frames
            emb = self.ln_vision(self.visual_encoder(x))
        emb = emb.float()
        atts = torch.ones(emb.shape[:-1], dtype=torch.long, device=emb.device)
        query_tokens = self.query_tokens.expand(emb.shape[0], -1, -1)
        out = self.Qformer.bert(query_embeds=query_tokens, encoder_hidden_states=emb,
                                encoder_attention_mask=atts, return_dict=True)
        return self.t5_proj(out.last_hidden_state)

    def build_prompts(self, samples: Mapping[str, Any]) -> List[RefinerPrompt]:
        """The :class:`RefinerPrompt` of each sample of a refiner batch (the reference windows
        are the ``n_ref_windows[i]`` (default 1) best stage-2 windows)."""
        self._check_variant("interleaved", "build_prompts")
        b = len(samples["query"])
        stage2 = samples.get("stage2_windows") or [[] for _ in range(b)]
        n_ref = samples.get("n_ref_windows") or [1] * b
        captions = samples.get("captions") or [[] for _ in range(b)]
        prompts = []
        for i in range(b):
            ref = sorted(stage2[i] or [], key=lambda w: -(w[2] if len(w) > 2 else 0.0))
            prompts.append(build_prompt(
                samples["query"][i], [float(t) for t in samples["frame_times"][i]],
                float(samples["duration"][i]), tuple(float(x) for x in samples["region"][i]),
                self.prompt_cfg, captions=captions[i] or [], reference_windows=ref[:max(1, int(n_ref[i]))]))
        return prompts

    def build_inputs(self, samples: Mapping[str, Any]) -> Tuple[torch.Tensor, torch.Tensor, List[RefinerPrompt]]:
        """Interleaved encoder inputs of a refiner batch (``interleaved`` variant).

        Returns:
            inputs_embeds (B, L, d_t5) float32, attention_mask (B, L) long (1 = valid, right
            padding), and the prompts.
        """
        frames, mask = samples["frames"], samples["frame_mask"]
        b, t = frames.shape[:2]
        valid = mask.bool()
        for i in range(b):
            n_i = int(valid[i].sum())
            if n_i != len(samples["frame_times"][i]) or not valid[i, :n_i].all():
                raise ValueError(f"sample {i}: frame_mask must mark the first len(frame_times[i])="
                                 f"{len(samples['frame_times'][i])} frames, it marks {n_i}")
        device = frames.device
        frame_tok = self.encode_frames(frames[valid]) if valid.any() else None  # (N, Q, D)
        prompts = self.build_prompts(samples)
        pieces: List[str] = [s for p in prompts for s in p.segments if isinstance(s, str)]
        enc = self.t5_tokenizer(pieces, add_special_tokens=False, truncation=True,
                                max_length=self.max_piece_tokens)["input_ids"]
        eos = self.t5_tokenizer.eos_token_id
        embed = self.t5_model.get_input_embeddings()
        flat_ids = [tok for ids in enc for tok in ids] + [eos]
        flat_emb = embed(torch.tensor(flat_ids, dtype=torch.long, device=device)).float()
        eos_emb = flat_emb[-1:]
        offsets = [0]
        for ids in enc:
            offsets.append(offsets[-1] + len(ids))
        seqs: List[torch.Tensor] = []
        piece, frame_base = 0, 0
        for i, p in enumerate(prompts):
            parts = []
            for s in p.segments:
                if isinstance(s, int):
                    parts.append(frame_tok[frame_base + s].float())
                else:
                    parts.append(flat_emb[offsets[piece]:offsets[piece + 1]])
                    piece += 1
            parts.append(eos_emb)
            frame_base += int(valid[i].sum())
            seqs.append(torch.cat(parts, dim=0))
        length = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[-1]
        inputs = torch.zeros(b, length, d, device=device)
        att = torch.zeros(b, length, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            inputs[i, :s.shape[0]] = s
            att[i, :s.shape[0]] = 1
        return inputs, att, prompts

    def target_texts(self, samples: Mapping[str, Any]) -> List[str]:
        """The answer text of each sample (``interleaved``: ``[[st, ed], ...]`` or ``[]``)."""
        return [format_windows(w, self.prompt_cfg.time_decimals) for w in samples["target_windows"]]

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate_text(self, samples: Mapping[str, Any], **overrides: Any) -> Tuple[List[str], List[float]]:
        """Raw generations and their confidence (exp of the length-normalised log-likelihood of
        the returned sequence), one per sample."""
        g = {**self.generation_cfg, **overrides}
        if self.variant == "calce":
            out = calce_generate_output(self, self.calce_inputs(samples), int(g["num_beams"]),
                                                 int(g["max_new_tokens"]), int(g["min_length"]),
                                                 float(g["repetition_penalty"]), float(g["length_penalty"]))
        else:
            inputs, att, _ = self.build_inputs(samples)
            with self._autocast(self.t5_autocast_dtype):
                out = self.t5_model.generate(
                    inputs_embeds=inputs, attention_mask=att, do_sample=False,
                    num_beams=int(g["num_beams"]), max_new_tokens=int(g["max_new_tokens"]),
                    min_length=int(g["min_length"]), length_penalty=float(g["length_penalty"]),
                    repetition_penalty=float(g["repetition_penalty"]), num_return_sequences=1,
                    return_dict_in_generate=True, output_scores=True)
        texts = self.t5_tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        if getattr(out, "sequences_scores", None) is not None:
            conf = out.sequences_scores.float().exp().tolist()
        else:
            trans = self.t5_model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
            valid = out.sequences[:, 1:] != self.t5_tokenizer.pad_token_id
            logp = (trans.float() * valid).sum(1) / valid.sum(1).clamp(min=1)
            conf = logp.exp().tolist()
        return texts, conf

    def parse(self, text: str, duration: float) -> ParseResult:
        """Windows of one generation: CALCE's ``post_process`` (``calce``; an empty list means
        fall back, reason ``empty``) or :func:`parse_windows` (``interleaved``)."""
        if self.variant == "calce":
            wins = calce_post_process(text, duration)
            ok = [(float(a), float(b)) for a, b in wins]
            return ParseResult(ok, True) if ok else ParseResult([], False, "empty")
        return parse_windows(text, duration, self.parse_cfg)

    def refine_rows(self, samples: Mapping[str, Any], texts: Sequence[str],
                    confidences: Sequence[float]) -> Tuple[List[List[List[float]]], List[ParseResult]]:
        """Scored windows per sample from generations; a failed parse falls back to the
        stage-2 windows (or, without any, the search region scored 0). Updates refine_stats."""
        out, results = [], []
        for i, text in enumerate(texts):
            duration = float(samples["duration"][i])
            stage2 = [list(map(float, w)) for w in (samples.get("stage2_windows") or [[]] * len(texts))[i] or []]
            res = self.parse(text, duration)
            self.refine_stats.record(res)
            results.append(res)
            if res.ok:
                top = max((w[2] for w in stage2 if len(w) > 2), default=1.0)
                conf = float(confidences[i])
                score = {"stage2": top, "generation": conf, "product": top * conf}[self.score_mode]
                out.append(windows_with_scores(res.windows, score, stage2, self.keep_stage2_tail,
                                               self.tail_iou_threshold, self.max_pred_windows))
            elif stage2:
                out.append([[w[0], w[1], w[2] if len(w) > 2 else 1.0] for w in stage2][:self.max_pred_windows])
            else:
                r = [float(x) for x in samples["region"][i]]
                out.append([[r[0], r[1], 0.0]])
        return out, results

    @torch.no_grad()
    def predict_batch(self, samples: Mapping[str, Any]) -> List[Dict[str, Any]]:
        """Official prediction rows ``{qid, query, vid, pred_relevant_windows
        [[st, ed, score], ...], (pred_saliency_scores)}``. Requires eval mode."""
        if self.training:
            raise RuntimeError("predict_batch needs eval mode (call model.eval())")
        texts, conf = self.generate_text(samples)
        windows, _ = self.refine_rows(samples, texts, conf)
        rows = []
        sal = samples.get("stage2_saliency")
        for i, w in enumerate(windows):
            row = {"qid": samples["qid"][i], "query": samples["query"][i], "vid": samples["vid"][i],
                   "pred_relevant_windows": [[round(a, 4), round(b, 4), round(s, 4)] for a, b, s in w]}
            if sal is not None and sal[i] is not None:
                row["pred_saliency_scores"] = list(sal[i])
            rows.append(row)
        return rows


# =========================================================================== CALCE checkpoints
LOAD_CONFIG_KEYS = {"vit_checkpoint", "vit_arch", "bert_dir", "t5_dir", "pretrained", "precision"}
PRECISIONS = {"fp32": ("fp32", "fp32"), "bf16": ("fp16", "bf16"), "fp16": ("fp16", "fp16")}


def calce_settings_from_checkpoint(ckpt: Mapping[str, Any], source: str) -> Tuple[CalceSettings, Dict[str, Any]]:
    """``(CalceSettings, model kwargs)`` from a checkpoint's ``config.model``: CALCE's
    (``arch: blip2_calce_stage1|2``) or ours (``arch: c2f_caption_refiner``, ``variant: calce``)."""
    conf = ckpt.get("config") if isinstance(ckpt, Mapping) else None
    mcfg = conf.get("model") if isinstance(conf, Mapping) else None
    if not isinstance(mcfg, Mapping) or "arch" not in mcfg:
        raise ConfigError(f"{source}: no config.model.arch in the checkpoint (expected LAVIS's checkpoint layout)")
    arch = mcfg["arch"]
    if arch == C2FCaptionRefiner.ARCH:
        if mcfg.get("variant", "calce") != "calce":
            raise ConfigError(f"{source}: a refiner checkpoint of variant {mcfg.get('variant')!r}, not calce")
        s = CalceSettings.from_mapping(mcfg.get("calce"), f"{source}: config.model.calce")
        return s, {"num_query_token": int(mcfg.get("num_query_token", 32)),
                   "image_size": int(mcfg.get("image_size", 224)),
                   "cross_attention_freq": int(mcfg.get("cross_attention_freq", 2)),
                   "lora": {**LORA_DEFAULTS, **dict(mcfg.get("lora") or {})}}
    if arch not in CALCE_ARCHS:
        raise ConfigError(f"{source}: config.model.arch is {arch!r}; expected one of "
                          f"{sorted(CALCE_ARCHS) + [C2FCaptionRefiner.ARCH]}")
    stage = CALCE_ARCHS[arch]
    task = str(mcfg.get("task", "qformer_freeze_lora"))
    if "lora" not in task or "qformer_freeze" not in task:
        raise ConfigError(f"{source}: CALCE task {task!r} is not supported (only qformer_freeze_lora[_item])")
    if mcfg.get("input_time_format", "seconds_integers") != "seconds_integers":
        raise ConfigError(f"{source}: input_time_format {mcfg.get('input_time_format')!r} is not supported "
                          "(only seconds_integers, as the released checkpoints use)")
    if mcfg.get("key_frame_selection", "cluster") != "cluster":
        raise ConfigError(f"{source}: key_frame_selection {mcfg.get('key_frame_selection')!r} is not supported "
                          "(only cluster, as the released checkpoints use)")
    s = CalceSettings(stage=stage, num_clusters=int(mcfg.get("num_clusters", 12)),
                      bias1=int(mcfg.get("bias1", 1 if stage == 1 else 3)), bias2=int(mcfg.get("bias2", 1)),
                      max_txt_len=int(mcfg.get("max_len", 200)), use_items=stage == 2 or "item" in task)
    return s, {"num_query_token": int(mcfg.get("num_query_token", 32)),
               "image_size": int(mcfg.get("image_size", 224)), "cross_attention_freq": 2,
               "lora": dict(LORA_DEFAULTS)}


def load_calce_checkpoint(path: str, config: Mapping[str, Any], map_location: Any = "cpu",
                          strict: bool = True) -> C2FCaptionRefiner:
    """A CALCE refiner from its base files and a checkpoint in LAVIS's ``checkpoint_best.pth``
    layout (CALCE's released ones or ours), in eval mode on ``map_location``.

    Args:
        path: the checkpoint; its ``config.model.arch`` gives the stage
            (``blip2_calce_stage1`` / ``blip2_calce_stage2``; ours: ``calce.stage``).
        config: ``{vit_checkpoint, vit_arch (optional: EVA ViT-g), bert_dir, t5_dir, pretrained,
            precision (fp32 | fp16 | bf16, default fp32)}``. The Q-Former, T5 and ViT sizes are
            read from the files (``vit_arch`` gives the ViT's head count, which no weight shows).
            When ``bert_dir`` holds BERT weights, the Q-Former starts from them (CALCE's
            ``init_Qformer``), then the BLIP-2 file (``pretrained``) is loaded.
        strict: raise when a trainable key is missing or a key is unknown (else warn).
    Returns:
        the model; ``model.load_report`` is ``{"missing": [...], "unexpected": [...]}`` (both
        empty for a checkpoint that fits).
    """
    c = check_keys(config, LOAD_CONFIG_KEYS, "load_calce_checkpoint(config)")
    for key in ("vit_checkpoint", "bert_dir", "t5_dir", "pretrained"):
        if not c.get(key):
            raise ConfigError(f"load_calce_checkpoint(config).{key}: missing")
    precision = c.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ConfigError(f"load_calce_checkpoint(config).precision: expected one of {sorted(PRECISIONS)}, "
                          f"got {precision!r}")
    ckpt_path = _require_file(path, "finetuned")
    ckpt = _torch_load(ckpt_path)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ConfigError(f"{ckpt_path}: not a LAVIS checkpoint (no 'model' state dict)")
    settings, kw = calce_settings_from_checkpoint(ckpt, ckpt_path)
    vit_prec, t5_prec = PRECISIONS[precision]
    bert_dir = _require_dir(c["bert_dir"], "bert_dir", [("config.json",), ("vocab.txt",)])
    model = C2FCaptionRefiner(
        variant="calce", vit_arch=c.get("vit_arch"), vit_checkpoint=c["vit_checkpoint"],
        image_size=kw["image_size"], vit_precision=vit_prec, bert_dir=bert_dir,
        qformer_init_from_bert=has_bert_weights(bert_dir), num_query_token=kw["num_query_token"],
        cross_attention_freq=kw["cross_attention_freq"], t5_dir=c["t5_dir"], t5_precision=t5_prec,
        finetune="lora", lora=kw["lora"], calce=settings)
    model.config = {"arch": C2FCaptionRefiner.ARCH, "variant": "calce", "calce": settings.to_dict(),
                    "vit_arch": c.get("vit_arch"), "vit_checkpoint": c["vit_checkpoint"], "bert_dir": bert_dir,
                    "t5_dir": c["t5_dir"], "pretrained": c["pretrained"], "vit_precision": vit_prec,
                    "t5_precision": t5_prec, "num_query_token": kw["num_query_token"],
                    "image_size": kw["image_size"], "lora": kw["lora"], "finetuned": ckpt_path}
    model.load_blip2_checkpoint(c["pretrained"])
    model.load_report = model.load_checkpoint(ckpt_path, strict=strict)
    return model.to(map_location).eval()
