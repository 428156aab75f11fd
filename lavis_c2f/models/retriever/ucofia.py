"""``c2f_ucofia_retriever``: UCoFiA exactly as the official code computes it.

UCoFiA ("Unified Coarse-to-Fine Alignment for Video-Text Retrieval", Wang et al., ICCV 2023,
``github.com/Ziyang412/UCoFiA``) is a CLIP4Clip model (OpenAI CLIP, ``seqTransf`` temporal
encoder) scored at three levels. With E the embedding width, F = ``max_frames``,
L = ``max_words``, k = ``topk`` and ``s = exp(logit_scale)``:

1. **Text.** The CLIP text tower (causal mask only, no padding mask); ``sentence`` is the
   projected EOT row (``argmax(ids)``), ``words`` are **all** L projected rows, padding included.
2. **Frames.** The CLIP ViT on every frame, padded frames included; in the vision blocks
   ``shift_layers`` (10, 11) the attention input is patch-shifted across the frames of a video
   (:func:`~.patch_tokens.patch_shift`, TS2-Net). ``frames`` are the projected CLS rows.
3. **Video.** ``seqTransf``: ``x = frames + frame_position_embeddings``; a ``temporal_layers``
   CLIP transformer (LayerNorm eps 1e-12) with the additive mask ``(1 - video_mask) * -1e6``;
   ``+ frames``. The video feature is the mean over **real** frames of the L2-normalised
   outputs, normalised again.
4. **Patches.** :class:`~.patch_tokens.PatchSelector` scores every patch token from ``[token,
   frame CLS]`` and the sum of the video's frame CLS, and a perturbed top-k
   (:func:`~.patch_tokens.perturbed_topk`, 500 noisy draws, sigma 0.05) keeps k soft patches per
   frame: ``patches`` = ``[CLS, k patches]`` per frame, ``F (1 + k)`` rows, **not** normalised.
5. **Levels** (each (T, V)), with ``t``, ``w``, ``f`` the L2-normalised sentence, words, frames:
   video-sentence ``s (t Wg)(v Wg1)^T``; sentence-frame ``s ISA_F(t . f)`` (all F frames);
   pixel-word (no ``s``) the two-way ISA (:func:`~.modules.two_way_isa`) of
   ``(w W_local) . p`` over all L words and all ``F (1 + k)`` patch rows ``p`` (training:
   ``p W_local1``, evaluation: ``p``).
6. **SK-norm.** A bank of training texts is scored against the test videos; per level,
   :func:`~.modules.sinkhorn_video_bias` (temperature 1, column-first, 4 iterations) gives a
   (V,) bias added to the test logits; the score is the mean of the three biased levels.
7. **Training.** Symmetric cross-entropy on the mean of the three (unbiased) levels over the
   batch gathered from every rank (the gather passes gradients to the local rows only).

Official behaviours that surprise, each the default, and the option that changes it:

==================================================  ===================================
padding rows of the text are word features          ``mask_padded_words: true``
padded frames take part in the frame / pixel levels ``mask_padded_frames: true``
pixel tokens are not normalised                     ``normalize_pixels: true``
the pixel-word level has no logit scale             ``pixel_logit_scale: true``
evaluation skips ``local_mat_weight1``              ``eval_pixel_weight: true``
evaluation draws fresh top-k noise (not repeatable) a ``generator`` / ``topk_noise``
==================================================  ===================================

The released checkpoint runs blocks 10 and 11 with the pretrained CLIP's attention weights
(see :func:`load_ucofia_checkpoint`, ``shift_attention``).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from torch import nn

from lavis_c2f.common import dist as c2f_dist
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import LAVIS_KEYS, check_keys
from lavis_c2f.models.base import C2FBaseModel
from lavis_c2f.models.checkpoint import CheckpointMismatchError, load_state_strict
from lavis_c2f.models.retriever.clip_towers import ClipTowers
from lavis_c2f.models.retriever.embeddings import UCoFiAText, UCoFiAVideo, VideoEmbedding
from lavis_c2f.models.retriever.modules import (
    InteractiveSimilarityAggregation, l2norm, masked_mean, model_fingerprint, sinkhorn_video_bias,
    symmetric_infonce, two_way_isa)
from lavis_c2f.models.retriever.openai_clip import OpenAIClipSizes, heads, transformers_clip_config
from lavis_c2f.models.retriever.patch_tokens import PatchSelector, PatchShiftHook
from lavis_c2f.models.retriever.ucofia_checkpoint import (OFFICIAL_SHIFT_LAYERS, clip_init_state_dict,
                                                          official_state_dict, read_clip_file,
                                                          read_ucofia_checkpoint, shifted_blocks)
from lavis_c2f.paths import config_path, resolve_path
from lavis_c2f.processors.clip_processors import Clip4ClipTokenizer

LEVELS = ("video_sentence", "sentence_frame", "pixel_word")
# options that change no stored video embedding (an index may switch them)
INFERENCE_KEYS = ("sk_norm", "sinkhorn_iters", "score_block_size", "mask_padded_words", "pixel_logit_scale",
                  "eval_pixel_weight")
MASK_VALUE = -1e6       # official additive mask of the temporal encoder


def temporal_encoder(width: int, layers: int) -> nn.Module:
    """``seqTransf``'s transformer: ``layers`` CLIP blocks of ``width`` (heads ``width // 64``,
    QuickGELU) with LayerNorm eps 1e-12 (the official ``transformerClip`` uses the TF-style
    LayerNorm of ``until_module``)."""
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPEncoder

    cfg = CLIPTextConfig(hidden_size=int(width), intermediate_size=4 * int(width), num_hidden_layers=int(layers),
                         num_attention_heads=heads(width), hidden_act="quick_gelu", attention_dropout=0.0)
    enc = CLIPEncoder(cfg)
    for m in enc.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-12
    return enc


def video_seed(seed: int, vid: str) -> int:
    """A 63-bit seed of ``(seed, vid)``, the same in every process and Python run."""
    h = hashlib.blake2b(f"{int(seed)}|{vid}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


# ----------------------------------------------------------------------------------------
# the model

@registry.register_model("c2f_ucofia_retriever")
class C2FUCoFiA(C2FBaseModel):
    """UCoFiA (see the module docstring). Build it with :func:`load_ucofia_checkpoint` (released
    checkpoint), :func:`init_ucofia_from_clip` (training from OpenAI CLIP) or :meth:`from_config`.

    Args (sizes are read from the weights by the loaders):
        embed_dim, vision_width, vision_layers, vision_patch_size, image_resolution, text_width,
        text_layers, context_length, vocab_size: the OpenAI CLIP's sizes.
        max_words (L), max_frames (F): text and frame slots (sizes of the ISA weights).
        temporal_layers: ``seqTransf`` layers; frame_positions: rows of
            ``frame_position_embeddings`` (official: the CLIP context length).
        topk, topk_samples, topk_sigma: patch selection.
        shift_layers, shift_fold_div, shift_offset: patch shift of the vision tower.
        isa_temperature (0.01), sinkhorn_iters (4), sk_norm (SK-norm on in :meth:`score`).
        mask_padded_words, mask_padded_frames, normalize_pixels, pixel_logit_scale,
            eval_pixel_weight: the quirk switches (module docstring; all false = official).
        logit_scale_max: clamp of ``logit_scale`` after each optimiser step (log 100).
        score_block_size: (text, video) pairs per block in :meth:`level_logits`.
        loss_float64: compute the three levels of :meth:`contrastive_loss` in float64. The
            double softmax at temperature 0.01 amplifies float32 rounding of the features into
            the gradient: on the reference fixture a float32 loss puts the pixel gradient
            2.2e-4 (relative) from the exact one, the official float32 run is 3.6e-5 from it,
            and float64 levels on float32 towers 4.9e-5. The loss value is the same.
        topk_noise_seed: seed of per-video top-k noise in :meth:`encode_video_batch` (None: fresh
            draws from torch's global generator, as the official evaluation).
    """

    PRETRAINED_MODEL_CONFIG_DICT = {"msrvtt": config_path("models/c2f_ucofia_msrvtt.yaml")}

    OPTION_DEFAULTS: Dict[str, Any] = dict(
        topk_samples=500, topk_sigma=0.05, shift_layers=(10, 11), shift_fold_div=7, shift_offset=3,
        isa_temperature=0.01, sinkhorn_iters=4, sk_norm=True, mask_padded_words=False, mask_padded_frames=False,
        normalize_pixels=False, pixel_logit_scale=False, eval_pixel_weight=False, logit_scale_max=math.log(100.0),
        score_block_size=2048, loss_float64=True, topk_noise_seed=None)

    def __init__(self, *, embed_dim: int, vision_width: int, vision_layers: int, vision_patch_size: int,
                 image_resolution: int, text_width: int, text_layers: int, context_length: int, vocab_size: int,
                 max_words: int, max_frames: int, temporal_layers: int, frame_positions: int, topk: int = 3,
                 topk_samples: int = 500, topk_sigma: float = 0.05, shift_layers: Sequence[int] = (10, 11),
                 shift_fold_div: int = 7, shift_offset: int = 3, isa_temperature: float = 0.01,
                 sinkhorn_iters: int = 4, sk_norm: bool = True, mask_padded_words: bool = False,
                 mask_padded_frames: bool = False, normalize_pixels: bool = False, pixel_logit_scale: bool = False,
                 eval_pixel_weight: bool = False, logit_scale_max: float = math.log(100.0),
                 score_block_size: int = 2048, loss_float64: bool = True, topk_noise_seed: Optional[int] = None):
        super().__init__()
        self.hparams: Dict[str, Any] = dict(
            embed_dim=int(embed_dim), vision_width=int(vision_width), vision_layers=int(vision_layers),
            vision_patch_size=int(vision_patch_size), image_resolution=int(image_resolution),
            text_width=int(text_width), text_layers=int(text_layers), context_length=int(context_length),
            vocab_size=int(vocab_size), max_words=int(max_words), max_frames=int(max_frames),
            temporal_layers=int(temporal_layers), frame_positions=int(frame_positions), topk=int(topk),
            topk_samples=int(topk_samples), topk_sigma=float(topk_sigma),
            shift_layers=[int(i) for i in shift_layers], shift_fold_div=int(shift_fold_div),
            shift_offset=int(shift_offset), isa_temperature=float(isa_temperature),
            sinkhorn_iters=int(sinkhorn_iters), sk_norm=bool(sk_norm), mask_padded_words=bool(mask_padded_words),
            mask_padded_frames=bool(mask_padded_frames), normalize_pixels=bool(normalize_pixels),
            pixel_logit_scale=bool(pixel_logit_scale), eval_pixel_weight=bool(eval_pixel_weight),
            logit_scale_max=float(logit_scale_max), score_block_size=int(score_block_size),
            loss_float64=bool(loss_float64),
            topk_noise_seed=None if topk_noise_seed is None else int(topk_noise_seed))
        h = self.hparams
        self._validate(h)
        for k, v in h.items():
            setattr(self, k, v)
        e, f, l = self.embed_dim, self.max_frames, self.max_words
        if self.frame_positions < f:
            raise ConfigError(f"frame_positions={self.frame_positions} < max_frames={f}")
        if self.text_width != e:
            raise ConfigError(f"seqTransf needs the CLIP text width ({self.text_width}) to equal the embedding "
                              f"width ({e})")
        from transformers import CLIPModel

        sizes = OpenAIClipSizes(**{k: h[k] for k in OpenAIClipSizes.__dataclass_fields__})
        self.clip = ClipTowers(CLIPModel(transformers_clip_config(sizes)), freeze=False)
        hook = PatchShiftHook(f, self.shift_fold_div, self.shift_offset)
        for i in self.shift_layers:
            if not 0 <= i < self.vision_layers:
                raise ConfigError(f"shift_layers: block {i} does not exist ({self.vision_layers} vision blocks)")
            self.clip.model.vision_model.encoder.layers[i].self_attn.register_forward_pre_hook(hook, with_kwargs=True)

        self.frame_position_embeddings = nn.Embedding(self.frame_positions, e)
        self.temporal = temporal_encoder(e, self.temporal_layers)
        self.patch_selector = PatchSelector(e, self.topk, self.topk_samples, self.topk_sigma)
        self.num_pixels = f * (1 + self.topk)
        eye = torch.eye(e)
        self.global_mat_weight = nn.Parameter(eye.clone())
        self.global_mat_weight_1 = nn.Parameter(eye.clone())
        self.local_mat_weight = nn.Parameter(eye.clone())
        self.local_mat_weight1 = nn.Parameter(eye.clone())
        isa = self.isa_temperature
        self.frame_isa = InteractiveSimilarityAggregation(f, isa)                 # frame_logit_weight
        self.word_isa = InteractiveSimilarityAggregation(l, isa)                  # word_mat_weight
        self.pixel_isa = InteractiveSimilarityAggregation(self.num_pixels, isa)   # pixel_mat_weight
        self.pixel_isa2 = InteractiveSimilarityAggregation(self.num_pixels, isa)  # pixel_mat_weight2
        self.word_isa2 = InteractiveSimilarityAggregation(l, isa)                 # word_mat_weight2
        # official parameters no computation reads (kept so a checkpoint maps key for key)
        self.register_buffer("word_logit_weight", torch.eye(l))
        self.register_buffer("frame_mat_weight", torch.eye(f))
        self.register_buffer("frame_mat_weight2", torch.eye(f))
        self.register_buffer("word_mat_weight_for_pixel", torch.eye(l))
        with torch.no_grad():
            for m in self.patch_selector.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, 0.02)

    # ------------------------------------------------------------------ config
    @staticmethod
    def _validate(h: Mapping[str, Any]) -> None:
        for key in ("embed_dim", "max_words", "max_frames", "temporal_layers", "topk", "topk_samples",
                    "sinkhorn_iters", "score_block_size", "shift_fold_div"):
            if h[key] < 1:
                raise ConfigError(f"model.{key}: must be >= 1 (got {h[key]!r})")
        for key in ("topk_sigma", "isa_temperature"):
            if not h[key] > 0:
                raise ConfigError(f"model.{key}: must be > 0 (got {h[key]!r})")
        grid = h["image_resolution"] // max(1, h["vision_patch_size"])
        if h["topk"] > grid * grid:
            raise ConfigError(f"model.topk: {h['topk']} > the {grid * grid} patches of a frame")

    @classmethod
    def from_config(cls, cfg) -> "C2FUCoFiA":
        """Build from the ``model:`` section.

        ``checkpoint`` (an official ``pytorch_model.bin.N`` or a checkpoint of this package)
        and ``clip_weights`` (the OpenAI CLIP file, ``ViT-B-32.pt``) are paths; with a
        checkpoint every size comes from its weights (the YAML's ``max_words``/``max_frames``/
        ``temporal_layers`` must then agree), with only ``clip_weights`` the model is
        initialised from CLIP as the official trainer does. ``shift_attention`` chooses the
        attention weights of the shifted blocks (``pretrained`` | ``checkpoint``).
        """
        allowed = set(cls.OPTION_DEFAULTS) | LAVIS_KEYS | {"checkpoint", "clip_weights", "shift_attention",
                                                           "max_words", "max_frames", "temporal_layers", "topk"}
        d = check_keys(cfg, allowed, f"model ({cfg.get('arch', 'c2f_ucofia_retriever')})")
        options = {k: d[k] for k in cls.OPTION_DEFAULTS if k in d}
        if not d.get("clip_weights"):
            raise ConfigError("model.clip_weights: the OpenAI CLIP file (ViT-B-32.pt) is required: the official "
                              "model always reads it beside its checkpoint")
        clip_weights = resolve_path(str(d["clip_weights"]))
        sizes = {k: int(d[k]) for k in ("max_words", "max_frames", "temporal_layers", "topk") if d.get(k) is not None}
        if d.get("checkpoint"):
            model = load_ucofia_checkpoint(resolve_path(str(d["checkpoint"])), clip_weights,
                                           shift_attention=str(d.get("shift_attention", "pretrained")), **options)
            bad = {k: (v, model.hparams[k]) for k, v in sizes.items() if model.hparams[k] != v}
            if bad:
                raise ConfigError("model: the checkpoint's sizes differ from the config: "
                                  + ", ".join(f"{k}={v} (checkpoint {c})" for k, (v, c) in bad.items()))
            return model
        if d.get("shift_attention") not in (None, "pretrained"):
            raise ConfigError("model.shift_attention applies to a checkpoint; without one the model starts "
                              "from the CLIP weights")
        missing = [k for k in ("max_words", "max_frames", "temporal_layers") if k not in sizes]
        if missing:
            raise ConfigError(f"model: {missing} are needed to initialise UCoFiA from CLIP (no checkpoint given)")
        return init_ucofia_from_clip(clip_weights, **sizes, **options)

    @property
    def levels(self) -> List[str]:
        return list(LEVELS)

    @property
    def sinkhorn(self) -> bool:
        """SK-norm on: :meth:`score` adds per-video biases from a text bank."""
        return self.sk_norm

    @property
    def num_frames(self) -> int:
        return self.max_frames

    def inference_settings(self) -> Dict[str, Any]:
        return {k: self.hparams[k] for k in INFERENCE_KEYS}

    def configure_inference(self, **kwargs: Any) -> "C2FUCoFiA":
        """Change options of :data:`INFERENCE_KEYS` in place. Returns ``self``."""
        bad = sorted(set(kwargs) - set(INFERENCE_KEYS))
        if bad:
            raise ConfigError(f"configure_inference: not an inference setting: {bad}; allowed: {list(INFERENCE_KEYS)}")
        h = {**self.hparams, **{k: type(self.OPTION_DEFAULTS[k])(v) for k, v in kwargs.items()}}
        self._validate(h)
        self.hparams = h
        for k in kwargs:
            setattr(self, k, h[k])
        return self

    def fingerprint(self) -> Dict[str, str]:
        """``{"arch", "config_hash", "weights_hash"}`` of what stored video embeddings depend on."""
        cfg = {k: v for k, v in self.hparams.items() if k not in INFERENCE_KEYS}
        return model_fingerprint("c2f_ucofia_retriever", cfg, self.state_dict())

    # ------------------------------------------------------------------ inputs
    def tokenize(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Official text arrays: ``[SOT] + BPE(text)[:max_words - 2] + [EOT]``, padded with 0
        (ftfy, HTML unescape and lower case first). Returns ``(input_ids, attention_mask)``,
        each (T, max_words) long."""
        enc = Clip4ClipTokenizer(self.max_words)(list(texts))
        return enc["input_ids"], enc["attention_mask"]

    def topk_noise(self, num_videos: int, generator: Optional[torch.Generator] = None,
                   device=None) -> torch.Tensor:
        """Standard normal noise of the patch selection, (V F, samples, patches per frame)."""
        grid = self.image_resolution // self.vision_patch_size
        shape = (num_videos * self.max_frames, self.topk_samples, grid * grid)
        dev = generator.device if generator is not None else (device or self.global_mat_weight.device)
        return torch.randn(shape, generator=generator, device=dev).to(device or self.global_mat_weight.device)

    # ------------------------------------------------------------------ encoders
    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> UCoFiAText:
        """input_ids (T, L <= max_words) long (shorter rows are padded with 0 to ``max_words``),
        attention_mask (T, L) -> :class:`UCoFiAText` (sentence (T, E), words (T, max_words, E))."""
        dev, dt = self.global_mat_weight.device, self.global_mat_weight.dtype
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (T, L), got {tuple(input_ids.shape)}")
        t, length = input_ids.shape
        if length > self.max_words:
            raise ValueError(f"input_ids have {length} tokens, the model takes at most max_words={self.max_words}")
        if attention_mask is None:
            attention_mask = (input_ids > 0).long()
        if tuple(attention_mask.shape) != (t, length):
            raise ValueError(f"attention_mask must be {(t, length)}, got {tuple(attention_mask.shape)}")
        pad = self.max_words - length
        ids = F.pad(input_ids.to(dev).long(), (0, pad))
        mask = F.pad(attention_mask.to(dev, dt), (0, pad))
        words, _, sentence = self.clip.encode_text(ids, torch.ones_like(ids))   # causal mask only (official)
        return UCoFiAText(sentence, words, mask)

    def encode_video(self, pixel_values: torch.Tensor, video_mask: Optional[torch.Tensor] = None,
                     topk_noise: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> UCoFiAVideo:
        """Encode V videos of exactly ``max_frames`` frames.

        Args:
            pixel_values: (V, F, 3, H, W) CLIP-normalised frames (zeros for padded frames, as the
                official loader pads).
            video_mask: (V, F) 1 = real frame (default: all real).
            topk_noise: (V F, samples, patches) standard normal noise of the patch selection
                (the official shape). Without it the noise is drawn from ``generator`` (a seeded
                generator repeats exactly) or, with neither, from torch's global generator as the
                official evaluation does, which is therefore not repeatable.
        Returns:
            :class:`UCoFiAVideo`: frames (V, F, E), mask, patches (V, F (1 + k), E), video (V, E).
        """
        dev, dt = self.global_mat_weight.device, self.global_mat_weight.dtype
        if pixel_values.ndim != 5 or pixel_values.shape[2] != 3:
            raise ValueError(f"pixel_values must be (V, F, 3, H, W), got {tuple(pixel_values.shape)}")
        v, f = pixel_values.shape[:2]
        if f != self.max_frames:
            raise ValueError(f"pixel_values have {f} frames per video but the model was trained with "
                             f"max_frames={self.max_frames}: pad with zero frames (mask 0) or sample "
                             f"{self.max_frames} frames")
        r = self.image_resolution
        if tuple(pixel_values.shape[3:]) != (r, r):
            raise ValueError(f"frames must be {r}x{r}, got {tuple(pixel_values.shape[3:])}")
        mask = torch.ones(v, f, device=dev, dtype=dt) if video_mask is None else video_mask.to(dev, dt)
        if tuple(mask.shape) != (v, f):
            raise ValueError(f"video_mask must be {(v, f)}, got {tuple(mask.shape)}")
        tokens = self.clip.encode_image_tokens(pixel_values.to(dev, dt).reshape(v * f, 3, r, r))
        if topk_noise is None:
            topk_noise = self.topk_noise(v, generator, dev)
        want = (v * f, self.topk_samples, tokens.shape[1] - 1)
        if tuple(topk_noise.shape) != want:
            raise ValueError(f"topk_noise must be {want}, got {tuple(topk_noise.shape)}")
        patches = self.patch_selector(tokens, f, topk_noise.to(dev)).reshape(v, -1, tokens.shape[-1])
        frames = tokens[:, 0].reshape(v, f, -1)
        return UCoFiAVideo(frames, mask, patches, self.video_feature(frames, mask))

    def encode_text_batch(self, batch: Mapping[str, Any]) -> UCoFiAText:
        """The queries of a retrieval batch (``txt_input_ids``, ``txt_attention_mask``)."""
        if batch.get("txt_input_ids") is None:
            raise KeyError("the UCoFiA batch has no 'txt_input_ids' (use a frames dataset with "
                           "tokenizer kind clip4clip)")
        return self.encode_text(batch["txt_input_ids"], batch.get("txt_attention_mask"))

    def encode_video_batch(self, batch: Mapping[str, Any]) -> UCoFiAVideo:
        """The videos of a retrieval batch (``vid_pixels``, ``vid_pixels_mask``). The top-k
        noise is ``batch["topk_noise"]`` when given; else, in eval mode with ``topk_noise_seed``
        set and the batch's ``vid`` ids known, each video's noise comes from a generator seeded by
        ``(topk_noise_seed, vid)`` (a video encodes the same in any batch, on any rank);
        otherwise it is drawn fresh from torch's generator (the official code; the runner seeds
        it per epoch and rank in training)."""
        if batch.get("vid_pixels") is None:
            raise KeyError("the UCoFiA batch has no 'vid_pixels' (a frames dataset is needed)")
        noise = batch.get("topk_noise")
        vids = batch.get("vid")
        if noise is None and not self.training and self.topk_noise_seed is not None and vids is not None:
            noise = torch.cat([self.topk_noise(1, torch.Generator().manual_seed(video_seed(self.topk_noise_seed, v)))
                               for v in vids])
        return self.encode_video(batch["vid_pixels"], batch.get("vid_pixels_mask"), topk_noise=noise)

    def video_feature(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``seqTransf``: frames (V, F, E), mask (V, F) -> (V, E) L2-normalised video feature."""
        v, f, _ = frames.shape
        pos = self.frame_position_embeddings.weight[:f].unsqueeze(0)
        add = ((1.0 - mask) * MASK_VALUE)[:, None, None, :].expand(v, 1, f, f).to(frames.dtype)
        x = self.temporal(inputs_embeds=frames + pos, attention_mask=add).last_hidden_state + frames
        return l2norm(masked_mean(l2norm(x), mask, dim=1))

    # ------------------------------------------------------------------ scores
    def _pixel_rows(self, ve: UCoFiAVideo, weighted: bool) -> torch.Tensor:
        p = ve.patches
        if weighted:
            p = p @ self.local_mat_weight1.to(p.dtype)
        return l2norm(p) if self.normalize_pixels else p

    def level_logits(self, te: UCoFiAText, ve: UCoFiAVideo, *, pixel_weight: Optional[bool] = None,
                     block_size: Optional[int] = None) -> torch.Tensor:
        """(3, T, V) logits in the official order: video-sentence, sentence-frame, pixel-word
        (module docstring, point 5). ``pixel_weight`` (default: training or
        ``eval_pixel_weight``) multiplies the patch rows by ``local_mat_weight1``. Computed in
        blocks of about ``block_size`` (text, video) pairs (default ``score_block_size``)."""
        if te.dim != self.embed_dim or ve.dim != self.embed_dim:
            raise ValueError(f"embeddings are {te.dim}/{ve.dim}-d, the model's are {self.embed_dim}-d")
        if te.words.shape[1] != self.max_words or ve.frames.shape[1] != self.max_frames \
                or ve.patches.shape[1] != self.num_pixels:
            raise ValueError(f"embeddings have {te.words.shape[1]} words / {ve.frames.shape[1]} frames / "
                             f"{ve.patches.shape[1]} patch rows, the model {self.max_words} / {self.max_frames} / "
                             f"{self.num_pixels}")
        weighted = (self.training or self.eval_pixel_weight) if pixel_weight is None else bool(pixel_weight)
        dt = te.sentence.dtype
        scale = self.clip.logit_scale.exp().to(dt)
        t = l2norm(te.sentence)
        words = l2norm(te.words) @ self.local_mat_weight.to(dt)                            # (T, L, E)
        frames = l2norm(ve.frames)
        pixels = self._pixel_rows(ve, weighted)                                            # (V, P, E)
        fmask = ve.mask if self.mask_padded_frames else None
        pmask = fmask.repeat_interleave(1 + self.topk, dim=1) if fmask is not None else None
        wmask = te.mask if self.mask_padded_words else None
        # s (t Wg)(v Wg1)^T, associated as s ((t Wg) Wg1^T) v^T: E^2 work per text, not per video
        vs = scale * ((t @ self.global_mat_weight.to(dt)) @ self.global_mat_weight_1.to(dt).t()) @ ve.video.t()
        nt, nv = len(te), len(ve)
        sf = torch.empty(nt, nv, dtype=vs.dtype, device=vs.device)
        pw = torch.empty_like(sf)
        block = int(block_size or self.score_block_size)
        vb = max(1, min(nv, block))
        tb = max(1, block // vb)
        for v0 in range(0, nv, vb):
            v1 = min(nv, v0 + vb)
            for t0 in range(0, nt, tb):
                t1 = min(nt, t0 + tb)
                fv = frames[v0:v1]
                c = (fv.reshape(-1, fv.shape[-1]) @ t[t0:t1].t()).view(v1 - v0, -1, t1 - t0).permute(2, 0, 1)
                sf[t0:t1, v0:v1] = self.frame_isa(c, None if fmask is None else fmask[v0:v1])   # (T, V, F)
                pw[t0:t1, v0:v1] = self._pixel_word(words[t0:t1], pixels[v0:v1],
                                                    None if wmask is None else wmask[t0:t1],
                                                    None if pmask is None else pmask[v0:v1])
        sf = scale * sf
        if self.pixel_logit_scale:
            pw = scale * pw
        return torch.stack([vs, sf, pw])

    def _pixel_word(self, words: torch.Tensor, pixels: torch.Tensor, wmask: Optional[torch.Tensor],
                    pmask: Optional[torch.Tensor]) -> torch.Tensor:
        """words (T, L, E) already times ``local_mat_weight``, pixels (V, P, E) (a strided view
        of the index's rows is fine: one GEMM, no copy) -> (T, V)."""
        (nt, nl, e), (nv, npx) = words.shape, pixels.shape[:2]
        x = torch.matmul(pixels, words.reshape(nt * nl, e).t())                 # (V, P, T L)
        x = x.view(nv, npx, nt, nl).permute(2, 0, 3, 1)                         # (T, V, L, P)
        wm = None if wmask is None else wmask[:, None, :]
        pm = None if pmask is None else pmask[None]
        return two_way_isa(x, wm, pm, self.word_isa, self.pixel_isa2, self.pixel_isa, self.word_isa2)

    def sinkhorn_video_bias(self, bank_level_logits: torch.Tensor) -> torch.Tensor:
        """SK-norm biases: (3, B, V) logits of a bank of B texts -> (3, V) (module docstring,
        point 6; the official ``sinkhorn_knopp``)."""
        if bank_level_logits.ndim != 3 or bank_level_logits.shape[0] != len(LEVELS):
            raise ValueError(f"bank logits must be ({len(LEVELS)}, B, V), got {tuple(bank_level_logits.shape)}")
        if bank_level_logits.shape[1] == 0:
            raise ValueError("SK-norm needs a bank with at least one text (the bank has none)")
        return torch.stack([sinkhorn_video_bias(x, 1.0, self.sinkhorn_iters, column_first=True)
                            for x in bank_level_logits])

    def ucofia_scores(self, te: UCoFiAText, ve: UCoFiAVideo, bank: Optional[UCoFiAText] = None,
                      video_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(T, V) official scores: the mean over the levels of ``logits + bias``, the (3, V)
        bias from ``video_bias`` or computed from the ``bank`` texts (without either: no SK-norm)."""
        if video_bias is None and bank is not None:
            if len(bank) == 0:
                raise ValueError("SK-norm needs a bank with at least one text (the bank has none)")
            video_bias = self.sinkhorn_video_bias(self.level_logits(bank, ve))
        logits = self.level_logits(te, ve)
        if video_bias is not None:
            if tuple(video_bias.shape) != (len(LEVELS), len(ve)):
                raise ValueError(f"video_bias must be ({len(LEVELS)}, {len(ve)}), got {tuple(video_bias.shape)}")
            logits = logits + video_bias.to(logits).unsqueeze(1)
        return logits.mean(0)

    # ------------------------------------------------------------------ training
    def contrastive_loss(self, te: UCoFiAText, ve: UCoFiAVideo) -> torch.Tensor:
        """The official training loss of B aligned pairs: symmetric cross-entropy on the mean
        of the three levels (pixels times ``local_mat_weight1``, no SK-norm) over the pairs of
        every rank (gathered; each rank's gradient reaches only its own rows, as the official
        ``AllGather``)."""
        if len(te) != len(ve):
            raise ValueError(f"{len(te)} texts but {len(ve)} videos in the batch")
        gather = c2f_dist.all_gather_with_grad
        te_all = UCoFiAText(gather(te.sentence), gather(te.words), gather(te.mask))
        ve_all = UCoFiAVideo(gather(ve.frames), gather(ve.mask), gather(ve.patches), gather(ve.video))
        if self.loss_float64:
            te_all, ve_all = te_all.to(dtype=torch.float64), ve_all.to(dtype=torch.float64)
        sim = self.level_logits(te_all, ve_all, pixel_weight=True).mean(0)
        return symmetric_infonce(sim).to(te.sentence.dtype)

    def forward(self, samples: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """Training step on a retrieval batch with ``txt_input_ids``/``txt_attention_mask``
        (B, L) and ``vid_pixels`` (B, F, 3, H, W)/``vid_pixels_mask`` (B, F); optional
        ``topk_noise``. Returns ``{"loss"}``."""
        for key in ("txt_input_ids", "vid_pixels"):
            if samples.get(key) is None:
                raise KeyError(f"the UCoFiA batch has no '{key}' (a frames dataset with CLIP tokens is needed)")
        te, ve = self.encode_text_batch(samples), self.encode_video_batch(samples)
        return {"loss": self.contrastive_loss(te, ve)}

    def after_optimizer_step(self) -> None:
        """Clamp ``logit_scale`` at ``logit_scale_max`` (the official trainer does it after
        every step)."""
        with torch.no_grad():
            self.clip.logit_scale.clamp_(max=self.logit_scale_max)

    # ------------------------------------------------------------------ retrieval API (task, index)
    def score(self, text_emb: UCoFiAText, video_emb: UCoFiAVideo, video_bias: Optional[torch.Tensor] = None,
              return_levels: bool = False, block_size: Optional[int] = None, text_ids: Any = None):
        """(Q, V) scores for the retrieval task and the corpus index (embeddings are moved to the
        model's device): the mean over the levels of ``logits + bias`` with ``video_bias`` (V, 3)
        (rows = videos, as the index stores them; zeros without SK-norm or bias).
        ``return_levels`` adds ``{level: (Q, V)}``.
        ``text_ids`` is accepted for the task's interface (UCoFiA's text side has no noise)."""
        dev = self.global_mat_weight.device
        with torch.no_grad():
            logits = self.level_logits(text_emb.to(dev), video_emb.to(dev), block_size=block_size)
            raw = {lv: logits[i] for i, lv in enumerate(LEVELS)}
            if self.sk_norm and video_bias is not None:
                vb = torch.as_tensor(video_bias, dtype=logits.dtype, device=logits.device)
                if tuple(vb.shape) != (len(video_emb), len(LEVELS)):
                    raise ValueError(f"video_bias must be ({len(video_emb)}, {len(LEVELS)}), got {tuple(vb.shape)}")
                logits = logits + vb.t().unsqueeze(1)
            out = logits.mean(0).float()
        return (out, raw) if return_levels else out

    def video_bias_from_levels(self, bank_levels: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(V, 3) SK-norm biases from a bank's per-level (B, V) logits (the index's layout)."""
        return self.sinkhorn_video_bias(torch.stack([bank_levels[lv] for lv in LEVELS])).t().contiguous()

    @torch.no_grad()
    def compute_video_bias(self, bank_text_emb: UCoFiAText, video_emb: UCoFiAVideo,
                           block_size: Optional[int] = None) -> torch.Tensor:
        """(V, 3) SK-norm biases of ``bank_text_emb`` against ``video_emb``: computed once per
        set of videos (official protocol)."""
        if len(bank_text_emb) == 0:
            raise ValueError("SK-norm needs a bank with at least one text (the bank has none)")
        dev = self.global_mat_weight.device
        logits = self.level_logits(bank_text_emb.to(dev), video_emb.to(dev), block_size=block_size)
        return self.sinkhorn_video_bias(logits).t()

    @property
    def index_rows_per_video(self) -> int:
        """Rows of width E the corpus index stores per video (:meth:`to_index_rows`)."""
        return 2 + self.num_pixels

    def to_index_rows(self, video_emb: UCoFiAVideo) -> VideoEmbedding:
        """Pack videos for the corpus index: (V, 2 + F (1 + k), E) rows = ``[mask (first F
        entries), video, patches]`` (a frame's CLS row is its first patch row, so the frames are
        not stored twice), all rows valid; ``pooled`` = the video feature."""
        v, f, e = video_emb.frames.shape
        if e < f:
            raise ValueError(f"cannot pack a {f}-frame mask into {e}-wide rows")
        rows = torch.zeros(v, self.index_rows_per_video, e, dtype=video_emb.frames.dtype,
                           device=video_emb.frames.device)
        rows[:, 0, :f] = video_emb.mask
        rows[:, 1] = video_emb.video
        rows[:, 2:] = video_emb.patches
        return VideoEmbedding(rows, torch.ones(v, rows.shape[1], device=rows.device), video_emb.video)

    def from_index_rows(self, rows: torch.Tensor, mask: Optional[torch.Tensor] = None) -> UCoFiAVideo:
        """Inverse of :meth:`to_index_rows` (views, no copy): rows (V, 2 + F (1 + k), E)."""
        f, step = self.max_frames, 1 + self.topk
        if rows.ndim != 3 or rows.shape[1] != self.index_rows_per_video:
            raise ValueError(f"index rows must be (V, {self.index_rows_per_video}, E), got {tuple(rows.shape)}")
        patches = rows[:, 2:]
        return UCoFiAVideo(patches[:, ::step], rows[:, 0, :f], patches, rows[:, 1])

    def prefilter_query(self, text_emb: UCoFiAText) -> torch.Tensor:
        """(Q, E) float32 pre-filter vectors: the normalised sentence times ``global_mat_weight``
        (the video-sentence level is ``s`` times its dot product with :meth:`prefilter_vectors`)."""
        return (l2norm(text_emb.sentence.detach().float()) @ self.global_mat_weight.detach().float())

    def prefilter_vectors(self, video_emb: UCoFiAVideo) -> torch.Tensor:
        """(V, E) float32 query-independent video vectors: ``video @ global_mat_weight_1``."""
        return video_emb.video.detach().float() @ self.global_mat_weight_1.detach().float()

    def prefilter_segment_vectors(self, video_emb: UCoFiAVideo, num_segments: int
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(V, S, E) pre-filter vectors and (V, S) validity: the video vector in segment 0
        (UCoFiA's video feature is one vector per video; the other segments stay empty)."""
        vec = self.prefilter_vectors(video_emb)
        out = torch.zeros(len(video_emb), int(num_segments), vec.shape[1])
        valid = torch.zeros(len(video_emb), int(num_segments), dtype=torch.bool)
        out[:, 0] = vec.cpu()
        valid[:, 0] = video_emb.mask.sum(-1).cpu() > 0
        out[:, 0] *= valid[:, 0:1]
        return out, valid


# ----------------------------------------------------------------------------------------
# building from weights

def load_ucofia_checkpoint(path: str, clip_weights: str, *, map_location: "str | torch.device" = "cpu",
                           shift_attention: str = "pretrained", **options: Any) -> C2FUCoFiA:
    """Load an official UCoFiA checkpoint (:mod:`~lavis_c2f.models.retriever.ucofia_checkpoint`).

    Args:
        path: ``pytorch_model.bin.N`` written by the official trainer.
        clip_weights: the OpenAI CLIP file read beside it (TorchScript ``ViT-B-32.pt`` or a
            state dict).
        shift_attention: ``pretrained`` (official: vision blocks 10/11 run with the CLIP file's
            attention) or ``checkpoint`` (their trained ``attn.net.*`` weights).
        options: :attr:`C2FUCoFiA.OPTION_DEFAULTS` overrides (e.g. ``sk_norm``).
    Returns:
        the model in eval mode (float32), every size read from the weights.
    Raises:
        DataFormatError: not a UCoFiA checkpoint, or a CLIP file of other sizes.
        CheckpointMismatchError: keys the model does not have or that are missing (listed).
    """
    ckpt, clip_sd, sizes = read_ucofia_checkpoint(str(path), str(clip_weights), map_location)
    shift = shifted_blocks(sizes["vision_layers"], options.pop("shift_layers", OFFICIAL_SHIFT_LAYERS))
    state = official_state_dict(ckpt, clip_sd, shift, shift_attention, str(path), str(clip_weights))
    model = C2FUCoFiA(**sizes, shift_layers=shift, **options)
    buffers = [k for k in model.state_dict() if k.endswith("embeddings.position_ids")]
    load_state_strict(model, state, source=str(path), allow_missing=buffers)
    return model.eval()


def init_ucofia_from_clip(clip_weights: str, *, max_words: int, max_frames: int, temporal_layers: int,
                          topk: int = 3, map_location: "str | torch.device" = "cpu", **options: Any) -> C2FUCoFiA:
    """A UCoFiA model started from OpenAI CLIP as the official trainer does (``clip_init_state_dict``;
    identity matrices, N(0, 0.02) patch scorer); the CLIP sizes from the file, the others given."""
    clip_sd, sizes = read_clip_file(str(clip_weights), map_location)
    shift = shifted_blocks(sizes["vision_layers"], options.pop("shift_layers", OFFICIAL_SHIFT_LAYERS))
    model = C2FUCoFiA(**sizes, max_words=max_words, max_frames=max_frames, temporal_layers=temporal_layers,
                      frame_positions=sizes["context_length"], topk=topk, shift_layers=shift, **options)
    state = clip_init_state_dict(clip_sd, temporal_layers)
    keep = {k: v for k, v in model.state_dict().items() if k not in state}   # matrices, selector, extra blocks
    clip_missing = [k for k in keep if k.startswith("clip.") and not k.endswith("position_ids")]
    if clip_missing:
        raise CheckpointMismatchError(str(clip_weights), clip_missing, [], [])
    load_state_strict(model, {**keep, **state}, source=str(clip_weights))
    return model
