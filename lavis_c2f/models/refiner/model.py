"""``c2f_caption_refiner``: stage 3, a caption-assisted BLIP-2 T5 moment refiner (CALCE-style).

Built from LAVIS's BLIP-2 T5 parts (EVA ViT + ``ln_vision`` + Q-Former + ``t5_proj`` + T5, the
same attribute names as :class:`lavis.models.blip2_models.blip2_t5.Blip2T5`, so LAVIS BLIP-2
checkpoints load unchanged), every part read from **local** paths:

* ``vit_model: eva_clip_g`` + ``vit_checkpoint`` (LAVIS's ``eva_vit_g.pth``), or ``tiny``
  (LAVIS's ``eva_vit.VisionTransformer`` with the dims of ``vit_tiny``; random weights);
* ``bert_dir``: ``config.json`` + ``vocab.txt`` of ``bert-base-uncased`` (Q-Former config and
  tokenizer; with ``qformer_init_from_bert`` also its weights, as LAVIS initialises it);
* ``t5_dir``: a FlanT5 directory (``config.json``, weights, ``tokenizer.json`` or
  ``spiece.model``);
* ``pretrained`` (with ``load_pretrained: true``): a LAVIS BLIP-2 checkpoint
  (``blip2_pretrained_flant5xl.pth``: Q-Former, query tokens, ``t5_proj``, ``ln_vision``).

LAVIS's ``init_Qformer``/``init_tokenizer``/``Blip2T5.__init__`` would fetch
``bert-base-uncased`` and ``t5_model`` from the hub; this class never calls them. A missing
path raises :class:`~lavis_c2f.common.errors.ConfigError` naming the key and the path.

Refiner batch (``samples``), built by :mod:`lavis_c2f.models.refiner.data`:

==================  =====================================  =====================================
key                 type / shape                           meaning
==================  =====================================  =====================================
``frames``          float (B, T, 3, H, W)                  key frames, BLIP-normalised, padded
``frame_mask``      float (B, T)                           1 = valid frame
``frame_times``     list of B lists (T_i floats)           seconds of the valid frames
``qid``/``query``/``vid``  lists (B)                       ids, raw query
``duration``        float (B,)                             video length, seconds
``region``          float (B, 2)                           search region (start, end) seconds
``stage2_windows``  list of B lists of [st, ed, score]     coarse windows (best first; may be [])
``captions``        list of B lists of ``Caption``         speech captions (any span; filtered here)
``target_windows``  list of B lists of (st, ed)            training answer (GT clipped to region)
``relevant_windows``  list of B lists of [st, ed]          raw GT (evaluation)
``stage2_saliency`` list of B (list or None)               passed through as pred_saliency_scores
==================  =====================================  =====================================

``forward(samples)`` returns ``{"loss"}`` (T5 cross-entropy of the answer text);
``predict_batch(samples)`` returns official prediction rows (eval mode required) and updates
:attr:`refine_stats` (refined / fallback counts); ``generate_text(samples)`` returns the raw
generations. Answer format and parsing: :mod:`lavis_c2f.models.refiner.parsing`.

Fine-tuning (``finetune``): ``lora`` (LoRA on T5 linear layers + ``t5_proj``; Q-Former frozen,
Mr. BLIP / CALCE's ``qformer_freeze_lora``), ``qformer`` (Q-Former, query tokens, ``t5_proj``,
``ln_vision``; T5 frozen, BLIP-2's own fine-tuning), ``lora_qformer`` (both), ``none``.
The ViT is always frozen unless ``freeze_vit: false``.
"""
from __future__ import annotations

import contextlib
import logging
import os
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import LayerNorm, disabled_train
from lavis.models.blip2_models.blip2_t5 import Blip2T5

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.refiner.lora import apply_lora
from lavis_c2f.models.refiner.parsing import (ParseConfig, ParseResult, RefineStats, parse_windows,
                                              windows_with_scores)
from lavis_c2f.models.refiner.prompt import PromptConfig, RefinerPrompt, build_prompt, format_windows
from lavis_c2f.paths import config_path, resolve_path

