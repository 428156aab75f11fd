"""Helpers of the end-to-end stage-1 tests: a tiny random CLIP folder with a character-level
CLIP tokenizer, small MSR-VTT-style corpora of ffmpeg-made videos, and official-layout T-MASS
checkpoints built from any CLIP configuration."""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from predictor_helpers import ffmpeg, need_ffmpeg

LETTERS = string.ascii_lowercase
BOS, EOS = 2 * len(LETTERS), 2 * len(LETTERS) + 1          # EOS = the largest id, as CLIP's


def tiny_clip_config(width: int = 32, proj: int = 24, layers: int = 1, heads: int = 2, image_size: int = 32,
                     patch: int = 16, max_pos: int = 20, act: str = "quick_gelu") -> Dict[str, Any]:
    """CLIPConfig kwargs of a tiny CLIP whose vocabulary is the character tokenizer's."""
    text = dict(vocab_size=EOS + 1, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=max_pos, hidden_act=act,
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch, hidden_act=act)
    return dict(text_config=text, vision_config=vision, projection_dim=proj)


def write_char_tokenizer(folder: Path) -> None:
    """vocab.json / merges.txt of a CLIP BPE tokenizer without merges: every word is spelt
    letter by letter (``a``..``z``, ``a</w>``..``z</w>``), BOS/EOS are the last two ids."""
    vocab = {c: i for i, c in enumerate(LETTERS)}
    vocab.update({c + "</w>": len(LETTERS) + i for i, c in enumerate(LETTERS)})
    vocab.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def write_tiny_clip(folder: Path, seed: int = 0, **cfg: Any) -> Dict[str, Any]:
    """Save a random tiny CLIPModel and the character tokenizer into ``folder``; returns the
    CLIPConfig kwargs."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    conf = tiny_clip_config(**cfg)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(**conf)).save_pretrained(str(folder))
    write_char_tokenizer(folder)
    return conf


COLORS = ("red", "blue", "green", "yellow", "white", "black")


def make_color_videos(root: Path, vids: Sequence[str], seconds: float = 1.2, rate: int = 10,
                      size: str = "48x40") -> Dict[str, Path]:
    """One short H.264 clip per vid: colour ``COLORS[i % 6]`` with a moving test-pattern square,
    so frames differ over time and the colour identifies the video."""
    need_ffmpeg()
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, vid in enumerate(vids):
        p = root / f"{vid}.mp4"
        ffmpeg("-f", "lavfi", "-i", f"color=c={COLORS[i % len(COLORS)]}:size={size}:rate={rate}:d={seconds}",
               "-f", "lavfi", "-i", f"testsrc=size=12x12:rate={rate}:d={seconds}",
               "-filter_complex", "[0][1]overlay=x='t*20':y=8", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(p))
        out[vid] = p
    return out


def write_msrvtt_corpus(root: Path, train_vids: Sequence[str], test_vids: Sequence[str],
                        captions_per_video: int = 2) -> Dict[str, Path]:
    """MSRVTT_data.json / MSRVTT_train.9k.csv / MSRVTT_JSFUSION_test.csv for colour videos
    (captions name the colour) and the videos themselves under ``root/videos``."""
    vids = list(train_vids) + list(test_vids)
    sentences, sid = [], 0
    for i, vid in enumerate(vids):
        c = COLORS[i % len(COLORS)]
        for k in range(captions_per_video):
            sentences.append({"caption": f"a {c} screen" if k == 0 else f"the video is {c}", "video_id": vid,
                              "sen_id": sid})
            sid += 1
    videos = [{"video_id": v, "start time": 0.0, "end time": 1.2, "id": i} for i, v in enumerate(vids)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": videos, "sentences": sentences}))
    (root / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"{v}\n" for v in train_vids))
    rows = [f"ret{j},msr{j},{v},a {COLORS[(len(train_vids) + j) % len(COLORS)]} screen\n"
            for j, v in enumerate(test_vids)]
    (root / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n" + "".join(rows))
    make_color_videos(root / "videos", vids)
    return {"root": root, "videos": root / "videos"}


def msrvtt_dataset_cfg(root: Path, clip_dir: Path, num_frames: int = 4, image_size: int = 32,
                       splits: Optional[List[str]] = None, **extra: Any) -> Dict[str, Any]:
    """A ``datasets.c2f_msrvtt`` node over :func:`write_msrvtt_corpus`'s files."""
    cfg = {"type": "default", "dataset_type": "video_frames", "data_root": str(root),
           "annotations": {"train": {"path": "MSRVTT_train.9k.csv", "format": "msrvtt_train",
                                     "data_json": "MSRVTT_data.json"},
                           "test": {"path": "MSRVTT_JSFUSION_test.csv", "format": "msrvtt_test"}},
           "videos": {"path": "videos", "key_format": ["{vid}.mp4"], "check": "exists"},
           "frames": {"kind": "tmass", "num_frames": num_frames},
           "image_size": image_size, "tokenizer": {"path": str(clip_dir), "max_words": 20}, "seed": 0}
    if splits is not None:
        cfg["splits"] = splits
    cfg.update(extra)
    return cfg
