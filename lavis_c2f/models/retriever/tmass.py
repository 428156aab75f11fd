"""Stage-1 retriever ``c2f_tmass_retriever``: T-MASS with optional UCoFiA-style scoring.

T-MASS (Wang et al., "Text Is MASS: Modeling as Stochastic Embedding for Text-Video
Retrieval", CVPR 2024) over precomputed per-clip features (the "Retrieval batch" of
docs/ARCHITECTURE.md) or over a CLIP tower run end to end on frames (``clip_path``: a local
``CLIPModel`` folder; ``clip_config``: ``CLIPConfig`` arguments, weights from a checkpoint).

**Official T-MASS** is this model with ``text_proj: none``, ``video_proj: none``,
``embed_dim`` = the CLIP projection width, ``num_heads: 1``, ``logit_scale_source: clip``
(the loss uses CLIP's own logit scale, clamped to log 100 after every optimiser step) and
``inference_noise: per_pair``; :func:`~lavis_c2f.models.retriever.tmass_checkpoint.load_tmass_checkpoint`
builds it from an official ``model_best.pth`` (``tmass_checkpoint`` in YAML), and
``lavis_c2f/configs/models/c2f_tmass_official.yaml`` holds it. Its public methods
(:meth:`encode_text`, :meth:`encode_video`, :meth:`pooled_video`, :meth:`log_radius`,
:meth:`score`, :meth:`contrastive_losses`) reproduce the official code's numbers given the
same noise (``../shared/fixtures/tmass_reference``).

Pipeline for a query ``t`` and a video with frames ``f_1..f_F``:

1. **Encoders.** ``t = text_proj(txt_pooled)``, tokens ``w_j = text_proj(src_txt_j)``;
   clips are reduced to at most ``num_frames`` frames (``frame_sampling: uniform`` picks
   the clip at the centre of F equal segments, ``segment_mean`` averages each segment;
   shorter videos keep all clips) and projected, ``f_i = video_proj(clip_i)``. The
   projections are identity-initialised linear maps (``none`` skips them).
2. **Text-conditioned pooling** ``v(t) = Pool(t, f)``
   (:class:`~lavis_c2f.models.retriever.modules.TextConditionedPooling`).
3. **Stochastic text.** ``s_i = cos(t, f_i)``; ``R = exp(W s + b)``; ``t_s = t + eps * R``,
   ``eps`` from ``stochastic_prior``.
4. **Video-sentence score** ``cos(t_s, v(t))``. Training draws one ``eps`` per text, using
   the radius of its paired video (as the reference trainer). Inference (``inference_mode:
   trials``) draws ``num_trials`` noise vectors and keeps, per (query, video) pair, the best
   score (the reference keeps the trial most similar to the pooled video);
   ``deterministic`` uses ``eps = 0``. The trial noise (``inference_noise``):

   * ``shared`` (default): ``num_trials`` vectors from a generator seeded with ``eval_seed``,
     the same for every pair, so a pair's score does not depend on the batch, block or
     candidate set it is scored in: precomputable and what the corpus index uses.
   * ``per_pair``: fresh noise for every (text, video, trial), as the official evaluation
     draws it (``torch.rand_like`` per video and trial). Text row ``i`` draws its noise for
     the videos in order from its own generator seeded with ``(eval_seed, text_ids[i])``,
     so :meth:`score` of a whole (Q, V) matrix is reproducible, independent of query
     blocks and ranks when callers pass global ``text_ids`` (the task does); a re-ranked
     candidate subset would get other noise, hence :meth:`score_pairs` refuses it.
   * explicit: ``score(..., noise=N)`` with ``N`` (Q, V, K, D) (tests, the official noise).
5. **UCoFiA levels** (switches ``use_*``): frame-sentence = ISA over ``cos(t, f_i)``;
   frame-word = the two-way ISA of UCoFiA over the word-frame cosine matrix
   (per frame over words then over frames, and per word over frames then over words,
   averaged). ISA is :class:`~lavis_c2f.models.retriever.modules.InteractiveSimilarityAggregation`.
6. **Combination.** ``S = sum_l w_l S_l`` with ``w`` the ``weight_*`` of the enabled
   levels normalised to sum to 1. With ``sinkhorn: true`` each level is first
   normalised Sinkhorn-Knopp style: ``S = sum_l w_l (S_l / T + b_l(video))`` where
   ``b_l`` are per-video log column scalings (see "Sinkhorn at inference" below).

Training loss: symmetric InfoNCE on ``exp(logit_scale) * S`` (in-batch negatives;
``logit_scale`` learnable: the model's own (``logit_scale_source: own``) or CLIP's
(``clip``); clamped at ``logit_scale_max`` = log 100 as CLIP/the reference: in place before
each training forward, i.e. after the previous optimiser step as the reference does, and in
the loss),
plus ``support_loss_weight`` x the same loss with the support text
``t_sup = t + R * (vbar - t) / |vbar - t|`` in place of ``t_s`` (``vbar`` = the pooled video
averaged over the batch's texts, exactly as the reference trainer). Duplicate videos in a
batch (same ``vid`` for two queries) are masked out of both softmax denominators instead
of being treated as negatives; with ``vids=None`` (the reference) they stay negatives.

Sinkhorn at inference. Sinkhorn-Knopp is a corpus-level normalisation. :meth:`score`
assembles every level's full (Q, V) matrix from its blocks first and only then
normalises, so block size never changes the result. It uses, in this order:
``video_bias`` passed in (per-video, per-level log scalings computed once with
:meth:`compute_video_bias` from a query bank against the whole corpus, as UCoFiA does with
training queries), else the scored matrix itself (all Q queries against all V videos).
:meth:`score_pairs` (the index's re-ranking of per-query candidate subsets) cannot
normalise a subset meaningfully: it uses the stored bank biases when given and otherwise
zero biases (i.e. ``sum_l w_l S_l / T``).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from lavis.common.registry import registry
from torch import nn

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import to_plain
from lavis_c2f.models.base import C2FBaseModel
from lavis_c2f.models.checkpoint import model_node
from lavis_c2f.models.retriever.clip_towers import ClipTowers, build_clip_config, clip_config_from_path
from lavis_c2f.models.retriever.embeddings import TextEmbedding, VideoEmbedding
from lavis_c2f.models.retriever.modules import (
    InteractiveSimilarityAggregation, StochasticText, TextConditionedPooling, compact_valid, duplicate_mask,
    frame_dots, frame_selection_weights, identity_init_, l2norm, masked_mean, model_fingerprint, radius_bin_index,
    sinkhorn_video_bias, symmetric_infonce, two_way_isa)
from lavis_c2f.models.retriever.tmass_config import (INFERENCE_KEYS, LEVELS, TMASS_DEFAULTS, hashed_config,
                                                       hparams_from_config, validate_hparams)
from lavis_c2f.models.retriever.tmass_checkpoint import (
    load_tmass_state_dict, read_tmass_checkpoint, tmass_dims)
from lavis_c2f.paths import config_path, resolve_path

logger = logging.getLogger(__name__)

PER_PAIR_CHUNK = 256  # pairs whose (K, D) trial embeddings are materialised at once


def _plain_dict(x: Any) -> Dict[str, Any]:
    """A plain dict of a mapping or an OmegaConf node (``ConfigError`` otherwise)."""
    d = to_plain(x)
    if not isinstance(d, Mapping):
        raise ConfigError(f"model.clip_config: expected a mapping of CLIPConfig arguments, got {type(d).__name__}")
    return dict(d)


@dataclass
class _PreparedText:
    t: torch.Tensor                      # (Q, D) sentence
    t_hat: torch.Tensor                  # (Q, D) normalised sentence
    g: Optional[torch.Tensor]            # (Q, H, D) folded pooling queries
    words_hat: Optional[torch.Tensor]    # (Q, Lw, D)
    word_mask: Optional[torch.Tensor]    # (Q, Lw)

    def __getitem__(self, s: slice) -> "_PreparedText":
        return _PreparedText(self.t[s], self.t_hat[s], None if self.g is None else self.g[s],
                             None if self.words_hat is None else self.words_hat[s],
                             None if self.word_mask is None else self.word_mask[s])


@dataclass
class _PreparedVideo:
    frames: torch.Tensor                 # (V, F, D) float32 raw frames
    mu: Optional[torch.Tensor]           # (V, F) LN1 mean (pooling)
    inv_sigma: Optional[torch.Tensor]    # (V, F) LN1 1/std (pooling)
    inv_norm: torch.Tensor               # (V, F) 1/||f|| (cosines)
    mask: torch.Tensor                   # (V, F)
    bins: torch.Tensor                   # (V, num_frames) radius bin -> frame index
    has_frames: torch.Tensor             # (V,) float 1 if any valid frame


@registry.register_model("c2f_tmass_retriever")
class C2FTMassRetriever(C2FBaseModel):
    """T-MASS text-video retriever with UCoFiA-style multi-level scoring (see module doc).

    Args (all from the model YAML, see ``lavis_c2f/configs/models/c2f_tmass_default.yaml``):
        text_input_dim, video_input_dim: widths of ``txt_pooled``/``src_txt`` and ``src_vid``.
        embed_dim: joint width D.
        text_proj, video_proj: ``linear`` (identity-initialised, learnable) or ``none``
            (requires input dim == embed_dim).
        num_frames: frames per video after selection (and the radius layer's input width).
        frame_sampling: ``uniform`` | ``segment_mean``.
        num_heads, pool_dropout: cross-attention heads and dropout of the pooling block.
        stochastic_prior: ``uniform`` (U[0,1), the reference default) | ``normal``.
        prior_std: std of the normal prior.
        radius_bias_init: initial bias of the log-radius layer (reference: 0).
        support_loss_weight: weight of the support-text loss (reference MSR-VTT: 0.8).
        logit_scale_init, logit_scale_max: log of the softmax scale and its clamp.
        inference_mode: ``trials`` | ``deterministic``.
        num_trials: stochastic samples per pair at inference (reference: 20).
        trial_include_mean: add ``eps = 0`` as an extra trial (then trials >= deterministic).
        eval_seed: seed of the inference noise.
        use_video_sentence, use_frame_sentence, use_frame_word: score levels.
        weight_video_sentence, weight_frame_sentence, weight_frame_word: level weights.
        isa_temperature: ISA softmax temperature (UCoFiA: 0.01).
        max_words: token slots of the word-level ISA (longer queries keep their first tokens).
        sinkhorn, sinkhorn_iters, sinkhorn_temperature: per-level Sinkhorn-Knopp normalisation.
        score_block_size: (query, video) pairs scored at once by :meth:`score`.
        clip_path: local CLIPModel folder for end-to-end towers (None: features only).
        clip_config: ``CLIPConfig`` arguments of a randomly initialised tower (its weights
            come from a checkpoint); exclusive with ``clip_path``.
        freeze_clip: keep the CLIP towers frozen.
        logit_scale_source: ``own`` (a parameter of this model, from ``logit_scale_init``) |
            ``clip`` (the tower's ``logit_scale``, as the reference).
        inference_noise: ``shared`` | ``per_pair`` (see the module docstring).
        tmass_checkpoint: an official T-MASS checkpoint whose weights are loaded after
            construction (``from_config`` only; the keys are mapped and loaded strictly).
        mask_duplicate_videos: in training, the same video twice in a batch is a positive
            for both texts (masked out of the denominators); false: an ordinary negative, as
            the reference trainer.
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "default": config_path("models/c2f_tmass_default.yaml"),
        "ucofia": config_path("models/c2f_tmass_ucofia.yaml"),
        "demo": config_path("models/c2f_tmass_demo.yaml"),
        "official": config_path("models/c2f_tmass_official.yaml"),
    }

    DEFAULTS: Dict[str, Any] = TMASS_DEFAULTS
    #: config keys naming start-point weights that a checkpoint of ours replaces (models.checkpoint.load_model)
    START_WEIGHTS_KEYS = ("tmass_checkpoint",)

    def __init__(self, *, text_input_dim: int = 512, video_input_dim: int = 512, embed_dim: int = 512,
                 text_proj: str = "linear", video_proj: str = "linear", num_frames: int = 12,
                 frame_sampling: str = "uniform", num_heads: int = 1, pool_dropout: float = 0.3,
                 stochastic_prior: str = "uniform", prior_std: float = 1.0, radius_bias_init: float = 0.0,
                 support_loss_weight: float = 0.8, logit_scale_init: float = math.log(100.0),
                 logit_scale_max: float = math.log(100.0), inference_mode: str = "trials",
                 num_trials: int = 20, trial_include_mean: bool = False, eval_seed: int = 0,
                 use_video_sentence: bool = True, use_frame_sentence: bool = False,
                 use_frame_word: bool = False, weight_video_sentence: float = 1.0,
                 weight_frame_sentence: float = 1.0, weight_frame_word: float = 1.0,
                 isa_temperature: float = 0.01, max_words: int = 32, sinkhorn: bool = False,
                 sinkhorn_iters: int = 4, sinkhorn_temperature: float = 0.01, score_block_size: int = 4096,
                 clip_path: Optional[str] = None, freeze_clip: bool = True,
                 clip_config: Optional[Mapping[str, Any]] = None, logit_scale_source: str = "own",
                 inference_noise: str = "shared", tmass_checkpoint: Optional[str] = None,
                 mask_duplicate_videos: bool = True):
        super().__init__()
        self.hparams: Dict[str, Any] = dict(
            text_input_dim=int(text_input_dim), video_input_dim=int(video_input_dim), embed_dim=int(embed_dim),
            text_proj=str(text_proj), video_proj=str(video_proj), num_frames=int(num_frames),
            frame_sampling=str(frame_sampling), num_heads=int(num_heads), pool_dropout=float(pool_dropout),
            stochastic_prior=str(stochastic_prior), prior_std=float(prior_std),
            radius_bias_init=float(radius_bias_init), support_loss_weight=float(support_loss_weight),
            logit_scale_init=float(logit_scale_init), logit_scale_max=float(logit_scale_max),
            inference_mode=str(inference_mode), num_trials=int(num_trials),
            trial_include_mean=bool(trial_include_mean), eval_seed=int(eval_seed),
            use_video_sentence=bool(use_video_sentence), use_frame_sentence=bool(use_frame_sentence),
            use_frame_word=bool(use_frame_word), weight_video_sentence=float(weight_video_sentence),
            weight_frame_sentence=float(weight_frame_sentence), weight_frame_word=float(weight_frame_word),
            isa_temperature=float(isa_temperature), max_words=int(max_words), sinkhorn=bool(sinkhorn),
            sinkhorn_iters=int(sinkhorn_iters), sinkhorn_temperature=float(sinkhorn_temperature),
            score_block_size=int(score_block_size), clip_path=None if clip_path in (None, "") else str(clip_path),
            freeze_clip=bool(freeze_clip), clip_config=None if clip_config is None else _plain_dict(clip_config),
            logit_scale_source=str(logit_scale_source), inference_noise=str(inference_noise),
            tmass_checkpoint=None if tmass_checkpoint in (None, "") else str(tmass_checkpoint),
            mask_duplicate_videos=bool(mask_duplicate_videos))
        h = self.hparams
        validate_hparams(h)
        for k, v in h.items():
            setattr(self, k, v)

        self.clip = None
        if self.clip_path is not None or self.clip_config is not None:
            if self.clip_path is not None:
                self.clip = ClipTowers.from_path(resolve_path(self.clip_path), freeze=self.freeze_clip)
                src = "clip_path"
            else:
                self.clip = ClipTowers.from_config(self.clip_config, freeze=self.freeze_clip)
                src = "clip_config"
            p = self.clip.projection_dim
            for key in ("text_input_dim", "video_input_dim"):
                if h[key] != p:
                    raise ConfigError(f"model.{key}={h[key]} but the CLIP towers of {src} output {p}-d features")

        d = self.embed_dim
        self.text_projection = self._make_proj("text_proj", self.text_input_dim, d)
        self.video_projection = self._make_proj("video_proj", self.video_input_dim, d)
        self.pool = TextConditionedPooling(d, self.num_heads, self.pool_dropout)
        self.stochastic = StochasticText(self.num_frames, d, self.stochastic_prior, self.prior_std,
                                         self.radius_bias_init)
        if self.logit_scale_source == "own":
            self.logit_scale = nn.Parameter(torch.tensor(float(self.logit_scale_init)))
        if self.use_frame_sentence:
            self.isa_frame_sentence = InteractiveSimilarityAggregation(self.num_frames, self.isa_temperature)
        if self.use_frame_word:
            self.isa_fw_words_per_frame = InteractiveSimilarityAggregation(self.max_words, self.isa_temperature)
            self.isa_fw_frames_after_words = InteractiveSimilarityAggregation(self.num_frames, self.isa_temperature)
            self.isa_fw_frames_per_word = InteractiveSimilarityAggregation(self.num_frames, self.isa_temperature)
            self.isa_fw_words_after_frames = InteractiveSimilarityAggregation(self.max_words, self.isa_temperature)
        self._eps_cache: Dict[Tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, cfg) -> "C2FTMassRetriever":
        """Build from the ``model:`` section (a mapping / OmegaConf node), read by
        :func:`~lavis_c2f.models.retriever.tmass_config.hparams_from_config` (unknown keys and
        bad values raise :class:`ConfigError` naming them). ``tmass_checkpoint`` loads an
        official checkpoint's weights into the built model."""
        model = cls(**hparams_from_config(cfg))
        if model.tmass_checkpoint is not None:
            path = resolve_path(model.tmass_checkpoint)
            load_tmass_state_dict(model, read_tmass_checkpoint(path), source=path)
        return model

    @property
    def _device(self) -> torch.device:
        return self.stochastic.linear_proj.weight.device

    def log_logit_scale(self) -> nn.Parameter:
        """The learnable log softmax scale of the loss: the model's own or CLIP's
        (``logit_scale_source``)."""
        return self.clip.logit_scale if self.logit_scale_source == "clip" else self.logit_scale

    def _make_proj(self, key: str, din: int, dout: int) -> Optional[nn.Linear]:
        if self.hparams[key] == "none":
            return None
        return identity_init_(nn.Linear(din, dout))

    @property
    def levels(self) -> List[str]:
        """Enabled score levels, in :data:`LEVELS` order."""
        return [lv for lv in LEVELS if self.hparams[f"use_{lv}"]]

    def level_weights(self) -> Dict[str, float]:
        """Weights of the enabled levels, normalised to sum to 1."""
        w = {lv: self.hparams[f"weight_{lv}"] for lv in self.levels}
        tot = sum(w.values())
        return {k: v / tot for k, v in w.items()}

    def configure_inference(self, **kwargs: Any) -> "C2FTMassRetriever":
        """Change inference-only settings (:data:`INFERENCE_KEYS`) in place; other keys raise
        :class:`ConfigError`. Returns ``self``."""
        bad = sorted(set(kwargs) - set(INFERENCE_KEYS))
        if bad:
            raise ConfigError(f"configure_inference: not an inference setting: {bad}; allowed: {list(INFERENCE_KEYS)}")
        h = dict(self.hparams)
        for k, v in kwargs.items():
            h[k] = type(self.DEFAULTS[k])(v)
        validate_hparams(h)
        self.hparams = h
        for k in kwargs:
            setattr(self, k, h[k])
        self._eps_cache.clear()
        return self

    def inference_settings(self) -> Dict[str, Any]:
        """The current values of :data:`INFERENCE_KEYS`."""
        return {k: self.hparams[k] for k in INFERENCE_KEYS}

    def fingerprint(self) -> Dict[str, str]:
        """``{"arch", "config_hash", "weights_hash"}`` identifying what stored video embeddings
        depend on: every config key except :data:`INFERENCE_KEYS` / paths, and all weights (the
        corpus index refuses a model whose fingerprint differs)."""
        return model_fingerprint("c2f_tmass_retriever", hashed_config(self.hparams), self.state_dict())

    # ------------------------------------------------------------------ encoders
    def _project(self, proj: Optional[nn.Linear], x: torch.Tensor) -> torch.Tensor:
        return x if proj is None else proj(x)

    def encode_text(self, src_txt: Optional[torch.Tensor] = None, src_txt_mask: Optional[torch.Tensor] = None,
                    txt_pooled: Optional[torch.Tensor] = None, *, input_ids: Optional[torch.Tensor] = None,
                    attention_mask: Optional[torch.Tensor] = None) -> TextEmbedding:
        """Encode queries.

        Args:
            src_txt: (B, Lt, Dt) token features (needed by the frame-word level).
            src_txt_mask: (B, Lt) 1 = valid token (default: all valid).
            txt_pooled: (B, Dt) sentence features; if None, the masked mean of ``src_txt``.
            input_ids, attention_mask: (B, Lt) CLIP token ids (only with ``clip_path``);
                replace the three feature arguments.
        Returns:
            :class:`TextEmbedding` with sentence (B, D) and, when tokens were given, the
            first ``max_words`` valid tokens (B, Lw, D).
        """
        if input_ids is not None:
            if self.clip is None:
                raise ValueError("input_ids given but the model has no CLIP tower "
                                 "(neither clip_path nor clip_config is set)")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            src_txt, src_txt_mask, txt_pooled = self.clip.encode_text(input_ids, attention_mask)
        if src_txt is None and txt_pooled is None:
            raise ValueError("encode_text needs txt_pooled and/or src_txt")
        dev = self._device
        tokens = tmask = None
        if src_txt is not None:
            if src_txt.ndim != 3 or src_txt.shape[-1] != self.text_input_dim:
                raise ValueError(f"src_txt must be (B, Lt, {self.text_input_dim}), got {tuple(src_txt.shape)}")
            src_txt = src_txt.to(dev, torch.float32)
            if src_txt_mask is None:
                src_txt_mask = torch.ones(src_txt.shape[:2], device=dev)
            src_txt_mask = src_txt_mask.to(dev, torch.float32)
            if tuple(src_txt_mask.shape) != tuple(src_txt.shape[:2]):
                raise ValueError(f"src_txt_mask must be {tuple(src_txt.shape[:2])}, got {tuple(src_txt_mask.shape)}")
            tok, tmask = compact_valid(src_txt, src_txt_mask, self.max_words)
            tokens = self._project(self.text_projection, tok) * tmask.unsqueeze(-1)
            if txt_pooled is None:
                txt_pooled = masked_mean(src_txt, src_txt_mask, dim=1)
        if txt_pooled.ndim != 2 or txt_pooled.shape[-1] != self.text_input_dim:
            raise ValueError(f"txt_pooled must be (B, {self.text_input_dim}), got {tuple(txt_pooled.shape)}")
        if tokens is not None and tokens.shape[0] != txt_pooled.shape[0]:
            raise ValueError(f"src_txt has {tokens.shape[0]} rows but txt_pooled {txt_pooled.shape[0]}")
        sentence = self._project(self.text_projection, txt_pooled.to(dev, torch.float32))
        return TextEmbedding(sentence, tokens, tmask)

    def encode_video(self, src_vid: Optional[torch.Tensor] = None, src_vid_mask: Optional[torch.Tensor] = None,
                     *, pixel_values: Optional[torch.Tensor] = None,
                     pixel_mask: Optional[torch.Tensor] = None) -> VideoEmbedding:
        """Encode videos.

        Args:
            src_vid: (B, Lv, Dv) per-clip features (no TEF columns).
            src_vid_mask: (B, Lv) 1 = valid clip (default: all valid). All-padding rows are
                allowed (empty videos).
            pixel_values, pixel_mask: (B, Lf, 3, H, W) frames and (B, Lf) mask for the CLIP
                towers (only with ``clip_path``); replace ``src_vid``/``src_vid_mask``.
        Returns:
            :class:`VideoEmbedding` (frames (B, F, D) with F <= ``num_frames``, mask, pooled).
        """
        dev = self._device
        if pixel_values is not None:
            if self.clip is None:
                raise ValueError("pixel_values given but the model has no CLIP tower "
                                 "(neither clip_path nor clip_config is set)")
            if pixel_values.ndim != 5:
                raise ValueError(f"pixel_values must be (B, Lf, 3, H, W), got {tuple(pixel_values.shape)}")
            size = self.clip.image_size
            if tuple(pixel_values.shape[-2:]) != (size, size):
                raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])} frames but the CLIP tower "
                                 f"expects {size}x{size} (the dataset's image_size)")
            b, lf = pixel_values.shape[:2]
            mask = (torch.ones(b, lf, device=dev) if pixel_mask is None else pixel_mask.to(dev, torch.float32))
            weights, fmask = frame_selection_weights(mask, self.num_frames, self.frame_sampling)
            used = weights.sum(1) > 0                                          # (B, Lf) clips any frame uses
            feats = torch.zeros(b, lf, self.video_input_dim, device=dev)
            if bool(used.any()):
                px = pixel_values.to(dev)[used]
                feats[used] = self.clip.encode_frames(px).to(torch.float32)
            clips = torch.bmm(weights, feats)
        else:
            if src_vid is None:
                raise ValueError("encode_video needs src_vid (or pixel_values with CLIP towers)")
            if src_vid.ndim != 3 or src_vid.shape[-1] != self.video_input_dim:
                raise ValueError(f"src_vid must be (B, Lv, {self.video_input_dim}), got {tuple(src_vid.shape)}")
            src_vid = src_vid.to(dev, torch.float32)
            mask = (torch.ones(src_vid.shape[:2], device=dev) if src_vid_mask is None
                    else src_vid_mask.to(dev, torch.float32))
            if tuple(mask.shape) != tuple(src_vid.shape[:2]):
                raise ValueError(f"src_vid_mask must be {tuple(src_vid.shape[:2])}, got {tuple(mask.shape)}")
            weights, fmask = frame_selection_weights(mask, self.num_frames, self.frame_sampling)
            clips = torch.bmm(weights.to(dev), src_vid)
        fmask = fmask.to(dev)
        frames = self._project(self.video_projection, clips) * fmask.unsqueeze(-1)
        pooled = l2norm(masked_mean(l2norm(frames.detach().float()), fmask, dim=1))
        return VideoEmbedding(frames, fmask, pooled)

    def prefilter_vectors(self, video_emb: VideoEmbedding) -> torch.Tensor:
        """(V, D) float32 L2-normalised query-independent video vectors for the ANN pre-filter
        (mean of the normalised frames)."""
        return l2norm(video_emb.pooled.detach().float())

    def prefilter_segment_vectors(self, video_emb: VideoEmbedding, num_segments: int
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Multi-vector pre-filter: each video's valid frames split into ``num_segments``
        contiguous segments (``[floor(s n / S), floor((s+1) n / S))`` of its n frames), each
        represented by the normalised mean of its L2-normalised frames.

        T-MASS pools frames with query-dependent attention, so a query matching one event of
        a long video scores high even though the event is diluted in the whole-video mean;
        scoring a video by its best segment (max inner product) tracks that far better.
        ``num_segments = 1`` equals :meth:`prefilter_vectors`.

        Returns:
            vectors (V, S, D) float32 (zero rows for empty segments) and valid (V, S) bool.
        """
        s_n = int(num_segments)
        if s_n < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        frames = l2norm(video_emb.frames.detach().float())
        mask = video_emb.mask.detach().float()
        n = mask.sum(-1).round().long()                                            # (V,)
        j = torch.arange(frames.shape[1], device=frames.device).view(1, 1, -1)     # (1, 1, F)
        seg = torch.arange(s_n, device=frames.device).view(1, -1, 1)              # (1, S, 1)
        start = torch.div(seg * n.view(-1, 1, 1), s_n, rounding_mode="floor")
        end = torch.div((seg + 1) * n.view(-1, 1, 1), s_n, rounding_mode="floor")
        w = ((j >= start) & (j < end)).float() * mask.unsqueeze(1)                  # (V, S, F)
        count = w.sum(-1)
        vec = l2norm(torch.bmm(w, frames) / count.clamp_min(1.0).unsqueeze(-1))
        return vec, count > 0

    def prefilter_query(self, text_emb: TextEmbedding) -> torch.Tensor:
        """(Q, D) float32 L2-normalised query vectors for the ANN pre-filter (the sentence)."""
        return l2norm(text_emb.sentence.detach().float())

    # ------------------------------------------------------------------ shared scoring parts
    def _prepare_text(self, text: TextEmbedding) -> _PreparedText:
        t = text.sentence
        g = self.pool.prepare_text(t) if self.use_video_sentence else None
        words_hat = wmask = None
        if self.use_frame_word:
            if text.tokens is None:
                raise ValueError("the frame_word level needs token features (src_txt) in the text embedding")
            words_hat, wmask = l2norm(text.tokens), text.token_mask
        return _PreparedText(t, l2norm(t), g, words_hat, wmask)

    def _prepare_video(self, video: VideoEmbedding) -> _PreparedVideo:
        frames = video.frames.to(self._device, torch.float32)
        mask = video.mask.to(frames.device, torch.float32)
        lengths = mask.sum(-1).round().long()
        norms = frames.norm(dim=-1)
        mu = inv_sigma = None
        if self.use_video_sentence:
            mu, inv_sigma = self.pool.frame_stats(frames, norms)
        return _PreparedVideo(
            frames=frames, mu=mu, inv_sigma=inv_sigma, inv_norm=1.0 / norms.clamp_min(1e-8),
            mask=mask, bins=radius_bin_index(lengths, self.num_frames), has_frames=(lengths > 0).to(frames.dtype))

    def _cosines(self, x: torch.Tensor, pv: _PreparedVideo, qi: Optional[torch.Tensor],
                 vi: Optional[torch.Tensor]) -> torch.Tensor:
        """Cosines of L2-normalised query-side vectors x (Q, A, D) with every frame of the
        paired video -> (P, A, F)."""
        nq = x.shape[0]
        inv = pv.inv_norm.repeat(nq, 1) if vi is None else pv.inv_norm[vi]
        return frame_dots(x, pv.frames, qi, vi) * inv.unsqueeze(1)

    @staticmethod
    def _query_rows(x: torch.Tensor, qi: Optional[torch.Tensor], nv: int) -> torch.Tensor:
        """Per-pair rows of a per-query tensor (grid: pair p = q * nv + v)."""
        return x[qi] if qi is not None else x.repeat_interleave(nv, dim=0)

    def _log_radius_rows(self, sims_tf: torch.Tensor, pv: _PreparedVideo, vrows: Optional[torch.Tensor],
                         nq: int) -> torch.Tensor:
        """Text-frame cosines (P, F) -> log radius ``W s + b`` (P, D) (bins resampled per video)."""
        if vrows is None:  # grid: video index of pair p is p % V
            vrows = torch.arange(pv.mask.shape[0], device=sims_tf.device).repeat(nq)
        bins, has = pv.bins[vrows], pv.has_frames[vrows]
        s = torch.gather(sims_tf, 1, bins.clamp_max(sims_tf.shape[1] - 1)) * has.unsqueeze(-1)
        return self.stochastic.log_radius(s)

    def _radius(self, sims_tf: torch.Tensor, pv: _PreparedVideo, vrows: Optional[torch.Tensor],
                nq: int) -> torch.Tensor:
        """Text-frame cosines (P, F) -> radius ``R = exp(W s + b)`` (P, D)."""
        return torch.exp(self._log_radius_rows(sims_tf, pv, vrows, nq))

    def _frame_mask_rows(self, pv: _PreparedVideo, vi: Optional[torch.Tensor], nq: int) -> torch.Tensor:
        return pv.mask[vi] if vi is not None else pv.mask.repeat(nq, 1)

    def _frame_word_level(self, pt: _PreparedText, pv: _PreparedVideo, qi, vi) -> torch.Tensor:
        nq, nv = pt.t.shape[0], pv.mask.shape[0]
        sims = self._cosines(pt.words_hat, pv, qi, vi)                               # (P, Lw, F)
        wmask = self._query_rows(pt.word_mask, qi, nv)
        fmask = self._frame_mask_rows(pv, vi, nq)
        return two_way_isa(sims, wmask, fmask, self.isa_fw_words_per_frame, self.isa_fw_frames_after_words,
                           self.isa_fw_frames_per_word, self.isa_fw_words_after_frames)

    # ------------------------------------------------------------------ training
    def forward(self, samples: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """Training step on a Retrieval batch (in-batch negatives).

        Keys: ``src_txt``/``src_txt_mask``/``txt_pooled`` (or ``txt_input_ids``/
        ``txt_attention_mask`` with CLIP towers), ``src_vid``/``src_vid_mask`` (or
        ``vid_pixels``/``vid_pixels_mask``), optional ``vid`` (list; duplicates masked when
        ``mask_duplicate_videos``). Returns ``{"loss", "loss_nce", "loss_support", "logit_scale"}``.
        """
        text = self.encode_text_batch(samples)
        video = self.encode_video_batch(samples)
        return self.contrastive_losses(text, video, samples.get("vid") if self.mask_duplicate_videos else None)

    def encode_text_batch(self, batch: Mapping[str, Any]) -> TextEmbedding:
        """The queries of a retrieval batch: CLIP token ids (``txt_input_ids``,
        ``txt_attention_mask``) when present, else features (``src_txt``, ``src_txt_mask``,
        ``txt_pooled``)."""
        if batch.get("txt_input_ids") is not None:
            return self.encode_text(input_ids=batch["txt_input_ids"], attention_mask=batch.get("txt_attention_mask"))
        return self.encode_text(batch.get("src_txt"), batch.get("src_txt_mask"), batch.get("txt_pooled"))

    def encode_video_batch(self, batch: Mapping[str, Any]) -> VideoEmbedding:
        """The videos of a retrieval batch: frames (``vid_pixels``, ``vid_pixels_mask``) when
        present, else clip features (``src_vid``, ``src_vid_mask``)."""
        if batch.get("vid_pixels") is not None:
            return self.encode_video(pixel_values=batch["vid_pixels"], pixel_mask=batch.get("vid_pixels_mask"))
        if batch.get("src_vid") is None:
            raise KeyError("the retrieval batch has neither 'src_vid' nor 'vid_pixels'")
        return self.encode_video(batch["src_vid"], batch.get("src_vid_mask"))

    def pooled_video(self, text: TextEmbedding, video: VideoEmbedding) -> torch.Tensor:
        """(T, V, D) text-conditioned pooled videos, ``[t, v] = Pool(t, frames of v)`` (the
        reference's ``pool_frames`` output is [video, text]); dropout in training mode only."""
        pt, pv = self._prepare_text(text), self._prepare_video(video)
        g = pt.g if pt.g is not None else self.pool.prepare_text(pt.t)
        mu, inv_sigma = (pv.mu, pv.inv_sigma) if pv.mu is not None else self.pool.frame_stats(pv.frames)
        return self.pool.pool(g, pv.frames, mu, inv_sigma, pv.mask).view(len(text), len(video), -1)

    def log_radius(self, text: TextEmbedding, video: VideoEmbedding) -> torch.Tensor:
        """(T, V, D) ``log R = W s + b`` of every (text, video) pair, ``s`` the cosines of the
        text with the video's frames (the reference's ``log_var``; the radius is ``exp`` of it)."""
        pt, pv = self._prepare_text(text), self._prepare_video(video)
        sims = self._cosines(pt.t_hat.unsqueeze(1), pv, None, None)[:, 0]                # (T*V, F)
        return self._log_radius_rows(sims, pv, None, len(text)).view(len(text), len(video), -1)

    def contrastive_losses(self, text: TextEmbedding, video: VideoEmbedding, vids=None,
                           noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Losses for B aligned (text, video) pairs (module docstring).

        Args:
            text, video: B texts and their B videos (pair b = text b with video b).
            vids: B video ids; equal ids are masked as positives (None: all other items are
                negatives, as the reference).
            noise: (B, D) ``eps`` of the stochastic texts (default: drawn from the prior).
        Returns:
            ``{"loss" = loss_nce + support_loss_weight * loss_support, "loss_nce",
            "loss_support", "logit_scale"}`` (all but ``loss`` detached).
        """
        b = len(text)
        if len(video) != b:
            raise ValueError(f"{b} texts but {len(video)} videos in the batch")
        pt, pv = self._prepare_text(text), self._prepare_video(video)
        w = self.level_weights()
        sims_tf = self._cosines(pt.t_hat.unsqueeze(1), pv, None, None)[:, 0]          # (B*B, F) grid
        fmask = self._frame_mask_rows(pv, None, b)
        levels: Dict[str, torch.Tensor] = {}
        s_support = None
        if self.use_video_sentence:
            pooled = self.pool.pool(pt.g, pv.frames, pv.mu, pv.inv_sigma, pv.mask).view(b, b, -1)  # [text i, video j]
            diag = torch.arange(b, device=pooled.device)
            sims_diag = sims_tf.view(b, b, -1)[diag, diag]                           # (B, F) paired video
            radius = self._radius(sims_diag, pv, diag, b)                            # (B, D)
            if noise is None:
                eps = self.stochastic.sample_eps(tuple(pt.t.shape), device=pt.t.device)
            else:
                eps = noise.to(pt.t.device, pt.t.dtype)
                if tuple(eps.shape) != tuple(pt.t.shape):
                    raise ValueError(f"noise must be {tuple(pt.t.shape)} (B, D), got {tuple(eps.shape)}")
            t_s = pt.t + eps * radius
            levels["video_sentence"] = torch.cosine_similarity(t_s.unsqueeze(1), pooled, dim=-1, eps=1e-8)
            if self.support_loss_weight > 0:
                vbar = pooled.mean(0)                                                 # (B_v, D) over texts
                t_sup = pt.t + l2norm(vbar - pt.t) * radius
                s_support = torch.cosine_similarity(t_sup.unsqueeze(1), pooled, dim=-1, eps=1e-8)
        if self.use_frame_sentence:
            levels["frame_sentence"] = self.isa_frame_sentence(sims_tf, fmask).view(b, b)
        if self.use_frame_word:
            levels["frame_word"] = self._frame_word_level(pt, pv, None, None).view(b, b)
        sims = sum(w[k] * levels[k] for k in levels)
        log_scale = self.log_logit_scale()
        if self.training:  # the reference clamps after each optimiser step: before the next forward
            with torch.no_grad():
                log_scale.clamp_(max=self.logit_scale_max)
        scale = log_scale.clamp(max=self.logit_scale_max).exp()
        dup = duplicate_mask(vids)
        loss_nce = symmetric_infonce(scale * sims, dup)
        if s_support is not None:
            sims_sup = sims - w["video_sentence"] * levels["video_sentence"] + w["video_sentence"] * s_support
            loss_support = symmetric_infonce(scale * sims_sup, dup)
        else:
            loss_support = torch.zeros((), device=loss_nce.device)
        loss = loss_nce + self.support_loss_weight * loss_support
        return {"loss": loss, "loss_nce": loss_nce.detach(), "loss_support": loss_support.detach(),
                "logit_scale": scale.detach()}

    # ------------------------------------------------------------------ inference
    def trial_noise(self, device=None) -> torch.Tensor:
        """(K, D) inference noise: ``num_trials`` draws from the prior with a generator seeded
        by ``eval_seed`` (plus a leading zero row with ``trial_include_mean``). The first k rows
        for ``num_trials = n`` equal those for any larger ``num_trials``."""
        device = torch.device(device) if device is not None else self._device
        key = (self.num_trials, self.embed_dim, self.eval_seed, self.stochastic_prior, self.prior_std,
               self.trial_include_mean, str(device))
        eps = self._eps_cache.get(key)
        if eps is None:
            g = torch.Generator(device="cpu").manual_seed(self.eval_seed)
            rows = [self.stochastic.sample_eps((1, self.embed_dim), generator=g) for _ in range(self.num_trials)]
            eps = torch.cat(rows)
            if self.trial_include_mean:
                eps = torch.cat([torch.zeros(1, self.embed_dim), eps])
            eps = eps.to(device)
            self._eps_cache[key] = eps
        return eps

    def text_noise_generator(self, text_id: Any) -> torch.Generator:
        """CPU generator of the ``per_pair`` noise of one text: seeded with a hash of
        ``(eval_seed, text_id)``."""
        h = hashlib.blake2b(repr((self.eval_seed, text_id)).encode("utf-8"), digest_size=8).digest()
        return torch.Generator(device="cpu").manual_seed(int.from_bytes(h, "little") >> 1)

    def _per_pair_noise(self, gens: List[torch.Generator], n_videos: int) -> torch.Tensor:
        """(len(gens) * n_videos, K, D) per-pair noise: each text's generator draws the next
        ``n_videos`` videos' (K, D) blocks, in video order."""
        k, d = self.num_trials, self.embed_dim
        eps = torch.empty(len(gens), n_videos, k, d)
        for i, g in enumerate(gens):
            self.stochastic.sample_eps_rows(n_videos, (k, d), g, out=eps[i])
        return eps.reshape(-1, k, d).to(self._device)

    def _video_sentence_scores(self, pt: _PreparedText, pv: _PreparedVideo, qi, vi, sims_tf,
                               dots: Optional[torch.Tensor] = None,
                               pair_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        nq, nv = pt.t.shape[0], pv.mask.shape[0]
        pooled = self.pool.pool(pt.g, pv.frames, pv.mu, pv.inv_sigma, pv.mask, qi, vi, dropout=False,
                                dots=dots)                                                # (P, D)
        tq = self._query_rows(pt.t, qi, nv)
        if self.inference_mode == "deterministic":
            return torch.cosine_similarity(tq, pooled, dim=-1, eps=1e-8)
        radius = self._radius(sims_tf, pv, vi, nq)                                        # (P, D)
        if pair_noise is not None:                                                        # (P, K, D)
            if self.trial_include_mean:
                pair_noise = torch.cat([pair_noise.new_zeros(pair_noise.shape[0], 1, pair_noise.shape[2]),
                                        pair_noise], dim=1)
            out = torch.empty(pooled.shape[0], device=pooled.device)
            for c0 in range(0, pooled.shape[0], PER_PAIR_CHUNK):
                c1 = min(pooled.shape[0], c0 + PER_PAIR_CHUNK)
                trials = tq[c0:c1, None] + pair_noise[c0:c1] * radius[c0:c1, None]       # (c, K, D)
                cos = torch.cosine_similarity(trials, pooled[c0:c1, None], dim=-1, eps=1e-8)
                out[c0:c1] = cos.max(dim=1).values
            return out
        eps = self.trial_noise(pooled.device)                                             # (K, D)
        et = eps.t()
        rp, rt = radius * pooled, radius * tq
        num = (tq * pooled).sum(-1, keepdim=True) + rp @ et                               # (P, K)
        ts_sq = (tq * tq).sum(-1, keepdim=True) + 2.0 * (rt @ et) + (radius * radius) @ (et * et)
        denom = ts_sq.clamp_min(0).sqrt().clamp_min(1e-8) * pooled.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return (num / denom).max(dim=1).values

    def _pair_levels(self, pt: _PreparedText, pv: _PreparedVideo, qi: Optional[torch.Tensor],
                     vi: Optional[torch.Tensor], pair_noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Raw per-level scores (P,) for grid (qi = vi = None) or explicit pairs;
        ``pair_noise`` (P, K, D) replaces the shared trial noise."""
        nq = pt.t.shape[0]
        out: Dict[str, torch.Tensor] = {}
        sims_tf = dots = None
        need_cos = self.use_frame_sentence or (self.use_video_sentence and self.inference_mode == "trials")
        if self.use_video_sentence:
            h = pt.g.shape[1]
            x = torch.cat([pt.g, pt.t_hat.unsqueeze(1)], dim=1) if need_cos else pt.g
            raw = frame_dots(x, pv.frames, qi, vi)                                            # (P, H[+1], F)
            dots = raw[:, :h]
            if need_cos:
                inv = pv.inv_norm.repeat(nq, 1) if vi is None else pv.inv_norm[vi]
                sims_tf = raw[:, h] * inv
        elif need_cos:
            sims_tf = self._cosines(pt.t_hat.unsqueeze(1), pv, qi, vi)[:, 0]                   # (P, F)
        if self.use_video_sentence:
            out["video_sentence"] = self._video_sentence_scores(pt, pv, qi, vi, sims_tf, dots, pair_noise)
        if self.use_frame_sentence:
            out["frame_sentence"] = self.isa_frame_sentence(sims_tf, self._frame_mask_rows(pv, vi, nq))
        if self.use_frame_word:
            out["frame_word"] = self._frame_word_level(pt, pv, qi, vi)
        return out

    def _combine(self, levels: Mapping[str, torch.Tensor], bias: Optional[torch.Tensor],
                 self_normalise: bool) -> torch.Tensor:
        """Weighted sum of level scores; with ``sinkhorn`` each level becomes ``S / T + b``.

        levels: name -> (Q, V) (grid) or (P,) (pairs). bias: (V, L) / (P, L) per-level log
        column scalings in :attr:`levels` order, or None.
        """
        w = self.level_weights()
        if not self.sinkhorn:
            return sum(w[k] * levels[k] for k in self.levels)
        total = None
        for li, k in enumerate(self.levels):
            s = levels[k] / self.sinkhorn_temperature
            if bias is not None:
                b = bias[..., li]
                s = s + (b.unsqueeze(0) if s.ndim == 2 else b)
            elif self_normalise and s.ndim == 2 and s.shape[0] > 0 and s.shape[1] > 0:
                s = s + sinkhorn_video_bias(levels[k], self.sinkhorn_temperature, self.sinkhorn_iters).unsqueeze(0)
            total = w[k] * s if total is None else total + w[k] * s
        return total

    def _check_bias(self, bias: Optional[torch.Tensor], n: int, what: str) -> Optional[torch.Tensor]:
        if bias is None:
            return None
        bias = torch.as_tensor(bias, dtype=torch.float32, device=self._device)
        if tuple(bias.shape) != (n, len(self.levels)):
            raise ValueError(f"video_bias must be ({n}, {len(self.levels)}) for {what}, got {tuple(bias.shape)}")
        return bias

    @torch.no_grad()
    def score(self, text_emb: TextEmbedding, video_emb: VideoEmbedding, block_size: Optional[int] = None,
              video_bias: Optional[torch.Tensor] = None, return_levels: bool = False,
              noise: Optional[torch.Tensor] = None, text_ids: Optional[Sequence[Any]] = None):
        """Exact scores of every query against every video, computed in blocks.

        The video-sentence score of (t, v) is ``max_k cos(t + eps_k * R(t, v), Pool(t, v))``
        (``trials``) with the noise of ``inference_noise`` (module docstring).

        Args:
            text_emb: Q queries. video_emb: V videos.
            block_size: (query, video) pairs per block (default ``score_block_size``); memory
                stays O(block_size * (F + K) * D) besides the (Q, V) outputs.
            video_bias: optional (V, L) per-level Sinkhorn log scalings from
                :meth:`compute_video_bias` (used when ``sinkhorn`` is on).
            return_levels: also return the raw per-level (Q, V) matrices.
            noise: (Q, V, K, D) explicit trial noise of every pair (overrides
                ``inference_noise``; ``K`` may differ from ``num_trials``).
            text_ids: Q keys of the ``per_pair`` noise generators (default: 0..Q-1); pass
                global ids so that scores do not depend on how queries are split into calls.
        Returns:
            (Q, V) float32 scores (higher = better) on the model's device, and with
            ``return_levels`` a dict level -> (Q, V).
        """
        dev = self._device
        text_emb, video_emb = text_emb.to(dev), video_emb.to(dev)
        nq, nv = len(text_emb), len(video_emb)
        block = int(block_size or self.score_block_size)
        if block < 1:
            raise ValueError(f"block_size must be >= 1, got {block}")
        if noise is not None and (noise.ndim != 4 or tuple(noise.shape[:2]) != (nq, nv)
                                  or noise.shape[3] != self.embed_dim):
            raise ValueError(f"noise must be (Q={nq}, V={nv}, K, D={self.embed_dim}), got {tuple(noise.shape)}")
        if text_ids is not None and len(text_ids) != nq:
            raise ValueError(f"{len(text_ids)} text_ids for {nq} queries")
        gens = None
        if noise is None and self.inference_noise == "per_pair" and self.inference_mode == "trials" \
                and self.use_video_sentence:
            gens = [self.text_noise_generator(text_ids[i] if text_ids is not None else i) for i in range(nq)]
        raw = {k: torch.empty(nq, nv, device=dev) for k in self.levels}
        if nq and nv:
            vb = min(nv, block)
            qb = max(1, block // vb)
            pt_all = self._prepare_text(text_emb)
            for v0 in range(0, nv, vb):         # videos outermost: each text's generator runs in video order
                v1 = min(nv, v0 + vb)
                pv = self._prepare_video(video_emb[v0:v1])
                for q0 in range(0, nq, qb):
                    q1 = min(nq, q0 + qb)
                    pair_noise = None
                    if noise is not None:
                        pair_noise = noise[q0:q1, v0:v1].to(dev, torch.float32).reshape(-1, *noise.shape[2:])
                    elif gens is not None:
                        pair_noise = self._per_pair_noise(gens[q0:q1], v1 - v0)
                    lv = self._pair_levels(pt_all[q0:q1], pv, None, None, pair_noise)
                    for k, s in lv.items():
                        raw[k][q0:q1, v0:v1] = s.view(q1 - q0, v1 - v0)
        bias = self._check_bias(video_bias, nv, f"{nv} videos")
        out = self._combine(raw, bias, self_normalise=True).float()
        return (out, raw) if return_levels else out

    @torch.no_grad()
    def score_pairs(self, text_emb: TextEmbedding, video_emb: VideoEmbedding, q_index: torch.Tensor,
                    v_index: torch.Tensor, video_bias: Optional[torch.Tensor] = None,
                    block_size: Optional[int] = None) -> torch.Tensor:
        """Scores of explicit pairs ``(text_emb[q_index[p]], video_emb[v_index[p]])`` -> (P,).

        Equal to the matching entries of :meth:`score` except for Sinkhorn self-normalisation,
        which needs a whole (Q, V) matrix: here only ``video_bias`` ((V, L), rows of
        ``video_emb``) is used, zero biases otherwise (see the module docstring).
        """
        dev = self._device
        text_emb, video_emb = text_emb.to(dev), video_emb.to(dev)
        qi = torch.as_tensor(q_index, dtype=torch.long, device=dev).reshape(-1)
        vi = torch.as_tensor(v_index, dtype=torch.long, device=dev).reshape(-1)
        if qi.shape != vi.shape:
            raise ValueError(f"q_index and v_index differ in length ({qi.numel()} vs {vi.numel()})")
        if self.inference_noise == "per_pair" and self.inference_mode == "trials" and self.use_video_sentence:
            raise ConfigError("score_pairs: inference_noise 'per_pair' draws noise along whole (Q, V) score matrices "
                              "(score()); re-ranking candidate pairs needs the shared noise: "
                              "configure_inference(inference_noise='shared')")
        bias = self._check_bias(video_bias, len(video_emb), f"{len(video_emb)} videos")
        n = qi.numel()
        out = torch.empty(n, device=dev)
        if n == 0:
            return out
        block = int(block_size or self.score_block_size)
        pt, pv = self._prepare_text(text_emb), self._prepare_video(video_emb)
        for p0 in range(0, n, block):
            p1 = min(n, p0 + block)
            lv = self._pair_levels(pt, pv, qi[p0:p1], vi[p0:p1])
            out[p0:p1] = self._combine(lv, None if bias is None else bias[vi[p0:p1]], self_normalise=False)
        return out.float()

    @torch.no_grad()
    def compute_video_bias(self, bank_text_emb: TextEmbedding, video_emb: VideoEmbedding,
                           block_size: Optional[int] = None) -> torch.Tensor:
        """(V, L) per-level Sinkhorn log column scalings of a query bank (e.g. training
        queries) against ``video_emb`` (the whole corpus): UCoFiA's inference-time bias."""
        _, raw = self.score(bank_text_emb, video_emb, block_size=block_size, return_levels=True)
        cols = [sinkhorn_video_bias(raw[k], self.sinkhorn_temperature, self.sinkhorn_iters) for k in self.levels]
        return torch.stack(cols, dim=1).float()


def load_tmass_checkpoint(path: "str | os.PathLike", clip_config: Optional[Mapping[str, Any]] = None, *,
                          clip_path: Optional[str] = None, map_location: "str | torch.device" = "cpu",
                          **options: Any) -> C2FTMassRetriever:
    """An official T-MASS checkpoint (``model_best.pth`` / ``checkpoint-epochN.pth``) as a
    :class:`C2FTMassRetriever` in eval mode with a transformers CLIP tower inside.

    Args:
        path: the file the official trainer writes (``{"epoch", "state_dict", "optimizer"}``,
            read with ``weights_only=True``).
        clip_config: the CLIP architecture as ``transformers.CLIPConfig`` keyword arguments
            (ViT-B/32: ``CLIPConfig.from_pretrained("openai/clip-vit-base-patch32").to_dict()``).
        clip_path: or a local CLIP folder whose ``config.json`` gives the architecture (its
            weights are not read: the checkpoint holds the whole CLIP).
        map_location: where tensors are loaded.
        **options: model options overriding ``c2f_tmass_official.yaml`` (e.g. ``num_trials``,
            ``inference_noise``, ``stochastic_prior="normal", prior_std=3e-3`` for LSMDC).
    ``embed_dim`` and ``num_frames`` come from the weights. Missing/unexpected keys or widths
    that do not match raise :class:`~lavis_c2f.models.checkpoint.CheckpointMismatchError`
    listing them; a file of another codebase raises ``DataFormatError`` naming it.
    """
    path = os.fspath(path)
    if (clip_config is None) == (clip_path is None):
        raise ConfigError(f"load_tmass_checkpoint({path}): the file stores no CLIP architecture; pass exactly one of "
                          "clip_config= (CLIPConfig arguments) or clip_path= (a local CLIP folder)")
    sd = read_tmass_checkpoint(path, map_location=map_location)
    d, f = tmass_dims(sd)
    arch = clip_config_from_path(resolve_path(clip_path)) if clip_path is not None else _plain_dict(clip_config)
    proj = int(build_clip_config(arch).projection_dim)
    if proj != d:
        raise ConfigError(f"{path}: the T-MASS modules are {d}-wide but the given CLIP architecture projects to "
                          f"{proj} (projection_dim): this checkpoint was trained with another CLIP")
    node = model_node(C2FTMassRetriever.PRETRAINED_MODEL_CONFIG_DICT["official"], "c2f_tmass_official.yaml")
    node.update(text_input_dim=d, video_input_dim=d, embed_dim=d, num_frames=f, clip_path=None, clip_config=arch,
                tmass_checkpoint=None)
    node.update(options)
    model = C2FTMassRetriever.from_config(node)
    load_tmass_state_dict(model, sd, source=path)
    return model.eval()