logger = logging.getLogger(__name__)

LAVIS_KEYS = {"arch", "model_type", "load_finetuned", "finetuned", "load_pretrained", "pretrained"}
FINETUNE_MODES = ("lora", "qformer", "lora_qformer", "none")
T5_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EVA_G = dict(patch_size=14, embed_dim=1408, depth=39, num_heads=1408 // 88, mlp_ratio=4.3637)
DEFAULTS: Dict[str, Any] = {
    "vit_model": "eva_clip_g", "vit_checkpoint": None, "vit_tiny": None, "image_size": 224,
    "vit_precision": "fp16", "drop_path_rate": 0.0, "use_grad_checkpoint": False, "freeze_vit": True,
    "tiny_assets": None, "bert_dir": None, "qformer_init_from_bert": False, "num_query_token": 32,
    "cross_attention_freq": 2, "t5_dir": None, "t5_precision": "bf16",
    "finetune": "lora", "lora": None, "prompt": None, "output": None, "generation": None,
    "max_piece_tokens": 512, "max_target_tokens": 64, "score_mode": "stage2",
    "keep_stage2_tail": True, "tail_iou_threshold": 0.7, "max_pred_windows": 10,
}
LORA_DEFAULTS = {"r": 8, "alpha": 8.0, "dropout": 0.05,
                 "target_modules": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]}
GENERATION_DEFAULTS = {"num_beams": 5, "max_new_tokens": 40, "min_length": 1,
                       "length_penalty": 1.0, "repetition_penalty": 1.0}
VIT_TINY_KEYS = {"patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"}


def _plain(cfg: Any) -> Dict[str, Any]:
    from lavis_c2f.data.cfg import to_plain

    d = to_plain(cfg) if cfg is not None else {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"model config must be a mapping, got {type(d).__name__}")
    return dict(d)


