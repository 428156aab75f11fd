"""A tiny, randomly initialised refiner for CPU tests, demos and pipeline plumbing.

:func:`make_tiny_assets` writes, offline and deterministically, the same local layout the real
model reads (so tests exercise the real loading code)::

    ROOT/bert/config.json, vocab.txt          tiny BERT config + WordPiece vocab (Q-Former)
    ROOT/t5/config.json, pytorch_model.bin    tiny random T5 (d_model 32, 2+2 layers)
    ROOT/t5/spiece.model, tokenizer.json, ... sentencepiece unigram model trained here on a
                                              small corpus covering the prompt alphabet;
                                              tokenizer.json adds the pieces ▁0..▁299

:func:`tiny_refiner_config` returns the ``model:`` mapping for
:meth:`C2FCaptionRefiner.from_config` (tiny EVA ViT: 32 px images, 16 px patches, width 24),
and :func:`build_tiny_refiner` builds the model. A ROOT that is complete is reused as is.

The production model never calls this module. Configs name the tiny model with
``arch: c2f_tiny_caption_refiner`` (:class:`TinyCaptionRefiner`, registered lazily through
:data:`lavis_c2f.registry_utils.LAZY_COMPONENTS`): the same model plus one key, ``tiny_assets``
(a folder, or ``auto`` for ``$C2F_CACHE/tiny_refiner``), whose BERT and T5 folders it writes
when missing before building.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import string
import tempfile
from typing import Any, Dict, Optional

import torch
from filelock import FileLock
from lavis.common.registry import registry

from lavis_c2f.common.io import atomic_open
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.models.refiner.model import DEFAULTS, LAVIS_KEYS, C2FCaptionRefiner
from lavis_c2f.paths import cache_root, resolve_path

TINY_IMAGE_SIZE = 32
_MARKER = "tiny_refiner_assets.json"
_VERSION = 2


def _corpus() -> str:
    lines = [
        "Query: a man talks to the camera about cooking dinner in the kitchen",
        "Coarse windows: [[10, 24]] Search region: [[4, 30]] duration=150s t=12s t=12.5s",
        'speech: "so we start here and then we go there"',
        "Given the video frames with their timestamps and speech, find the windows relevant to the query.",
        "Relevant windows: [[12, 30], [40, 52]] []",
    ]
    lines += [" ".join(f"[[{i}, {i + 2}]]" for i in range(j, j + 20)) for j in range(0, 300, 20)]
    lines += [" ".join(f"{i}.{k}" for k in range(10)) for i in range(0, 40)]
    chars = string.ascii_letters + string.digits + string.punctuation
    lines += [" ".join(chars)] * 3
    return "\n".join(lines * 2) + "\n"


def _write_bert(root: str) -> str:
    from transformers import BertConfig

    d = os.path.join(root, "bert")
    os.makedirs(d, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = ["the", "a", "man", "woman", "talks", "camera", "video", "query", "window"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = specials + words + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    with open(os.path.join(d, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    cfg = BertConfig(vocab_size=len(vocab) + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    cfg.to_json_file(os.path.join(d, "config.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"do_lower_case": True}, f)
    return d


def _write_t5(root: str, seed: int) -> str:
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, Regex
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    d = os.path.join(root, "t5")
    os.makedirs(d, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write(_corpus())
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(tmp, "spiece"), vocab_size=200, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
            num_threads=1, seed_sentencepiece_size=5000, minloglevel=2)
        slow = T5Tokenizer(os.path.join(tmp, "spiece.model"), extra_ids=10)
        slow.save_pretrained(d)
    # tokenizer.json (what real FlanT5 folders ship), built from the sentencepiece pieces
    sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "spiece.model"))
    vocab = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    # whole numbers 0..299 as single, preferred pieces (as in the real T5 vocabulary for most
    # numbers), so CALCE's timestamps and answers tokenise as they do with Flan-T5
    numbers = {f"\u2581{i}" for i in range(300)}
    vocab = [(p, 0.0 if p in numbers else sc) for p, sc in vocab]
    known = {p for p, _ in vocab}
    vocab += [(f"\u2581{i}", 0.0) for i in range(300) if f"\u2581{i}" not in known]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(9, -1, -1)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", add_prefix_space=True)
    tk.decoder = decoders.Metaspace(replacement="\u2581", add_prefix_space=True)
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    tk.add_special_tokens(["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(10)])
    tk.save(os.path.join(d, "tokenizer.json"))
    cfg = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                   dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(cfg).save_pretrained(d)
    return d


def _complete(root: str, seed: int) -> bool:
    """Whether ``root`` holds finished assets of this version and seed (the marker is written last)."""
    try:
        with open(os.path.join(root, _MARKER), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return meta.get("version") == _VERSION and meta.get("seed") == seed


def make_tiny_assets(root: Optional[str] = None, seed: int = 0) -> Dict[str, str]:
    """Write the tiny BERT and T5 folders under ``root`` (default: a new temporary folder).
    Returns ``{"root", "bert_dir", "t5_dir"}``. Reuses a complete ``root``.

    Safe when several processes (the ranks of one ``torch.distributed.run`` job) ask for the same
    ``root`` at once: one builds both folders in a staging folder under a file lock and renames
    them into place, then writes the marker; the others wait on the lock and reuse the result, so
    no process ever reads a half-written ``spiece.model``.
    """
    root = root or tempfile.mkdtemp(prefix="c2f_tiny_refiner_")
    os.makedirs(root, exist_ok=True)
    out = {"root": root, "bert_dir": os.path.join(root, "bert"), "t5_dir": os.path.join(root, "t5")}
    if _complete(root, seed):
        return out
    with FileLock(os.path.join(root, ".tiny_refiner.lock")):
        if _complete(root, seed):          # another process finished while this one waited
            return out
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(root, _MARKER))
        staging = tempfile.mkdtemp(prefix=".staging-", dir=root)
        try:
            _write_bert(staging)
            _write_t5(staging, seed)
            for name in ("bert", "t5"):
                dst = os.path.join(root, name)
                if os.path.isdir(dst):
                    shutil.rmtree(dst)
                os.replace(os.path.join(staging, name), dst)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with atomic_open(os.path.join(root, _MARKER), encoding="utf-8") as f:
            json.dump({"version": _VERSION, "seed": seed}, f)
    return out


TINY_VIT = {"img_size": TINY_IMAGE_SIZE, "patch_size": 16, "embed_dim": 24, "depth": 1, "num_heads": 2,
            "mlp_ratio": 2.0, "qkv_bias": True, "use_mean_pooling": False, "norm_layer_eps": 1e-6}


def tiny_refiner_config(root: Optional[str] = None, seed: int = 0, variant: str = "interleaved",
                        **overrides: Any) -> Dict[str, Any]:
    """The ``model:`` mapping of a tiny refiner whose assets are under ``root`` (made if needed).

    ``variant: calce`` gives a tiny CALCE model (8 query tokens, 2 per non-key frame, 4
    clusters); ``interleaved`` the earlier design (4 query tokens)."""
    assets = make_tiny_assets(root, seed)
    cfg: Dict[str, Any] = {
        "arch": "c2f_caption_refiner", "model_type": "tiny", "variant": variant,
        "vit_arch": dict(TINY_VIT), "image_size": TINY_IMAGE_SIZE, "vit_precision": "fp32",
        "bert_dir": assets["bert_dir"], "num_query_token": 4, "cross_attention_freq": 2,
        "t5_dir": assets["t5_dir"], "t5_precision": "fp32", "finetune": "lora",
        "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]},
        "generation": {"num_beams": 2, "max_new_tokens": 12, "min_length": 1},
        "max_piece_tokens": 256, "max_target_tokens": 32,
    }
    if variant == "calce":
        cfg.update(num_query_token=8, lora={"r": 4, "alpha": 4.0, "dropout": 0.0},
                   calce={"stage": 1, "num_clusters": 4, "bias1": 1, "max_txt_len": 64},
                   generation={"num_beams": 2, "max_new_tokens": 16, "min_length": 1})
    cfg.update(overrides)
    return cfg


def build_tiny_refiner(root: Optional[str] = None, seed: int = 0, **overrides: Any):
    """A tiny :class:`~lavis_c2f.models.refiner.model.C2FCaptionRefiner` (random weights,
    seeded)."""
    cfg = tiny_refiner_config(root, seed, **overrides)
    torch.manual_seed(seed)
    return C2FCaptionRefiner.from_config(cfg)


@registry.register_model("c2f_tiny_caption_refiner")
class TinyCaptionRefiner(C2FCaptionRefiner):
    """``c2f_tiny_caption_refiner``: :class:`C2FCaptionRefiner` whose ``tiny_assets`` folder
    (``auto``: ``$C2F_CACHE/tiny_refiner``) provides ``bert_dir`` and ``t5_dir``, written offline
    when missing (tests, demos)."""

    ARCH = "c2f_tiny_caption_refiner"

    @classmethod
    def from_config(cls, cfg: Any) -> C2FCaptionRefiner:
        raw = check_keys(cfg, set(DEFAULTS) | LAVIS_KEYS | {"tiny_assets"}, "model")
        root = raw.pop("tiny_assets", None) or "auto"
        root = os.path.join(cache_root(), "tiny_refiner") if root == "auto" else resolve_path(root)
        assets = make_tiny_assets(root)
        raw["bert_dir"] = raw.get("bert_dir") or assets["bert_dir"]
        raw["t5_dir"] = raw.get("t5_dir") or assets["t5_dir"]
        model = C2FCaptionRefiner.from_config({**raw, "arch": C2FCaptionRefiner.ARCH})
        model.config["tiny_assets"] = root
        return model
