"""The configuration of ``c2f_tmass_retriever``: every key with its default
(:data:`TMASS_DEFAULTS`; the model YAMLs set them, ``lavis_c2f/configs/models/c2f_tmass_*.yaml``),
its rule (:func:`validate_hparams`), how a ``model:`` node is read (:func:`hparams_from_config`:
the one unknown-key check, then each value coerced to its default's type), which keys are
inference-only (:data:`INFERENCE_KEYS`) and what the fingerprint hashes (:func:`hashed_config`).
The meaning of each key is documented on :class:`~lavis_c2f.models.retriever.tmass.C2FTMassRetriever`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import LAVIS_KEYS, check_keys
from lavis_c2f.models.retriever.modules import StochasticText

LEVELS = ("video_sentence", "frame_sentence", "frame_word")
# inference-only knobs: changing them needs no re-encoding (see ``configure_inference``)
INFERENCE_KEYS = ("inference_mode", "num_trials", "trial_include_mean", "eval_seed", "inference_noise",
                  "sinkhorn", "sinkhorn_iters", "sinkhorn_temperature", "score_block_size")
HASH_EXCLUDED = frozenset(INFERENCE_KEYS) | {"clip_path", "freeze_clip", "tmass_checkpoint"}
# keys added after indexes were first built: at these values they are left out of the config
# hash, so the fingerprint of a model without them is unchanged
HASH_OMITTED_DEFAULTS = {"clip_config": None, "logit_scale_source": "own", "mask_duplicate_videos": True}
NOISE_MODES = ("shared", "per_pair")

TMASS_DEFAULTS: Dict[str, Any] = dict(
    text_input_dim=512, video_input_dim=512, embed_dim=512, text_proj="linear", video_proj="linear",
    num_frames=12, frame_sampling="uniform", num_heads=1, pool_dropout=0.3,
    stochastic_prior="uniform", prior_std=1.0, radius_bias_init=0.0, support_loss_weight=0.8,
    logit_scale_init=math.log(100.0), logit_scale_max=math.log(100.0),
    inference_mode="trials", num_trials=20, trial_include_mean=False, eval_seed=0,
    use_video_sentence=True, use_frame_sentence=False, use_frame_word=False,
    weight_video_sentence=1.0, weight_frame_sentence=1.0, weight_frame_word=1.0,
    isa_temperature=0.01, max_words=32, sinkhorn=False, sinkhorn_iters=4, sinkhorn_temperature=0.01,
    score_block_size=4096, clip_path=None, freeze_clip=True, clip_config=None, logit_scale_source="own",
    inference_noise="shared", tmass_checkpoint=None, mask_duplicate_videos=True,
)
NULLABLE = ("clip_path", "clip_config", "tmass_checkpoint")  # keys that may be null


def hparams_from_config(cfg: Any) -> Dict[str, Any]:
    """The constructor arguments of a ``model:`` node (mapping / OmegaConf): unknown keys raise
    (:func:`~lavis_c2f.data.cfg.check_keys`; LAVIS's bookkeeping keys are ignored), each given
    value is coerced to its default's type (``ConfigError`` naming the key otherwise)."""
    arch = cfg.get("arch", "c2f_tmass_retriever") if hasattr(cfg, "get") else "c2f_tmass_retriever"
    d = check_keys(cfg, set(TMASS_DEFAULTS) | LAVIS_KEYS, f"model ({arch})")
    kwargs = {}
    for k, default in TMASS_DEFAULTS.items():
        if k not in d:
            continue
        v = d[k]
        try:
            if v is None:
                if k not in NULLABLE:
                    raise ValueError("null is not allowed")
            elif k == "clip_config":
                if not isinstance(v, Mapping):
                    raise ValueError("expected a mapping of transformers CLIPConfig arguments")
                v = dict(v)
            elif isinstance(default, bool):
                if not isinstance(v, bool):
                    raise ValueError("expected true or false")
            elif isinstance(default, int) and not isinstance(default, bool):
                if isinstance(v, bool) or float(v) != int(float(v)):
                    raise ValueError("expected an integer")
                v = int(v)
            elif isinstance(default, float):
                v = float(v)
            else:
                v = str(v)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.{k}: invalid value {v!r}: {e}") from None
        kwargs[k] = v
    return kwargs


def validate_hparams(h: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the key when a T-MASS setting breaks its rule."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"model.{key}: {msg} (got {h[key]!r})")

    for key in ("text_input_dim", "video_input_dim", "embed_dim", "num_frames", "num_heads", "max_words",
                "score_block_size", "sinkhorn_iters"):
        need(h[key] >= 1, key, "must be >= 1")
    need(h["embed_dim"] % h["num_heads"] == 0, "num_heads", f"must divide embed_dim={h['embed_dim']}")
    for key in ("text_proj", "video_proj"):
        need(h[key] in ("linear", "none"), key, "must be 'linear' or 'none'")
    need(h["text_proj"] == "linear" or h["text_input_dim"] == h["embed_dim"], "text_proj",
         "'none' needs text_input_dim == embed_dim")
    need(h["video_proj"] == "linear" or h["video_input_dim"] == h["embed_dim"], "video_proj",
         "'none' needs video_input_dim == embed_dim")
    need(h["frame_sampling"] in ("uniform", "segment_mean"), "frame_sampling",
         "must be 'uniform' or 'segment_mean'")
    need(h["stochastic_prior"] in StochasticText.PRIORS, "stochastic_prior", "must be 'uniform' or 'normal'")
    need(h["prior_std"] > 0, "prior_std", "must be > 0")
    need(0.0 <= h["pool_dropout"] < 1.0, "pool_dropout", "must be in [0, 1)")
    need(h["support_loss_weight"] >= 0, "support_loss_weight", "must be >= 0")
    need(h["inference_mode"] in ("trials", "deterministic"), "inference_mode",
         "must be 'trials' or 'deterministic'")
    need(h["num_trials"] >= 1, "num_trials", "must be >= 1")
    need(h["isa_temperature"] > 0, "isa_temperature", "must be > 0")
    need(h["sinkhorn_temperature"] > 0, "sinkhorn_temperature", "must be > 0")
    need(h["logit_scale_init"] <= h["logit_scale_max"], "logit_scale_init", "must be <= logit_scale_max")
    need(h["inference_noise"] in NOISE_MODES, "inference_noise", f"must be one of {NOISE_MODES}")
    need(h["logit_scale_source"] in ("own", "clip"), "logit_scale_source", "must be 'own' or 'clip'")
    need(h["clip_path"] is None or h["clip_config"] is None, "clip_config",
         "give clip_path (pretrained folder) or clip_config (architecture), not both")
    need(h["logit_scale_source"] == "own" or h["clip_path"] is not None or h["clip_config"] is not None,
         "logit_scale_source", "'clip' needs a CLIP tower (clip_path or clip_config)")
    levels = [lv for lv in LEVELS if h[f"use_{lv}"]]
    need(bool(levels), "use_video_sentence", "at least one use_* level must be true")
    for lv in levels:
        need(h[f"weight_{lv}"] > 0, f"weight_{lv}", "must be > 0 for an enabled level")


def hashed_config(h: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings stored video embeddings depend on (the fingerprint's config hash): every
    key except :data:`HASH_EXCLUDED`, and :data:`HASH_OMITTED_DEFAULTS` keys at those values."""
    return {k: v for k, v in sorted(h.items())
            if k not in HASH_EXCLUDED and not (k in HASH_OMITTED_DEFAULTS and v == HASH_OMITTED_DEFAULTS[k])}


__all__ = ["HASH_EXCLUDED", "HASH_OMITTED_DEFAULTS", "INFERENCE_KEYS", "LEVELS", "NOISE_MODES", "NULLABLE",
           "TMASS_DEFAULTS", "hashed_config", "hparams_from_config", "validate_hparams"]