def _sub(cfg: Mapping[str, Any], key: str, defaults: Mapping[str, Any]) -> Dict[str, Any]:
    d = _plain(cfg.get(key)) if cfg.get(key) is not None else {}
    unknown = sorted(set(d) - set(defaults))
    if unknown:
        raise ConfigError(f"model.{key}: unknown key(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **d}


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


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # older LAVIS checkpoints hold non-tensor objects (argparse, numpy)
        return torch.load(path, map_location="cpu", weights_only=False)


def build_vision_encoder(vit_model: str, image_size: int, vit_checkpoint: Optional[str],
                         precision: str, drop_path_rate: float, use_grad_checkpoint: bool,
                         tiny: Optional[Mapping[str, Any]]) -> nn.Module:
    """LAVIS's EVA ViT (``eva_clip_g`` from a local checkpoint, or a ``tiny`` random one)."""
    from lavis.models.eva_vit import VisionTransformer, convert_weights_to_fp16, interpolate_pos_embed

    if vit_model == "eva_clip_g":
        path = _require_file(vit_checkpoint, "vit_checkpoint")
        dims = EVA_G
    elif vit_model == "tiny":
        t = _plain(tiny)
        unknown = sorted(set(t) - VIT_TINY_KEYS)
        missing = sorted(VIT_TINY_KEYS - set(t))
        if unknown or missing:
            raise ConfigError(f"model.vit_tiny: needs exactly {sorted(VIT_TINY_KEYS)} "
                              f"(unknown {unknown}, missing {missing})")
        dims, path = t, None
    else:
        raise ConfigError(f"model.vit_model: expected 'eva_clip_g' or 'tiny', got {vit_model!r}")
    vit = VisionTransformer(img_size=image_size, patch_size=int(dims["patch_size"]), use_mean_pooling=False,
                            embed_dim=int(dims["embed_dim"]), depth=int(dims["depth"]),
                            num_heads=int(dims["num_heads"]), mlp_ratio=float(dims["mlp_ratio"]),
                            qkv_bias=True, drop_path_rate=drop_path_rate,
                            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_checkpoint=use_grad_checkpoint)
    if path is not None:
        state = _torch_load(path)
        state = state.get("model", state) if isinstance(state, dict) else state
        interpolate_pos_embed(vit, state)
        msg = vit.load_state_dict(state, strict=False)
        if msg.missing_keys:
            raise ConfigError(f"model.vit_checkpoint: {path} is not an EVA ViT-g checkpoint "
                              f"(missing {msg.missing_keys[:5]}...)")
    if precision == "fp16":
        convert_weights_to_fp16(vit)
    elif precision != "fp32":
        raise ConfigError(f"model.vit_precision: expected 'fp16' or 'fp32', got {precision!r}")
    return vit


def build_qformer(bert_dir: str, num_query_token: int, vision_width: int, cross_attention_freq: int,
                  init_from_bert: bool) -> Tuple[nn.Module, nn.Parameter]:
    """LAVIS's Q-Former (``BertLMHeadModel`` with cross-attention) from a local BERT config."""
    from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

    cfg = BertConfig.from_pretrained(bert_dir, local_files_only=True)
    cfg.encoder_width = vision_width
    cfg.add_cross_attention = True
    cfg.cross_attention_freq = cross_attention_freq
    cfg.query_length = num_query_token
    if init_from_bert:
        _require_dir(bert_dir, "bert_dir", [("pytorch_model.bin", "model.safetensors")])
        qformer = BertLMHeadModel.from_pretrained(bert_dir, config=cfg, local_files_only=True)
    else:
        qformer = BertLMHeadModel(config=cfg)
    query_tokens = nn.Parameter(torch.zeros(1, num_query_token, cfg.hidden_size))
    query_tokens.data.normal_(mean=0.0, std=cfg.initializer_range)
    return qformer, query_tokens


def load_bert_tokenizer(bert_dir: str):
    """The Q-Former's BERT tokenizer (``vocab.txt``) with LAVIS's ``[DEC]`` bos token."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(bert_dir, local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def load_t5(t5_dir: str):
    """``(tokenizer, T5ForConditionalGeneration)`` (LAVIS's T5 with ``dense_act_fn='gelu'``)."""
    from lavis.models.blip2_models.modeling_t5 import T5Config, T5ForConditionalGeneration
    from transformers import T5Tokenizer, T5TokenizerFast

    if os.path.isfile(os.path.join(t5_dir, "tokenizer.json")):
        tok = T5TokenizerFast.from_pretrained(t5_dir, local_files_only=True)
    else:
        tok = T5Tokenizer.from_pretrained(t5_dir, local_files_only=True)
    cfg = T5Config.from_pretrained(t5_dir, local_files_only=True)
    cfg.dense_act_fn = "gelu"
    model = T5ForConditionalGeneration.from_pretrained(t5_dir, config=cfg, local_files_only=True)
    return tok, model


@registry.register_model("c2f_caption_refiner")
class C2FCaptionRefiner(Blip2T5):
    """Stage-3 refiner (see module doc). Build with :meth:`from_config`."""

    ARCH = "c2f_caption_refiner"
    PRETRAINED_MODEL_CONFIG_DICT = {
        "qvh_flant5xl": "models/c2f_caption_refiner_qvh_flant5xl.yaml",
        "tiny": "models/c2f_caption_refiner_tiny.yaml",
    }

    def __init__(self, *, vit_model: str = "eva_clip_g", vit_checkpoint: Optional[str] = None,
                 vit_tiny: Optional[Mapping[str, Any]] = None, image_size: int = 224,
                 vit_precision: str = "fp16", drop_path_rate: float = 0.0,
                 use_grad_checkpoint: bool = False, freeze_vit: bool = True,
                 bert_dir: Optional[str] = None, qformer_init_from_bert: bool = False,
                 num_query_token: int = 32, cross_attention_freq: int = 2,
                 t5_dir: Optional[str] = None, t5_precision: str = "bf16", finetune: str = "lora",
                 lora: Optional[Mapping[str, Any]] = None, prompt: Optional[PromptConfig] = None,
                 output: Optional[ParseConfig] = None, generation: Optional[Mapping[str, Any]] = None,
                 max_piece_tokens: int = 256, max_target_tokens: int = 64, score_mode: str = "stage2",
                 keep_stage2_tail: bool = True, tail_iou_threshold: float = 0.7,
                 max_pred_windows: int = 10):
        # Blip2T5.__init__ would download bert-base-uncased and the T5: build the same parts
        # from local paths instead (nn.Module init through Blip2Base/BaseModel).
        super(Blip2T5, self).__init__()
        if finetune not in FINETUNE_MODES:
            raise ConfigError(f"model.finetune: expected one of {FINETUNE_MODES}, got {finetune!r}")
        if t5_precision not in T5_DTYPES:
            raise ConfigError(f"model.t5_precision: expected one of {sorted(T5_DTYPES)}, got {t5_precision!r}")
        if score_mode not in ("stage2", "generation", "product"):
            raise ConfigError(f"model.score_mode: expected stage2, generation or product, got {score_mode!r}")
        bert_dir = _require_dir(bert_dir, "bert_dir", [("config.json",), ("vocab.txt",)])
        t5_dir = _require_dir(t5_dir, "t5_dir", [("config.json",),
                                                 ("pytorch_model.bin", "pytorch_model.bin.index.json",
                                                  "model.safetensors", "model.safetensors.index.json"),
                                                 ("tokenizer.json", "spiece.model")])
        self.tokenizer = load_bert_tokenizer(bert_dir)
        self.visual_encoder = build_vision_encoder(vit_model, image_size, vit_checkpoint, vit_precision,
                                                   drop_path_rate, use_grad_checkpoint, vit_tiny)
        self.ln_vision = LayerNorm(self.visual_encoder.num_features)
        self.freeze_vit = freeze_vit
        self.Qformer, self.query_tokens = build_qformer(bert_dir, num_query_token,
                                                        self.visual_encoder.num_features,
                                                        cross_attention_freq, qformer_init_from_bert)
        # the text path of the Q-Former is unused (as in Blip2T5)
        self.Qformer.cls = None
        self.Qformer.bert.embeddings.word_embeddings = None
        self.Qformer.bert.embeddings.position_embeddings = None
        for layer in self.Qformer.bert.encoder.layer:
            layer.output = None
            layer.intermediate = None
        self.t5_tokenizer, self.t5_model = load_t5(t5_dir)
        self.t5_dtype = T5_DTYPES[t5_precision]
        for p in self.t5_model.parameters():
            p.data = p.data.to(self.t5_dtype)
        self.t5_proj = nn.Linear(self.Qformer.config.hidden_size, self.t5_model.config.hidden_size)

        self.num_query_token = num_query_token
        self.finetune = finetune
        self.lora_cfg = {**LORA_DEFAULTS, **dict(lora or {})}
        self.lora_layers: List[str] = []
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
    def _set_trainable(self) -> None:
        """requires_grad per ``finetune`` (module doc); LoRA layers are inserted here."""
        for p in self.parameters():
            p.requires_grad = False
        if "lora" in self.finetune:
            self.lora_layers = apply_lora(self.t5_model, self.lora_cfg["target_modules"],
                                          r=int(self.lora_cfg["r"]), alpha=float(self.lora_cfg["alpha"]),
                                          dropout=float(self.lora_cfg["dropout"]))
        if "qformer" in self.finetune:
            for m in (self.Qformer, self.ln_vision):
                for p in m.parameters():
                    p.requires_grad = True
            self.query_tokens.requires_grad = True
        if self.finetune != "none":
            for p in self.t5_proj.parameters():
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
        ``load_finetuned: true`` + ``finetuned: PATH`` then loads a refiner checkpoint.
        """
        raw = _plain(cfg)
        unknown = sorted(set(raw) - set(DEFAULTS) - LAVIS_KEYS)
        if unknown:
            raise ConfigError(f"model: unknown key(s) {unknown} for {cls.ARCH}; known: "
                              f"{sorted(set(DEFAULTS) | LAVIS_KEYS)}")
        c = {**DEFAULTS, **{k: v for k, v in raw.items() if k in DEFAULTS}}
        if c["tiny_assets"]:  # a tiny random model: write its BERT/T5 folders (offline) if needed
            from lavis_c2f.models.refiner.tiny import make_tiny_assets

            root = c["tiny_assets"]
            if root == "auto":
                from lavis_c2f.paths import cache_root

                root = os.path.join(cache_root(), "tiny_refiner")
            assets = make_tiny_assets(resolve_path(root))
            c["bert_dir"] = c["bert_dir"] or assets["bert_dir"]
            c["t5_dir"] = c["t5_dir"] or assets["t5_dir"]
        kwargs = {k: v for k, v in c.items() if k != "tiny_assets"}
        kwargs["lora"] = _sub(c, "lora", LORA_DEFAULTS)
        kwargs["generation"] = _sub(c, "generation", GENERATION_DEFAULTS)
        kwargs["prompt"] = PromptConfig.from_mapping(_plain(c["prompt"]) if c["prompt"] else None)
        kwargs["output"] = ParseConfig.from_mapping(_plain(c["output"]) if c["output"] else None)
        kwargs["vit_tiny"] = _plain(c["vit_tiny"]) if c["vit_tiny"] is not None else None
        model = cls(**kwargs)
        model.config = {**c, "lora": kwargs["lora"], "generation": kwargs["generation"],
                        "prompt": kwargs["prompt"].to_dict(), "output": vars(kwargs["output"]).copy(),
                        "arch": cls.ARCH}
        if raw.get("load_pretrained") and raw.get("pretrained"):
            model.load_blip2_checkpoint(raw["pretrained"])
        if raw.get("load_finetuned") and raw.get("finetuned"):
            model.load_checkpoint(raw["finetuned"])
        return model

    # ------------------------------------------------------------------ checkpoints
    BLIP2_REQUIRED = ("Qformer.", "query_tokens", "t5_proj.", "ln_vision.")

    def load_blip2_checkpoint(self, path: str) -> Dict[str, List[str]]:
        """Load a LAVIS BLIP-2 T5 checkpoint (``{"model": state_dict}``); every Q-Former,
        query-token, ``t5_proj`` and ``ln_vision`` weight must be in it."""
        path = _require_file(path, "pretrained")
        ckpt = _torch_load(path)
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, Mapping):
            raise ConfigError(f"model.pretrained: {path} holds no state dict")
        own = self.state_dict()
        missing = [k for k in own if k.startswith(self.BLIP2_REQUIRED) and k not in state]
        if missing:
            raise ConfigError(f"model.pretrained: {path} is not a BLIP-2 checkpoint for this model: "
                              f"missing {len(missing)} keys, e.g. {missing[:5]}")
        shape_bad = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if shape_bad:
            raise ConfigError(f"model.pretrained: {path}: shape mismatch for {shape_bad[:5]}")
        msg = self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        unexpected = sorted(k for k in state if k not in own)
        logger.info("loaded BLIP-2 checkpoint %s (%d keys ignored)", path, len(unexpected))
        return {"missing": list(msg.missing_keys), "unexpected": unexpected}

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Only the trained tensors (LoRA factors, t5_proj, and the Q-Former when trained):
        a refiner checkpoint of a few MB instead of the full ~16 GB model."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_checkpoint(self, url_or_filename: str, strict: bool = True) -> Dict[str, List[str]]:
        """Load a refiner checkpoint (ours: trainable tensors; or a runner's full state dict).

        Every trainable parameter must be present and no key may be unknown (``strict``);
        frozen backbone weights may be absent (they come from the local backbones).
        """
        path = _require_file(url_or_filename, "finetuned")
        ckpt = _torch_load(path)
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, Mapping):
            raise ConfigError(f"model.finetuned: {path} holds no state dict")
        own = self.state_dict()
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        unexpected = sorted(k for k in state if k not in own)
        missing = sorted(k for k in trainable if k not in state)
        if strict and (unexpected or missing):
            raise ConfigError(f"model.finetuned: {path} does not match the model: missing trainable "
                              f"{missing[:8]}, unexpected {unexpected[:8]}")
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        return {"missing": missing, "unexpected": unexpected}

    # ------------------------------------------------------------------ encoding
    def _autocast(self, dtype: torch.dtype):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) frames -> (N, num_query_token, d_t5) T5-space frame tokens."""
        vit_dtype = next(self.visual_encoder.parameters()).dtype
        with self._autocast(torch.float16):
            x = frames.to(vit_dtype) if self.device.type != "cuda" else frames
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
        """Interleaved encoder inputs of a refiner batch.

        Returns:
            inputs_embeds (B, L, d_t5) in the T5 dtype, attention_mask (B, L) long (1 = valid,
            right padding), and the prompts.
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
        flat_emb = embed(torch.tensor(flat_ids, dtype=torch.long, device=device))
        eos_emb = flat_emb[-1:]
        offsets = [0]
        for ids in enc:
            offsets.append(offsets[-1] + len(ids))
        seqs: List[torch.Tensor] = []
        piece, frame_base = 0, 0
        dtype = self.t5_dtype
        for i, p in enumerate(prompts):
            parts = []
            for s in p.segments:
                if isinstance(s, int):
                    parts.append(frame_tok[frame_base + s].to(dtype))
                else:
                    parts.append(flat_emb[offsets[piece]:offsets[piece + 1]].to(dtype))
                    piece += 1
            parts.append(eos_emb.to(dtype))
            frame_base += int(valid[i].sum())
            seqs.append(torch.cat(parts, dim=0))
        length = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[-1]
        inputs = torch.zeros(b, length, d, dtype=dtype, device=device)
        att = torch.zeros(b, length, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            inputs[i, :s.shape[0]] = s
            att[i, :s.shape[0]] = 1
        return inputs, att, prompts

    def target_texts(self, samples: Mapping[str, Any]) -> List[str]:
        """The answer text of each sample (``[[st, ed], ...]`` or ``[]``)."""
        return [format_windows(w, self.prompt_cfg.time_decimals) for w in samples["target_windows"]]

    # ------------------------------------------------------------------ training
    def forward(self, samples: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """T5 cross-entropy of the answer text. Returns ``{"loss"}``."""
        inputs, att, _ = self.build_inputs(samples)
        targets = self.t5_tokenizer(self.target_texts(samples), padding="longest", truncation=True,
                                    max_length=self.max_target_tokens, return_tensors="pt").to(inputs.device)
        labels = targets.input_ids.masked_fill(targets.input_ids == self.t5_tokenizer.pad_token_id, -100)
        with self._autocast(torch.bfloat16):
            out = self.t5_model(inputs_embeds=inputs, attention_mask=att,
                                decoder_attention_mask=targets.attention_mask, labels=labels,
                                return_dict=True)
        return {"loss": out.loss}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate_text(self, samples: Mapping[str, Any], **overrides: Any) -> Tuple[List[str], List[float]]:
        """Raw generations and their confidence (exp of the length-normalised log-likelihood of
        the returned sequence), one per sample."""
        g = {**self.generation_cfg, **overrides}
        inputs, att, _ = self.build_inputs(samples)
        with self._autocast(torch.bfloat16):
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

    def refine_rows(self, samples: Mapping[str, Any], texts: Sequence[str],
                    confidences: Sequence[float]) -> Tuple[List[List[List[float]]], List[ParseResult]]:
        """Scored windows per sample from generations; a failed parse falls back to the
        stage-2 windows (or, without any, the search region scored 0). Updates refine_stats."""
        out, results = [], []
        for i, text in enumerate(texts):
            duration = float(samples["duration"][i])
            stage2 = [list(map(float, w)) for w in (samples.get("stage2_windows") or [[]] * len(texts))[i] or []]
            res = parse_windows(text, duration, self.parse_cfg)
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
