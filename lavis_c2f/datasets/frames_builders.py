"""LAVIS dataset builders over video files: the base :class:`C2FFramesDatasetBuilder` and
``c2f_msrvtt`` (MSR-VTT 9k / 7k training, 1k-A test).

Each split becomes a :class:`~lavis_c2f.datasets.video_frames.VideoFramesRetrievalDataset`
(stage 1 trained end to end from decoded frames). Dataset YAML schema (``datasets: {<name>:
{...}}``; unknown keys raise ``ConfigError`` naming them)::

    type: default
    dataset_type: video_frames       # the only type of these builders
    data_root: DIR                   # base of the relative paths below (null/"" -> cwd)
    annotations:                     # one entry per split to build
      train: {path: MSRVTT_train.9k.csv, format: msrvtt_train, data_json: MSRVTT_data.json}
      test:  {path: MSRVTT_JSFUSION_test.csv, format: msrvtt_test, data_json: MSRVTT_data.json}
      # format: msrvtt_train (split csv + captions json) | msrvtt_test (JSFusion csv;
      #         data_json optional, durations only) | qvh (jsonl; whole-video retrieval)
    videos:
      path: videos                   # folder of the video files
      key_format: ["{vid}.mp4", "{vid}.webm"]   # file name(s) tried in order (CLIP4Clip: .mp4, .webm)
      check: exists                  # exists: every file present at build time | probe: also
                                     # probe each one (reads every file; lists all unreadable ones)
    frames:                          # lavis_c2f.video.frame_sampling.FrameSampling
      {kind: tmass, num_frames: 12, pick_train: uniform, pick_eval: uniform, sample_fps: 1,
       slice_mode: uniform}
    image_size: 224                  # CLIP input size (the vision tower's image_size)
    train_transform: train           # transform of the train split: train (T-MASS: random crop,
                                     # flip) | eval (CLIP4Clip / UCoFiA train on the eval transform)
    tokenizer: {path: CLIP_FOLDER, max_words: 77, padding: longest}
      # or {kind: clip4clip, path: null, max_words: 32, padding: max_length}: CLIP4Clip / UCoFiA's
      # text arrays (bundled BPE, 0-padded)
    decode_backend: auto             # auto | decord | pyav
    seed: 0                          # random frame picks / train augmentations (with epoch, item)
    splits: null                     # subset of annotation splits to build (null: all)

The ``train`` split uses the ``train_transform`` (``c2f_clip_frames`` ``mode``) and the train
frame pick; every other split the eval ones. A missing file raises ``ConfigError``
naming it and its YAML key; missing or (with ``check: probe``) unreadable videos raise one
error listing them.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

from lavis.common.registry import registry

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.data.msrvtt import read_msrvtt_test, read_msrvtt_train
from lavis_c2f.data.readers import read_annotations
from lavis_c2f.data.records import MomentRecord
from lavis_c2f.datasets.builders import C2FBuilderBase
from lavis_c2f.datasets.video_frames import VideoFramesRetrievalDataset
from lavis_c2f.paths import resolve_path
from lavis_c2f.processors.clip_processors import Clip4ClipTokenizer, ClipFrameProcessor, ClipTokenizer
from lavis_c2f.video.probe import probe_many
from lavis_c2f.video.frame_sampling import FrameSampling

SPLITS = ("train", "val", "test")
FORMATS = ("msrvtt_train", "msrvtt_test", "qvh")
KEYS = {"type", "dataset_type", "data_root", "annotations", "videos", "frames", "image_size", "tokenizer",
        "decode_backend", "seed", "splits", "train_transform"}
ANNOTATION_KEYS = {"path", "format", "data_json"}
VIDEO_KEYS = {"path", "key_format", "check"}
FRAME_KEYS = {"kind", "num_frames", "pick_train", "pick_eval", "sample_fps", "slice_mode"}
TOKENIZER_KEYS = {"kind", "path", "max_words", "padding"}
TOKENIZER_KINDS = ("hf", "clip4clip")
MAX_LISTED = 20


class C2FFramesDatasetBuilder(C2FBuilderBase):
    """Base of the video-file builders (module docstring). ``Builder(cfg)`` with ``cfg``
    None (the default YAML), a YAML path, or the ``datasets.<name>`` node LAVIS passes."""

    DATASET_CONFIG_DICT = {"default": "datasets/msrvtt/defaults.yaml"}
    NAME = "c2f_msrvtt"

    def __init__(self, cfg: Any = None):  # noqa: D401 - LAVIS signature
        # BaseDatasetBuilder.__init__ expects LAVIS's build_info/data_type: not called on purpose.
        self.config = self.read_config(cfg)
        self.data_type = "videos"
        self._parse(self.config)

    # -- config
    def _parse(self, cfg: Any) -> None:
        where = self.where = f"datasets.{self.NAME}"
        d = check_keys(cfg, KEYS, where)
        if d.get("dataset_type", "video_frames") != "video_frames":
            raise ConfigError(f"{where}.dataset_type: {self.NAME} builds 'video_frames' datasets, "
                              f"got {d.get('dataset_type')!r}")
        root = d.get("data_root")
        self.data_root = resolve_path(root) if root not in (None, "", "null") else os.getcwd()
        anns = d.get("annotations")
        if not isinstance(anns, dict) or not anns:
            raise ConfigError(f"{where}.annotations: expected a mapping split -> {{path, format}}, got {anns!r}")
        self.annotations: Dict[str, Dict[str, Any]] = {}
        for split, a in anns.items():
            aw = f"{where}.annotations.{split}"
            if split not in SPLITS:
                raise ConfigError(f"{aw}: unknown split {split!r}; expected one of {SPLITS}")
            a = check_keys(a, ANNOTATION_KEYS, aw)
            if not a.get("path"):
                raise ConfigError(f"{aw}.path: missing")
            if a.get("format") not in FORMATS:
                raise ConfigError(f"{aw}.format: expected one of {FORMATS}, got {a.get('format')!r}")
            if a["format"] == "msrvtt_train" and not a.get("data_json"):
                raise ConfigError(f"{aw}.data_json: msrvtt_train needs the captions file (MSRVTT_data.json)")
            self.annotations[split] = {
                "path": resolve_path(a["path"], self.data_root), "format": a["format"],
                "data_json": resolve_path(a["data_json"], self.data_root) if a.get("data_json") else None}
        v = check_keys(d.get("videos"), VIDEO_KEYS, f"{where}.videos")
        if not v.get("path"):
            raise ConfigError(f"{where}.videos.path: missing (the folder of the video files)")
        fmts = v.get("key_format", ["{vid}.mp4"])
        fmts = [fmts] if isinstance(fmts, str) else list(fmts)
        if not fmts or not all(isinstance(f, str) and "{vid}" in f for f in fmts):
            raise ConfigError(f"{where}.videos.key_format: file name pattern(s) with '{{vid}}', got {fmts!r}")
        if v.get("check", "exists") not in ("exists", "probe"):
            raise ConfigError(f"{where}.videos.check: expected 'exists' or 'probe', got {v.get('check')!r}")
        self.video_dir, self.key_formats, self.check = resolve_path(v["path"], self.data_root), fmts, \
            v.get("check", "exists")
        fr = check_keys(d.get("frames"), FRAME_KEYS, f"{where}.frames")
        try:
            self.sampling = FrameSampling(**fr)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}.frames: {e}") from None
        size = d.get("image_size", 224)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"{where}.image_size: expected a positive integer, got {size!r}")
        self.image_size = size
        self.train_transform = d.get("train_transform", "train")
        if self.train_transform not in ("train", "eval"):
            raise ConfigError(f"{where}.train_transform: expected 'train' or 'eval', got {self.train_transform!r}")
        tok = check_keys(d.get("tokenizer"), TOKENIZER_KEYS, f"{where}.tokenizer")
        self.tokenizer_kind = tok.pop("kind", "hf")
        if self.tokenizer_kind not in TOKENIZER_KINDS:
            raise ConfigError(f"{where}.tokenizer.kind: expected one of {TOKENIZER_KINDS}, got {self.tokenizer_kind!r}")
        if self.tokenizer_kind == "clip4clip":
            if tok.get("path") or tok.get("padding", "max_length") != "max_length":
                raise ConfigError(f"{where}.tokenizer: kind clip4clip uses the bundled BPE padded to max_words: "
                                  f"set path: null and padding: max_length (got path={tok.get('path')!r}, "
                                  f"padding={tok.get('padding')!r})")
            self.tokenizer_cfg = {"max_words": tok.get("max_words", 32)}
        elif not tok.get("path"):
            raise ConfigError(f"{where}.tokenizer.path: missing (a local CLIP folder with vocab.json and merges.txt; "
                              "the project YAMLs read it from $C2F_CLIP_PATH)")
        else:
            self.tokenizer_cfg = {**tok, "path": resolve_path(tok["path"], self.data_root)}
        self.decode_backend = d.get("decode_backend", "auto")
        if self.decode_backend not in ("auto", "decord", "pyav"):
            raise ConfigError(f"{where}.decode_backend: expected auto, decord or pyav, got {self.decode_backend!r}")
        seed = d.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{where}.seed: expected an integer, got {seed!r}")
        self.seed = seed
        self.splits = list(d.get("splits") or self.annotations)
        for s in self.splits:
            if s not in self.annotations:
                raise ConfigError(f"{where}.splits: {s!r} has no entry in {where}.annotations "
                                  f"({sorted(self.annotations)})")

    # -- building
    def read_split(self, split: str) -> List[MomentRecord]:
        """Records of ``split`` (ConfigError naming the YAML key when a file is missing)."""
        a, aw = self.annotations[split], f"{self.where}.annotations.{split}"
        for key in ("path", "data_json"):
            if a[key] is not None and not os.path.isfile(a[key]):
                raise ConfigError(f"{aw}.{key}: file not found: {a[key]}")
        if a["format"] == "msrvtt_train":
            return read_msrvtt_train(a["path"], a["data_json"])
        if a["format"] == "msrvtt_test":
            return read_msrvtt_test(a["path"], a["data_json"])
        return read_annotations(a["path"], fmt="qvh")

    def video_paths(self, vids: List[str]) -> Dict[str, str]:
        """vid -> file for every vid (one ConfigError listing the missing or unreadable ones)."""
        if not os.path.isdir(self.video_dir):
            raise ConfigError(f"{self.where}.videos.path: video folder not found: {self.video_dir}")
        out: Dict[str, str] = {}
        missing: List[str] = []
        for vid in vids:
            for fmt in self.key_formats:
                p = os.path.join(self.video_dir, fmt.format(vid=vid))
                if os.path.isfile(p):
                    out[vid] = p
                    break
            else:
                missing.append(vid)
        if missing:
            shown = ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
            raise ConfigError(f"{self.where}.videos: {len(missing)} of {len(vids)} videos have no file "
                              f"{' or '.join(self.key_formats)} in {self.video_dir}: {shown}")
        if self.check == "probe":
            _, summary = probe_many([out[v] for v in vids])
            if summary.failed:
                raise ConfigError(f"{self.where}.videos: {len(summary.failed)} unreadable video file(s):\n"
                                  + summary.format(max_failures=MAX_LISTED))
        return out

    def build_datasets(self) -> Dict[str, VideoFramesRetrievalDataset]:
        """``{split: VideoFramesRetrievalDataset}`` (no download step)."""
        kind = Clip4ClipTokenizer if self.tokenizer_kind == "clip4clip" else ClipTokenizer
        tokenizer = kind(**self.tokenizer_cfg)
        records = {s: self.read_split(s) for s in self.splits}
        vids = list(dict.fromkeys(r.vid for s in self.splits for r in records[s]))
        paths = self.video_paths(vids)
        out = {}
        for split in self.splits:
            train = split == "train"
            if not records[split]:
                raise DataFormatError("no records", path=self.annotations[split]["path"])
            out[split] = VideoFramesRetrievalDataset(
                records[split], paths, sampling=self.sampling,
                frame_processor=ClipFrameProcessor(self.image_size, mode=self.train_transform if train else "eval"),
                tokenizer=tokenizer, train=train, seed=self.seed, decode_backend=self.decode_backend,
                name=f"{self.NAME}/{split}")
        return out


@registry.register_builder("c2f_msrvtt")
class MSRVTTBuilder(C2FFramesDatasetBuilder):
    """MSR-VTT (9k / 7k training, 1k-A test) from the CLIP4Clip / T-MASS annotation files."""

    DATASET_CONFIG_DICT = {"default": "datasets/msrvtt/defaults.yaml"}
    NAME = "c2f_msrvtt"

